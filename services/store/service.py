"""The store: `store.sync.bus` in, idempotent rows out; acks only after the commit."""

from __future__ import annotations

import time
from typing import ClassVar

from nats.aio.msg import Msg
from nats.js.api import AckPolicy
from prometheus_client import Counter, Histogram

from services.store.writers import BarWriter, InvalidBarError, open_writer
from shared import subjects
from shared.bus import END_OF_STREAM, MSG_ID, PullConsumer, dead_letter
from shared.codec import CONTENT_TYPE, JSON, Codec, DecodeError
from shared.runtime import Context
from shared.schemas import Bar, BarBatch
from shared.settings import Settings

ROWS_STORED = Counter("store_rows_written_total", "Bar rows upserted (revisions included)")
BATCHES_STORED = Counter("store_batches_total", "Bar batches committed")
WRITE_SECONDS = Histogram("store_write_seconds", "Time to commit one group of batches")


class StoreService:
    """Consumes bar batches and writes them in one transaction per pulled group."""

    name: ClassVar[str] = "store"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.codec = Codec(BarBatch)
        self.writer: BarWriter = open_writer(settings.store_url)

    async def start(self, ctx: Context) -> None:
        """Open the database, then start consuming."""
        self.ctx = ctx
        await self.writer.open()
        self.consumer = PullConsumer(
            ctx.nc,
            ctx.js,
            "STORE_SYNC",
            "store-writer",
            [subjects.STORE_SYNC_BUS],
            self.handle,
            ctx.log,
            batch=32,
            ack_policy=AckPolicy.EXPLICIT,
        )
        await self.consumer.ensure()
        await self.consumer.rewind()
        await self.consumer.start()

    async def stop(self) -> None:
        """Finish the group in hand and close the database."""
        await self.consumer.stop()
        await self.writer.close()

    async def handle(self, msgs: list[Msg]) -> None:
        """Write every bar of the pulled batches in one transaction, then report completions."""
        batches: list[tuple[Msg, BarBatch]] = []
        markers: list[str] = []
        for msg in msgs:
            headers = msg.headers or {}
            try:
                batches.append((msg, self.codec.decode(msg.data, headers)))
            except DecodeError as exc:
                await dead_letter(self.ctx.publisher, self.name, msg, str(exc), "decode")
                continue
            if END_OF_STREAM in headers:
                markers.append(headers[END_OF_STREAM])
        try:
            await self._write([bar for _, batch in batches for bar in batch.bars])
        except InvalidBarError:
            # One bad batch must not hold back the others: write them one by one.
            for msg, batch in batches:
                try:
                    await self._write(batch.bars)
                except InvalidBarError as exc:
                    await dead_letter(self.ctx.publisher, self.name, msg, str(exc), "value")
        BATCHES_STORED.inc(len(msgs))
        for marker in markers:
            # Everything before the marker is committed: say so, for `mdp replay` and others.
            await self.ctx.publisher.publish(
                subjects.event("completed"),
                marker.encode(),
                {CONTENT_TYPE: JSON, MSG_ID: "completed:" + marker},
            )
        await self.ctx.publisher.flush()

    async def _write(self, bars: list[Bar]) -> None:
        if not bars:
            return
        started = time.perf_counter()
        await self.writer.write(bars)
        WRITE_SECONDS.observe(time.perf_counter() - started)
        ROWS_STORED.inc(len(bars))
