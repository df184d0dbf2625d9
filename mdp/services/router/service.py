"""The router: `md.raw.>` in, one source per symbol out on `md.quotes.<sym>`.

The choice is `FailoverSelector`'s (pure, in failover.py); this shell feeds it batches, a timer
and what KV says of each provider (its circuit, its jobs), and keeps the payloads of the
batches it may still hand over. The order and timing come from the policy's `fallback`.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import ClassVar, NamedTuple

import msgspec
from nats.aio.msg import Msg
from prometheus_client import Counter, Gauge

from mdp.services.router.failover import FailoverSelector, Switch
from mdp.shared.bus.consumer import stream_sequence
from mdp.shared.bus.deadletter import dead_letter, dead_letter_payload
from mdp.shared.bus.kv import follow
from mdp.shared.bus.publisher import PayloadTooLarge, publish_event
from mdp.shared.config import EffectivePolicy, FallbackConfig, local_policy
from mdp.shared.contract import names
from mdp.shared.contract.codec import JSON, Codec, DecodeError, encode
from mdp.shared.contract.events import Failover
from mdp.shared.contract.messages import DeadTick, Tick, TickBatch
from mdp.shared.contract.records import CircuitRecord, CircuitState, JobState, ProviderState
from mdp.shared.metrics import DEAD_LETTERS
from mdp.shared.runtime import Context
from mdp.shared.settings import Settings

TICKS_ROUTED = Counter(
    "mdp_router_ticks_routed_total", "Ticks forwarded to md.quotes", ["provider"]
)
TICKS_NOT_SELECTED = Counter(
    "mdp_router_ticks_not_selected_total",
    "Ticks of a provider not chosen for the symbol",
    ["provider"],
)
FAILOVERS = Counter(
    "mdp_router_source_changes_total",
    "Per-symbol source changes, by new source",
    ["provider", "reason"],
)
PROVIDERS_DOWN = Gauge(
    "mdp_router_provider_down",
    "1 while KV says a provider cannot serve (circuit, jobs)",
    ["provider"],
)
_TIMER_S = 0.1  # how often silence is checked: a small fraction of the detection time

# Event times before 1990, more than 5 minutes ahead of their own receive time, or received
# "later" than this router's clock allows, are absurd: one such tick would drag its symbol's
# watermark into the future (the aggregator also holds back a tick that jumps ahead).
_MIN_TS = 631_152_000_000_000_000
_MAX_AHEAD_OF_RECV_NS = 300_000_000_000
_MAX_CLOCK_SKEW_NS = 60_000_000_000  # a receive time this far ahead of our clock is a lie


class Rejected(ValueError):
    """A message that must go to the dead-letter queue, with a reason class for the metric."""

    def __init__(self, reason: str, reason_class: str) -> None:
        super().__init__(reason)
        self.reason_class = reason_class


class _LooseTick(msgspec.Struct, omit_defaults=True, gc=False):
    """A `Tick` as sent, before its values are checked (so one bad tick fails alone)."""

    ts: int
    recv: int
    seq: int
    price: float
    size: float
    bid: float | None = None
    ask: float | None = None
    bid_size: float | None = None
    ask_size: float | None = None


class _LooseBatch(msgspec.Struct, gc=False):
    """A `TickBatch` whose ticks are `_LooseTick`s."""

    symbol: str
    provider: str
    ticks: list[_LooseTick]


def check_clock_rate(headers: dict[str, str]) -> None:
    """Raise Rejected unless `Mdp-Clock-Rate`, when present, is a finite number >= 0."""
    text = headers.get(names.CLOCK_RATE)
    if text is None:
        return
    try:
        rate = float(text)
    except ValueError:
        rate = math.nan
    if not (math.isfinite(rate) and rate >= 0):
        raise Rejected(f"{names.CLOCK_RATE} {text[:40]!r} is not a number >= 0", "header")


def check_batch(batch: TickBatch | _LooseBatch, subject: str, end_of_stream: bool) -> None:
    """Raise Rejected unless the batch as a whole fits its subject (provider, symbol, ticks)."""
    _, _, provider, token = subject.split(".", 3)
    if batch.provider != provider:
        raise Rejected(
            f"payload provider {batch.provider!r} differs from subject provider {provider!r}",
            "subject_mismatch",
        )
    if names.escape_symbol(batch.symbol) != token:
        raise Rejected(
            f"payload symbol {batch.symbol!r} does not match subject token {token!r}",
            "subject_mismatch",
        )
    if not batch.ticks and not end_of_stream:
        raise Rejected("a tick batch needs at least one tick", "empty")


def tick_problem(tick: Tick | _LooseTick, now_ns: int) -> tuple[str, str] | None:
    """Why one tick must be rejected (reason, class), or None when it is sane."""
    if not tick.ts >= _MIN_TS or tick.ts - tick.recv > _MAX_AHEAD_OF_RECV_NS:
        return (
            f"absurd event time {tick.ts} ns (receive time {tick.recv} ns, seq {tick.seq})",
            "timestamp",
        )
    if tick.recv - now_ns > _MAX_CLOCK_SKEW_NS:
        ahead = (tick.recv - now_ns) / 1e9
        return (
            f"receive time {ahead:.0f} s ahead of the router's clock (seq {tick.seq})",
            "timestamp",
        )
    if not (math.isfinite(tick.price) and math.isfinite(tick.size)):
        return (f"non-finite price or size ({tick.price}, {tick.size}) at seq {tick.seq}", "value")
    sizes = (tick.size, tick.bid_size, tick.ask_size)
    if any(size is not None and not size >= 0 for size in sizes):
        return (f"negative size at seq {tick.seq}", "value")
    return None


def _all_sane(ticks: list[Tick], now_ns: int) -> bool:
    """Whether no tick has a problem (`tick_problem`), from minima, maxima and sums: a sum that
    is not finite (NaN, infinity, or finite values adding up past 1.8e308) says "look closer"."""
    if not ticks:
        return True
    ts = [t.ts for t in ticks]
    recv = [t.recv for t in ticks]
    sizes = [t.size for t in ticks]
    quote_sizes = [s for t in ticks for s in (t.bid_size, t.ask_size) if s is not None]
    return (
        min(ts) >= _MIN_TS
        and max([a - b for a, b in zip(ts, recv, strict=True)]) <= _MAX_AHEAD_OF_RECV_NS
        and max(recv) - now_ns <= _MAX_CLOCK_SKEW_NS
        and math.isfinite(sum([t.price for t in ticks]))
        and math.isfinite(sum(sizes))
        and min(sizes) >= 0
        and (not quote_sizes or (math.isfinite(sum(quote_sizes)) and min(quote_sizes) >= 0))
    )


def screen(
    batch: TickBatch | _LooseBatch, now_ns: int
) -> tuple[list[Tick], list[tuple[Tick | _LooseTick, str, str]]]:
    """Split a batch's ticks into the sane ones (in order) and the rejected, with reasons."""
    good: list[Tick] = []
    bad: list[tuple[Tick | _LooseTick, str, str]] = []
    if isinstance(batch, TickBatch) and _all_sane(batch.ticks, now_ns):
        return batch.ticks, bad  # the common case, judged on the batch's extremes at once
    for tick in batch.ticks:
        problem = tick_problem(tick, now_ns)
        if problem is not None:
            bad.append((tick, *problem))
        elif isinstance(tick, Tick):
            good.append(tick)
        else:
            good.append(Tick(**msgspec.structs.asdict(tick)))
    return good, bad


class _Held(NamedTuple):
    """A validated batch the router may still forward (a backup's, kept for a handover)."""

    symbol: str
    data: bytes
    headers: dict[str, str]
    arrived_ns: int


class SourceHealth:
    """What KV says about each provider: its circuit and its jobs' states (pure)."""

    def __init__(self) -> None:
        """Nothing known: every provider is up."""
        self.circuits: dict[str, CircuitState] = {}
        self.jobs: dict[str, tuple[str, JobState]] = {}  # job -> (provider, state)

    def down_reason(self, provider: str) -> str | None:
        """Why `provider` cannot serve now, or None when it may."""
        if self.circuits.get(provider, "closed") != "closed":
            return f"circuit_{self.circuits[provider]}"
        states = [state for p, state in self.jobs.values() if p == provider]
        if "running" in states:
            return None
        for state in ("retrying", "failed"):
            if state in states:
                return f"job_{state}"
        return None


class RouterService:
    """Validates raw tick batches, picks one provider per symbol, forwards its batches."""

    name: ClassVar[str] = "router"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.selector = FailoverSelector(buffer_max=settings.router.handover_batches)
        # Until control's policy is read, the one from our own files and environment applies.
        self._apply(local_policy(self.name).fallback)
        self.health = SourceHealth()
        self.down: dict[str, str | None] = {}  # the last reason acted on, per provider
        self.held: dict[str, _Held] = {}  # batch id -> payload, while a handover may need it
        self.lock = asyncio.Lock()  # one decision and its publishes at a time: order per symbol
        self.codec = Codec(TickBatch)
        self.loose = Codec(_LooseBatch)  # for a batch with a bad value: reject per tick

    async def start(self, ctx: Context) -> None:
        """Follow the policy and the providers' health, start the timer, consume `md.raw.>`."""
        self.ctx = ctx
        self.state_kv = await ctx.js.key_value(names.KV_STATE)
        ctx.spawn(self._watch_policy(), "policy")
        ctx.spawn(self._watch_circuits(), "circuits")
        ctx.spawn(self._watch_jobs(), "job-states")
        ctx.spawn(self._timer(), "failover-timer")
        await ctx.consume(
            names.STREAM_RAW, "router", [names.RAW_ALL], self.handle, dead_letter_poison=True
        )

    async def stop(self) -> None:
        """Nothing to flush: the runtime stops the consumer and awaits every publish."""

    def _apply(self, fallback: FallbackConfig) -> None:
        self.selector.set_order(fallback.default or [], fallback.symbols)
        self.selector.configure(
            strategy=fallback.strategy,
            detect_ns=int(fallback.detect_seconds * 1e9),
            hysteresis_ns=int(fallback.hysteresis_seconds * 1e9),
        )

    async def handle(self, msgs: list[Msg]) -> None:
        """Route one pulled batch; returns once every forward is stored in MD_QUOTES."""
        ctx = self.ctx
        async with self.lock:
            for msg in msgs:
                await self._route(msg, time.time_ns())
            await ctx.publisher.flush()

    async def _route(self, msg: Msg, now: int) -> None:
        headers = msg.headers or {}
        eos = names.END_OF_STREAM in headers
        batch: TickBatch | _LooseBatch
        try:
            try:
                batch = self.codec.decode(msg.data, headers)
            except DecodeError:
                batch = self.loose.decode(msg.data, headers)  # a value out of range somewhere
            check_batch(batch, msg.subject, eos)
            check_clock_rate(headers)
        except DecodeError as exc:
            await dead_letter(self.ctx.publisher, self.name, msg, f"undecodable: {exc}", "decode")
            return
        except Rejected as exc:
            await dead_letter(self.ctx.publisher, self.name, msg, str(exc), exc.reason_class)
            return
        good, bad = screen(batch, now)
        raw_id = headers.get(names.MSG_ID) or f"{names.STREAM_RAW}:{stream_sequence(msg)}"
        out_headers = {
            names.CONTENT_TYPE: headers.get(names.CONTENT_TYPE, JSON),
            names.MSG_ID: names.quote_id(raw_id),
        }
        for key in names.FORWARDED:
            if key in headers:
                out_headers[key] = headers[key]
        data = msg.data  # forwarded as received when every tick is sane: never re-encoded
        if bad:
            await self._reject_ticks(batch.symbol, batch.provider, raw_id, bad)
            out_headers[names.REJECTED_SEQS] = ",".join(str(tick.seq) for tick, _, _ in bad)
            data = encode(
                TickBatch(batch.symbol, batch.provider, good), out_headers[names.CONTENT_TYPE]
            )
        held = _Held(batch.symbol, data, out_headers, now)
        if not good and not eos and names.RUN not in headers:
            return  # nothing sane, and no run whose completion could wait for these seqs
        if not good:  # an end-of-stream marker or nothing sane: it follows its source or none
            if self.selector.chosen(batch.symbol) in (None, batch.provider):
                await self._forward(held)
            return
        stamps = [tick.ts for tick in good]
        decision = self.selector.observe(
            batch.symbol, batch.provider, raw_id, min(stamps), max(stamps), good[-1].recv, now
        )
        self.held[raw_id] = held
        for batch_id in decision.forward:
            await self._forward(self.held.pop(batch_id))
        if decision.switch is not None:
            await self._switched(decision.switch)
        if raw_id in self.held:
            TICKS_NOT_SELECTED.labels(batch.provider).inc(len(good))
        else:
            TICKS_ROUTED.labels(batch.provider).inc(len(good))

    async def _reject_ticks(
        self,
        symbol: str,
        provider: str,
        batch_id: str,
        bad: list[tuple[Tick | _LooseTick, str, str]],
    ) -> None:
        """Dead-letter each rejected tick on its own; the rest of its batch goes on."""
        for tick, reason, reason_class in bad:
            body = DeadTick(symbol, Tick(**msgspec.structs.asdict(tick)))
            headers = {
                names.CONTENT_TYPE: JSON,
                names.MSG_ID: names.rejected_tick_id(self.name, batch_id, tick.seq),
                names.DLQ_REASON: reason,
                names.DLQ_SERVICE: self.name,
                names.DLQ_SUBJECT: names.raw(provider, symbol),
            }
            DEAD_LETTERS.labels(self.name, reason_class).inc()
            await self.ctx.publisher.publish(names.dlq(self.name), encode(body), headers)

    async def _forward(self, held: _Held) -> None:
        subject = names.quotes(held.symbol)
        try:
            await self.ctx.publisher.publish(subject, held.data, held.headers)
        except PayloadTooLarge as exc:  # a raw batch at the limit, plus our headers
            msg_id = held.headers[names.MSG_ID]
            await dead_letter_payload(
                self.ctx.publisher, self.name, subject, held.data, held.headers, str(exc),
                "too_large", msg_id,
            )  # fmt: skip

    async def _switched(self, switch: Switch) -> None:
        """Forward what the new source buffered, and tell the story on `ingest.events.failover`."""
        for batch_id in switch.forward:
            held = self.held.pop(batch_id, None)
            if held is not None:
                await self._forward(held)
        FAILOVERS.labels(switch.to_provider, switch.reason).inc()
        self.ctx.log.info(
            "source_changed",
            symbol=switch.symbol,
            source_from=switch.from_provider,
            source_to=switch.to_provider,
            reason=switch.reason,
        )
        event = Failover(
            switch.at_ns, switch.symbol, switch.from_provider, switch.to_provider, switch.reason
        )
        await publish_event(self.ctx.publisher, event)

    async def _timer(self) -> None:
        """Detect silent sources and due failbacks by the clock, not by the next batch."""
        while True:
            await asyncio.sleep(_TIMER_S)
            async with self.lock:
                now = time.time_ns()
                switches = self.selector.tick(now)
                for switch in switches:
                    await self._switched(switch)
                # The selector forgets a backup's batches after the detection time; so do we.
                horizon = now - self.selector.detect_ns - 1_000_000_000
                for batch_id in [i for i, h in self.held.items() if h.arrived_ns < horizon]:
                    del self.held[batch_id]
                if switches:
                    await self.ctx.publisher.flush()

    async def _health_changed(self, provider: str) -> None:
        reason = self.health.down_reason(provider)
        if self.down.get(provider) == reason:
            return  # a progress report, not a change
        self.down[provider] = reason
        PROVIDERS_DOWN.labels(provider).set(0 if reason is None else 1)
        async with self.lock:
            if reason is None:
                self.selector.mark_up(provider)
                return
            self.ctx.log.warning("provider_down", provider=provider, reason=reason)
            for switch in self.selector.mark_down(provider, reason, time.time_ns()):
                await self._switched(switch)
            await self.ctx.publisher.flush()

    async def _watch_policy(self) -> None:
        """Follow the policy's `fallback`: order, strategy and timing change without a restart."""
        log = self.ctx.log
        async for _, policy in follow(self.state_kv, EffectivePolicy, log, names.POLICY_KEY):
            if policy is not None:
                async with self.lock:
                    self._apply(policy.fallback)
                log.info("policy", revision=policy.revision, fallback=policy.fallback.model_dump())

    async def _watch_circuits(self) -> None:
        pattern = names.CIRCUIT_PREFIX + "*"
        async for key, record in follow(self.state_kv, CircuitRecord, self.ctx.log, pattern):
            provider = key.removeprefix(names.CIRCUIT_PREFIX)
            if record is None:
                self.health.circuits.pop(provider, None)
            else:
                self.health.circuits[provider] = record.state
            await self._health_changed(provider)

    async def _watch_jobs(self) -> None:
        pattern = names.provider_state_key("*")
        async for key, record in follow(self.state_kv, ProviderState, self.ctx.log, pattern):
            if record is None:
                previous = self.health.jobs.pop(key, None)
                if previous is not None:
                    await self._health_changed(previous[0])
                continue
            self.health.jobs[key] = (record.provider, record.state)
            await self._health_changed(record.provider)
