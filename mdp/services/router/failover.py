"""Per-symbol source selection with failover, failback and a handover buffer (pure).

Health. A provider is *healthy* for a symbol at `now` when it is not marked down and its last
*advancing* batch for the symbol (one whose `last_ts` exceeds every `last_ts` it sent for the
symbol before; a redelivery or a late batch is no sign of a live feed) arrived less than
`detect_ns` ago (`now - last < detect_ns`). Its current
*run* starts at the first batch after a silence of at least `detect_ns`, after a `mark_down`, or
at its first batch ever; batches that arrive while it is marked down never count.

Choice. Providers are ranked per symbol by the strategy (`first_available`: the order, then
unlisted providers alphabetically; `round_robin`: rendezvous hashing of (symbol, provider), so
symbols spread evenly over the healthy sources and a source joining or leaving moves only its own
share; `lowest_latency`: the lowest EWMA of `recv - last_ts`, unmeasured providers last). On
every `observe`, `tick` and `mark_down` the selector switches a symbol:

* to the best healthy provider, reason `first_source`, when none was chosen yet;
* to the best healthy provider, reason `provider_down` / `stale`, when the chosen one is marked
  down / is not healthy (if nobody is healthy the choice stays, so the old source resumes at once);
* to a better-ranked healthy provider whose run has lasted at least `hysteresis_ns`, reason
  `failback`, when the chosen one is healthy.

Forwarding. Let W be the largest `last_ts` forwarded for the symbol and P the provider of the
last forwarded batch. A batch is forwarded exactly when (1) it comes from the chosen provider,
live or from the handover buffer at a switch, (2) its id is not among the last `dedup_max` ids
forwarded for the symbol, and (3) `first_ts > W` if it comes from a provider other than P, or
`first_ts > H` if it comes from P, where H is the value W had when P forwarded the first batch of
its current turn (no bound for the very first source). Rule (3) means a new source never
re-sends event time the previous one already covered, while the current source's own late
batches within its turn still pass (the aggregator revises bars with them).

Handover buffer. Each non-chosen, non-down provider's batches are kept per symbol, at most
`buffer_max` of them, for `detect_ns` (a batch whose age `now - arrival >= detect_ns` is dropped).
At a switch the new source's buffered batches are offered, oldest first, under the rules above:
the batches it delivered during the detection window fill the gap the old source left.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from typing import Literal

import msgspec

Strategy = Literal["first_available", "round_robin", "lowest_latency"]
SwitchReason = Literal["first_source", "stale", "provider_down", "failback"]

_NS_PER_S = 1_000_000_000


# Batch ids remembered per symbol against forwarding one twice: more than a pull batch (256)
# plus a handover (64) may redeliver. Per symbol, so memory is symbols x this x ~150 bytes
# (4,096 made ~600 MB at 1,000 symbols).
DEDUP_MAX = 512


class Switch(msgspec.Struct, frozen=True):
    """A change of a symbol's source; `forward` are the buffered batch ids to send with it."""

    symbol: str
    from_provider: str | None
    to_provider: str
    reason: SwitchReason
    at_ns: int
    forward: tuple[str, ...] = ()


class Decision(msgspec.Struct, frozen=True):
    """What to do with an observed batch: the ids to forward now, in order, and any switch."""

    forward: list[str]
    switch: Switch | None


class _Buffered(msgspec.Struct, frozen=True):
    batch_id: str
    first_ts: int
    last_ts: int
    arrived_ns: int


class _Source:
    """One provider's health for one symbol."""

    __slots__ = ("buffer", "last_ns", "max_ts", "run_start_ns")

    def __init__(self, buffer_max: int) -> None:
        self.max_ts: int | None = None
        self.last_ns: int | None = None
        self.run_start_ns: int | None = None
        self.buffer: deque[_Buffered] = deque(maxlen=buffer_max)


class _Symbol:
    """A symbol's sources, choice and forwarding watermark."""

    __slots__ = ("chosen", "floor", "forwarded", "last_provider", "sources", "watermark")

    def __init__(self) -> None:
        self.sources: dict[str, _Source] = {}
        self.chosen: str | None = None
        self.watermark: int | None = None
        self.floor: int | None = None  # W when the last provider's turn began
        self.last_provider: str | None = None
        self.forwarded: OrderedDict[str, None] = OrderedDict()


class FailoverSelector:
    """Chooses, per symbol, which provider's batches become `md.quotes.<sym>`."""

    def __init__(
        self,
        default_order: Sequence[str] = (),
        per_symbol: Mapping[str, Sequence[str]] | None = None,
        *,
        strategy: Strategy = "first_available",
        detect_ns: int = 3 * _NS_PER_S,
        hysteresis_ns: int = 10 * _NS_PER_S,
        buffer_max: int = 64,
        dedup_max: int = DEDUP_MAX,
        latency_alpha: float = 0.2,
    ) -> None:
        """Validate the settings; no symbols yet."""
        if detect_ns < 1 or hysteresis_ns < 0 or buffer_max < 1 or dedup_max < 1:
            raise ValueError("detect_ns, buffer_max, dedup_max must be positive, hysteresis >= 0")
        if not 0 < latency_alpha <= 1:
            raise ValueError("latency_alpha must be in (0, 1]")
        self.strategy: Strategy = strategy
        self.detect_ns = detect_ns
        self.hysteresis_ns = hysteresis_ns
        self.buffer_max = buffer_max
        self.dedup_max = dedup_max
        self.latency_alpha = latency_alpha
        self._default: list[str] = []
        self._per_symbol: dict[str, list[str]] = {}
        self.set_order(default_order, per_symbol or {})
        self._down: dict[str, str] = {}
        self._latency: dict[str, float] = {}
        self._symbols: dict[str, _Symbol] = {}

    # -- configuration ---------------------------------------------------------------------

    def configure(self, *, strategy: Strategy, detect_ns: int, hysteresis_ns: int) -> None:
        """Replace the timing and strategy (a policy reload); takes effect at the next call."""
        if detect_ns < 1 or hysteresis_ns < 0:
            raise ValueError("detect_ns must be positive and hysteresis_ns >= 0")
        self.strategy, self.detect_ns, self.hysteresis_ns = strategy, detect_ns, hysteresis_ns

    def set_order(self, default: Sequence[str], per_symbol: Mapping[str, Sequence[str]]) -> None:
        """Replace the source order (the policy's `fallback`); takes effect at the next call."""
        self._default = list(default)
        self._per_symbol = {s: list(o) for s, o in per_symbol.items()}

    def _rank(self, symbol: str, provider: str) -> tuple[int, float, int, str]:
        """Smaller is better; ties fall back to the order, then the name."""
        order = self._per_symbol.get(symbol, self._default)
        position = order.index(provider) if provider in order else len(order)
        if self.strategy == "round_robin":
            digest = hashlib.blake2b(f"{symbol}\0{provider}".encode(), digest_size=8).digest()
            return (-int.from_bytes(digest, "big"), 0.0, position, provider)
        if self.strategy == "lowest_latency":
            latency = self._latency.get(provider)
            if latency is None:
                return (1, 0.0, position, provider)
            return (0, latency, position, provider)
        return (0, 0.0, position, provider)

    # -- inputs ----------------------------------------------------------------------------

    def observe(
        self,
        symbol: str,
        provider: str,
        batch_id: str,
        first_ts: int,
        last_ts: int,
        recv_ns: int,
        now_ns: int,
    ) -> Decision:
        """Record a batch from `provider`; return the ids to forward now and any switch."""
        sym = self._symbols.setdefault(symbol, _Symbol())
        src = sym.sources.setdefault(provider, _Source(self.buffer_max))
        previous = self._latency.get(provider)
        sample = float(recv_ns - last_ts)
        self._latency[provider] = (
            sample if previous is None else previous + self.latency_alpha * (sample - previous)
        )
        advancing = src.max_ts is None or last_ts > src.max_ts
        src.max_ts = last_ts if src.max_ts is None else max(src.max_ts, last_ts)
        if provider in self._down:
            src.run_start_ns = None  # deliveries while down never count as health
        elif advancing:
            silent = src.last_ns is None or now_ns - src.last_ns >= self.detect_ns
            if silent or src.run_start_ns is None:
                src.run_start_ns = now_ns
            src.last_ns = now_ns
        batch = _Buffered(batch_id, first_ts, last_ts, now_ns)
        forward: list[str] = []
        if provider == sym.chosen and provider not in self._down:
            self._offer(sym, provider, batch, forward)
        elif provider not in self._down:
            src.buffer.append(batch)  # a backup: kept for a handover
        switch = self._evaluate(symbol, sym, now_ns)
        if switch is not None:
            forward.extend(switch.forward)
        return Decision(forward, switch)

    def tick(self, now_ns: int) -> list[Switch]:
        """The timer: detect silent sources and due failbacks without waiting for a batch."""
        switches = []
        for symbol, sym in self._symbols.items():
            switch = self._evaluate(symbol, sym, now_ns)
            if switch is not None:
                switches.append(switch)
        return switches

    def mark_down(self, provider: str, reason: str, now_ns: int) -> list[Switch]:
        """Take `provider` out (breaker open, job failed or retrying); fail over at once."""
        self._down[provider] = reason
        for sym in self._symbols.values():
            src = sym.sources.get(provider)
            if src is not None:
                src.run_start_ns = None
                src.buffer.clear()
        return self.tick(now_ns)

    def mark_up(self, provider: str) -> None:
        """Let `provider` back in; it counts as healthy again from its next batch."""
        self._down.pop(provider, None)

    # -- queries ---------------------------------------------------------------------------

    def chosen(self, symbol: str) -> str | None:
        """The provider currently routed for `symbol`."""
        sym = self._symbols.get(symbol)
        return None if sym is None else sym.chosen

    def latency_ns(self, provider: str) -> float | None:
        """The EWMA of `recv - last_ts` for `provider`, if measured."""
        return self._latency.get(provider)

    def healthy(self, symbol: str, provider: str, now_ns: int) -> bool:
        """Whether `provider` is healthy for `symbol` at `now_ns`."""
        sym = self._symbols.get(symbol)
        src = None if sym is None else sym.sources.get(provider)
        return src is not None and self._is_healthy(provider, src, now_ns)

    # -- the rules -------------------------------------------------------------------------

    def _is_healthy(self, provider: str, src: _Source, now_ns: int) -> bool:
        return (
            provider not in self._down
            and src.last_ns is not None
            and src.run_start_ns is not None
            and now_ns - src.last_ns < self.detect_ns
        )

    def _run_ns(self, sym: _Symbol, provider: str, now_ns: int) -> int:
        start = sym.sources[provider].run_start_ns
        return -1 if start is None else now_ns - start

    def _evaluate(self, symbol: str, sym: _Symbol, now_ns: int) -> Switch | None:
        for src in sym.sources.values():
            while src.buffer and now_ns - src.buffer[0].arrived_ns >= self.detect_ns:
                src.buffer.popleft()
        healthy = [p for p, s in sym.sources.items() if self._is_healthy(p, s, now_ns)]
        if not healthy:
            return None
        best = min(healthy, key=lambda p: self._rank(symbol, p))
        current = sym.chosen
        reason: SwitchReason
        if current is None:
            reason = "first_source"
        elif current in self._down:
            reason = "provider_down"
        elif current not in healthy:
            reason = "stale"
        else:
            current_rank = self._rank(symbol, current)
            ripe = [
                p
                for p in healthy
                if self._rank(symbol, p) < current_rank
                and self._run_ns(sym, p, now_ns) >= self.hysteresis_ns
            ]
            if not ripe:
                return None
            best = min(ripe, key=lambda p: self._rank(symbol, p))
            reason = "failback"
        return self._switch(symbol, sym, best, reason, now_ns)

    def _switch(
        self, symbol: str, sym: _Symbol, to: str, reason: SwitchReason, now_ns: int
    ) -> Switch:
        previous = sym.chosen
        sym.chosen = to
        forward: list[str] = []
        target = sym.sources[to]
        for batch in target.buffer:
            self._offer(sym, to, batch, forward)
        target.buffer.clear()
        return Switch(symbol, previous, to, reason, now_ns, tuple(forward))

    def _offer(self, sym: _Symbol, provider: str, batch: _Buffered, out: list[str]) -> None:
        if batch.batch_id in sym.forwarded:
            return
        bound = sym.floor if provider == sym.last_provider else sym.watermark
        if bound is not None and batch.first_ts <= bound:
            return  # an earlier source (or turn) already covered this event time
        if provider != sym.last_provider:
            sym.floor = sym.watermark
        out.append(batch.batch_id)
        sym.forwarded[batch.batch_id] = None
        if len(sym.forwarded) > self.dedup_max:
            sym.forwarded.popitem(last=False)
        sym.watermark = (
            batch.last_ts if sym.watermark is None else max(sym.watermark, batch.last_ts)
        )
        sym.last_provider = provider
