"""The aggregator: `md.quotes.>` in, bars out on `md.bars.*` and in batches to the store."""

from __future__ import annotations

import asyncio
import time
from typing import ClassVar

import msgspec
from nats.aio.msg import Msg
from prometheus_client import Counter

from services.aggregator.bars import BarEngine, Emitted
from services.aggregator.batcher import BarBatcher
from shared import subjects
from shared.bus import (
    CLOCK_RATE,
    DLQ_REASON,
    DLQ_SERVICE,
    END_OF_STREAM,
    MSG_ID,
    PullConsumer,
    dead_letter,
)
from shared.codec import CONTENT_TYPE, JSON, Codec, DecodeError, encode
from shared.runtime import Context
from shared.schemas import BarBatch, EndOfStream, TickBatch
from shared.settings import Settings

BARS_EMITTED = Counter(
    "aggregator_bars_emitted_total", "Bars published (revisions included)", ["interval"]
)
BATCHES_SENT = Counter("aggregator_batches_total", "Bar batches sent towards the store", ["mode"])
LATE_TICKS = Counter(
    "late_ticks_total", "Ticks beyond the revise window, dead-lettered", ["symbol"]
)
TICKS_AGGREGATED = Counter("aggregator_ticks_total", "Ticks folded into bars")


class AggregatorService:
    """Folds ticks into event-time bars; publishes closed bars and batches them to the store."""

    name: ClassVar[str] = "aggregator"

    def __init__(self, settings: Settings) -> None:
        cfg = settings.aggregator
        self.settings = settings
        self.engine = BarEngine(
            cfg.intervals,
            grace_ns=cfg.grace_ms * 1_000_000,
            revise_window_ns=int(cfg.revise_window_s * 1e9),
            price_type=cfg.price_type,
        )
        self.batcher = BarBatcher(
            cfg.batch_max_rows, cfg.batch_max_bytes, cfg.batch_max_delay_ms * 1_000_000
        )
        self.codec = Codec(TickBatch)
        self.lock = asyncio.Lock()
        mode = cfg.store_sync_mode
        self.sync_subject = {"bus": subjects.STORE_SYNC_BUS, "http": subjects.STORE_SYNC_HTTP}.get(
            mode
        )

    async def start(self, ctx: Context) -> None:
        """Start consuming `md.quotes.>` and the closing timer."""
        self.ctx = ctx
        self.consumer = PullConsumer(
            ctx.nc, ctx.js, "MD_QUOTES", "aggregator", [subjects.QUOTES_ALL], self.handle, ctx.log
        )
        await self.consumer.ensure()
        await self.consumer.start()
        ctx.spawn(self._timer(), "close-timer")

    async def stop(self) -> None:
        """Stop consuming, then send what the batcher holds."""
        await self.consumer.stop()
        async with self.lock:
            await self._send_batches(self.batcher.flush())
            await self.ctx.publisher.flush()

    async def handle(self, msgs: list[Msg]) -> None:
        """Fold one pulled batch; returns once every output is stored by its stream."""
        async with self.lock:
            for msg in msgs:
                await self._handle_one(msg)
            await self._send_batches(self.batcher.due(time.monotonic_ns()))
            await self.ctx.publisher.flush()

    async def _handle_one(self, msg: Msg) -> None:
        headers = msg.headers or {}
        try:
            batch = self.codec.decode(msg.data, headers)
            clock_rate = float(headers.get(CLOCK_RATE, "1"))
        except (DecodeError, ValueError) as exc:
            await dead_letter(self.ctx.publisher, self.name, msg, f"undecodable: {exc}", "decode")
            return
        eos_header = headers.get(END_OF_STREAM)
        if batch.ticks:
            emitted = self.engine.on_ticks(
                batch.symbol, batch.provider, batch.ticks, time.time_ns(), clock_rate
            )
            TICKS_AGGREGATED.inc(len(batch.ticks))
            await self._emit(emitted, msg)
        if eos_header is not None:
            await self._end_of_stream(batch.symbol, eos_header, msg)

    async def _end_of_stream(self, symbol: str, header: str, msg: Msg) -> None:
        try:
            marker = msgspec.json.decode(header, type=EndOfStream)
        except msgspec.DecodeError as exc:
            await dead_letter(self.ctx.publisher, self.name, msg, f"bad marker: {exc}", "decode")
            return
        await self._emit(self.engine.end_of_stream(symbol), msg)
        # The bounded stream is over: a later run of the same symbol starts afresh.
        self.engine.forget(symbol)
        await self._send_batches(self.batcher.flush())
        if self.sync_subject is None:
            return
        # An empty batch carries the marker: the store reports completion once it is reached.
        headers = {
            CONTENT_TYPE: JSON,
            MSG_ID: f"eos:{marker.run}:{subjects.escape_symbol(symbol)}",
            END_OF_STREAM: header,
        }
        body = encode(BarBatch(f"eos:{marker.run}:{symbol}", []))
        await self.ctx.publisher.publish(self.sync_subject, body, headers)

    async def _emit(self, emitted: Emitted, msg: Msg | None) -> None:
        ctx = self.ctx
        content_type = ctx.settings.content_type
        now = time.monotonic_ns()
        for bar in emitted.bars:
            body = encode(bar, content_type)
            headers = {CONTENT_TYPE: content_type, MSG_ID: bar.bar_id}
            await ctx.publisher.publish(subjects.bars(bar.interval, bar.symbol), body, headers)
            BARS_EMITTED.labels(bar.interval).inc()
            if self.sync_subject is not None:
                await self._send_batches(self.batcher.add(bar, len(body), now))
        for invalid in emitted.invalid:
            body = msgspec.json.encode({"symbol": invalid.symbol, "tick": invalid.tick})
            headers = {
                CONTENT_TYPE: JSON,
                MSG_ID: f"invalid:{invalid.symbol}:{invalid.tick.seq}:{invalid.tick.ts}",
                DLQ_REASON: invalid.reason,
                DLQ_SERVICE: self.name,
            }
            await ctx.publisher.publish(subjects.dlq(self.name), body, headers)
        for late in emitted.late:
            LATE_TICKS.labels(late.symbol).inc()
            body = msgspec.json.encode(
                {"symbol": late.symbol, "interval": late.interval, "tick": late.tick}
            )
            headers = {
                CONTENT_TYPE: JSON,
                MSG_ID: f"late:{late.interval}:{late.symbol}:{late.tick.seq}:{late.tick.ts}",
                DLQ_REASON: late.reason,
                DLQ_SERVICE: self.name,
            }
            await ctx.publisher.publish(subjects.dlq(self.name), body, headers)

    async def _send_batches(self, batches: list[BarBatch]) -> None:
        if self.sync_subject is None:
            return
        ctx = self.ctx
        for batch in batches:
            body = encode(batch, ctx.settings.content_type)
            headers = {CONTENT_TYPE: ctx.settings.content_type, MSG_ID: f"batch:{batch.batch_id}"}
            await ctx.publisher.publish(self.sync_subject, body, headers)
            BATCHES_SENT.labels(self.settings.aggregator.store_sync_mode).inc()

    async def _timer(self) -> None:
        """Close idle symbols' bars by the wall clock and send batches that waited long enough."""
        while True:
            await asyncio.sleep(0.05)
            async with self.lock:
                await self._emit(self.engine.advance(time.time_ns()), None)
                await self._send_batches(self.batcher.due(time.monotonic_ns()))
