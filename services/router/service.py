"""The router: `md.raw.>` in, one source per symbol out on `md.quotes.<sym>`."""

from __future__ import annotations

import math
import time
from typing import ClassVar

from nats.aio.msg import Msg
from prometheus_client import Counter

from services.router.routing import SourceSelector
from shared.bus.consumer import stream_sequence
from shared.bus.deadletter import dead_letter
from shared.bus.publisher import publish_event
from shared.contract import names
from shared.contract.codec import JSON, Codec, DecodeError
from shared.contract.events import Failover
from shared.contract.messages import TickBatch
from shared.runtime import Context
from shared.settings import Settings

TICKS_ROUTED = Counter("router_ticks_routed_total", "Ticks forwarded to md.quotes", ["provider"])
TICKS_NOT_SELECTED = Counter(
    "router_ticks_not_selected_total", "Ticks of a provider not chosen for the symbol", ["provider"]
)
FAILOVERS = Counter("router_source_changes_total", "Per-symbol source changes", ["provider"])

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


class RouterService:
    """Validates raw tick batches, picks one provider per symbol, forwards its batches."""

    name: ClassVar[str] = "router"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.selector = SourceSelector(
            settings.router.source_order, int(settings.router.stale_after_s * 1e9)
        )
        self.codec = Codec(TickBatch)

    async def start(self, ctx: Context) -> None:
        """Start consuming `md.raw.>`."""
        self.ctx = ctx
        await ctx.consume(names.STREAM_RAW, "router", [names.RAW_ALL], self.handle)

    async def stop(self) -> None:
        """Nothing to flush: the runtime stops the consumer and awaits every publish."""

    async def handle(self, msgs: list[Msg]) -> None:
        """Route one pulled batch; returns once every forward is stored in MD_QUOTES."""
        ctx = self.ctx
        now = time.time_ns()
        for msg in msgs:
            headers = msg.headers or {}
            eos = names.END_OF_STREAM in headers
            try:
                batch = self.codec.decode(msg.data, headers)
                validate_batch(batch, msg.subject, eos)
            except DecodeError as exc:
                await dead_letter(ctx.publisher, self.name, msg, f"undecodable: {exc}", "decode")
                continue
            except Rejected as exc:
                await dead_letter(ctx.publisher, self.name, msg, str(exc), exc.reason_class)
                continue
            forward, changed = self.selector.observe(batch.symbol, batch.provider, now)
            if changed is not None:
                FAILOVERS.labels(changed).inc()
                await self._source_changed(batch.symbol, changed)
            if not forward:
                TICKS_NOT_SELECTED.labels(batch.provider).inc(len(batch.ticks))
                continue
            raw_id = headers.get(names.MSG_ID) or f"{names.STREAM_RAW}:{stream_sequence(msg)}"
            out_headers = {
                names.CONTENT_TYPE: headers.get(names.CONTENT_TYPE, JSON),
                names.MSG_ID: names.quote_id(raw_id),
            }
            for key in names.FORWARDED:
                if key in headers:
                    out_headers[key] = headers[key]
            # The payload is forwarded as received: validated above, never re-encoded.
            await ctx.publisher.publish(names.quotes(batch.symbol), msg.data, out_headers)
            TICKS_ROUTED.labels(batch.provider).inc(len(batch.ticks))
        await ctx.publisher.flush()

    async def _source_changed(self, symbol: str, provider: str) -> None:
        await publish_event(self.ctx.publisher, Failover(time.time_ns(), symbol, None, provider))
