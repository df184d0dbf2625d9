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

from nats.aio.msg import Msg
from prometheus_client import Counter, Gauge

from services.router.failover import FailoverSelector, Switch
from shared.bus.consumer import stream_sequence
from shared.bus.deadletter import dead_letter
from shared.bus.kv import follow
from shared.bus.publisher import publish_event
from shared.config import EffectivePolicy, FallbackConfig, local_policy
from shared.contract import names
from shared.contract.codec import JSON, Codec, DecodeError
from shared.contract.events import Failover
from shared.contract.messages import TickBatch
from shared.contract.records import CircuitRecord, CircuitState, JobState, ProviderState
from shared.runtime import Context
from shared.settings import Settings

TICKS_ROUTED = Counter("router_ticks_routed_total", "Ticks forwarded to md.quotes", ["provider"])
TICKS_NOT_SELECTED = Counter(
    "router_ticks_not_selected_total", "Ticks of a provider not chosen for the symbol", ["provider"]
)
FAILOVERS = Counter(
    "router_source_changes_total",
    "Per-symbol source changes, by new source",
    ["provider", "reason"],
)
PROVIDERS_DOWN = Gauge(
    "router_provider_down", "1 while KV says a provider cannot serve (circuit, jobs)", ["provider"]
)
_TIMER_S = 0.1  # how often silence is checked: a small fraction of the detection time

# Event times before 1990, after now + 1 day, or more than 5 minutes ahead of their own
# receive time are absurd: one such tick would drag its symbol's watermark into the future.
_MIN_TS = 631_152_000_000_000_000
_MAX_FUTURE_NS = 86_400_000_000_000
_MAX_AHEAD_OF_RECV_NS = 300_000_000_000


class Rejected(ValueError):
    """A message that must go to the dead-letter queue, with a reason class for the metric."""

    def __init__(self, reason: str, reason_class: str) -> None:
        super().__init__(reason)
        self.reason_class = reason_class


def validate_batch(batch: TickBatch, subject: str, end_of_stream: bool) -> None:
    """Raise Rejected unless the batch is consistent with its subject and its values are sane."""
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
    hi = time.time_ns() + _MAX_FUTURE_NS
    for tick in batch.ticks:
        if not _MIN_TS <= tick.ts <= hi or tick.ts - tick.recv > _MAX_AHEAD_OF_RECV_NS:
            raise Rejected(
                f"absurd event time {tick.ts} ns (receive time {tick.recv} ns, seq {tick.seq})",
                "timestamp",
            )
        if not (math.isfinite(tick.price) and math.isfinite(tick.size)):
            raise Rejected(
                f"non-finite price or size ({tick.price}, {tick.size}) at seq {tick.seq}", "value"
            )


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

    async def start(self, ctx: Context) -> None:
        """Follow the policy and the providers' health, start the timer, consume `md.raw.>`."""
        self.ctx = ctx
        self.state_kv = await ctx.js.key_value(names.KV_STATE)
        ctx.spawn(self._watch_policy(), "policy")
        ctx.spawn(self._watch_circuits(), "circuits")
        ctx.spawn(self._watch_jobs(), "job-states")
        ctx.spawn(self._timer(), "failover-timer")
        await ctx.consume(names.STREAM_RAW, "router", [names.RAW_ALL], self.handle)

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
        try:
            batch = self.codec.decode(msg.data, headers)
            validate_batch(batch, msg.subject, eos)
        except DecodeError as exc:
            await dead_letter(self.ctx.publisher, self.name, msg, f"undecodable: {exc}", "decode")
            return
        except Rejected as exc:
            await dead_letter(self.ctx.publisher, self.name, msg, str(exc), exc.reason_class)
            return
        raw_id = headers.get(names.MSG_ID) or f"{names.STREAM_RAW}:{stream_sequence(msg)}"
        out_headers = {
            names.CONTENT_TYPE: headers.get(names.CONTENT_TYPE, JSON),
            names.MSG_ID: names.quote_id(raw_id),
        }
        for key in names.FORWARDED:
            if key in headers:
                out_headers[key] = headers[key]
        # The payload is forwarded as received: validated above, never re-encoded.
        held = _Held(batch.symbol, msg.data, out_headers, now)
        if not batch.ticks:  # an end-of-stream marker: it follows its source's ticks or none
            if self.selector.chosen(batch.symbol) in (None, batch.provider):
                await self._forward(held)
            return
        stamps = [tick.ts for tick in batch.ticks]
        decision = self.selector.observe(
            batch.symbol,
            batch.provider,
            raw_id,
            min(stamps),
            max(stamps),
            batch.ticks[-1].recv,
            now,
        )
        self.held[raw_id] = held
        for batch_id in decision.forward:
            await self._forward(self.held.pop(batch_id))
        if decision.switch is not None:
            await self._switched(decision.switch)
        if raw_id in self.held:
            TICKS_NOT_SELECTED.labels(batch.provider).inc(len(batch.ticks))
        else:
            TICKS_ROUTED.labels(batch.provider).inc(len(batch.ticks))

    async def _forward(self, held: _Held) -> None:
        await self.ctx.publisher.publish(names.quotes(held.symbol), held.data, held.headers)

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
