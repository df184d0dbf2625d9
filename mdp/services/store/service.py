"""The store: bar batches in, idempotent rows out; acks only after the commit.

Two inputs, both from the work-queue stream `STORE_SYNC`:
- `store.sync.bus` (policy `store_sync.mode: bus`): written here, one transaction per pulled
  group;
- `store.sync.http` (mode `http`): each batch POSTed to the policy's `store_sync.http_url`, by
  default this process's own ingest API (`POST /v1/bars`, see `mdp/services/store/http.py`), and
  acknowledged only after a 2xx; anything else is retried with backoff (a batch the target
  refuses for good, a 400, is dead-lettered instead).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import ClassVar

import aiohttp
import msgspec
from nats.aio.msg import Msg
from nats.js.api import AckPolicy
from prometheus_client import Counter, Histogram

from mdp.services.store.http import (
    INGEST_PATH,
    Forwarder,
    IngestApi,
    Rejected,
    RetryableForwardError,
)
from mdp.services.store.invariants import split_bars
from mdp.services.store.timescale import Aging
from mdp.services.store.writers import (
    BarWriter,
    InvalidBarError,
    StoreError,
    StoreUnavailableError,
    open_writer,
)
from mdp.shared.bus.consumer import stream_sequence, timestamp_ns
from mdp.shared.bus.deadletter import dead_letter, dead_letter_payload
from mdp.shared.bus.kv import follow
from mdp.shared.bus.publisher import publish_event
from mdp.shared.config import EffectivePolicy
from mdp.shared.contract import names
from mdp.shared.contract.codec import JSON, Codec, DecodeError, encode
from mdp.shared.contract.messages import Bar, BarBatch, EndOfStream
from mdp.shared.contract.records import ServiceUrl
from mdp.shared.runtime import Context
from mdp.shared.settings import Settings

FORWARD_CONCURRENCY = 8

ROWS_STORED = Counter("mdp_store_rows_written_total", "Bar rows upserted (revisions included)")
BATCHES_STORED = Counter("mdp_store_batches_committed_total", "Bar batches committed")
WRITE_SECONDS = Histogram("mdp_store_write_seconds", "Time to commit one group of batches")
WRITE_ERRORS = Counter(
    "mdp_store_write_errors_total",
    "Write attempts that failed and will be retried (unavailable: no connection; error: other)",
    ["kind"],
)
PUBLISH_TO_STORE = Histogram(
    "mdp_store_publish_to_store_seconds",
    "Commit (bus) or 2xx (http) time minus the time JetStream stored the bar batch",
    ["mode"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)


def observe_publish_to_store(mode: str, msgs: list[Msg]) -> None:
    """Observe each batch's publish-to-store latency as of now."""
    now, child = time.time_ns(), PUBLISH_TO_STORE.labels(mode)
    for msg in msgs:
        with contextlib.suppress(Exception):  # a message without JetStream metadata
            child.observe(max(0.0, (now - timestamp_ns(msg)) / 1e9))


class StoreService:
    """Consumes bar batches and writes them in one transaction per pulled group."""

    name: ClassVar[str] = "store"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.codec = Codec(BarBatch)
        self.http_settings = settings.store
        store = settings.store
        aging = Aging.of(store.chunk_hours, store.compress_after_days, store.retention_days)
        self.writer: BarWriter = open_writer(
            settings.store_url, timeout_s=store.write_timeout_s, aging=aging
        )
        # One writer for both inputs: commits are serialised so they never interleave.
        self.write_lock = asyncio.Lock()
        self.policy = EffectivePolicy()
        self.api: IngestApi | None = None
        self.session: aiohttp.ClientSession | None = None

    async def start(self, ctx: Context) -> None:
        """Open the database and the ingest API, then start consuming both subjects."""
        self.ctx = ctx
        await self.writer.open()
        self.state_kv = await ctx.js.key_value(names.KV_STATE)
        with contextlib.suppress(Exception):  # no policy yet: the defaults until control writes
            entry = await self.state_kv.get(names.POLICY_KEY)
            if entry.value:
                self.policy = EffectivePolicy.model_validate_json(entry.value)
        ctx.spawn(self._watch_policy(), "policy")
        self.api = IngestApi(self._write, self.http_settings, ctx.log)
        base_url = await self.api.start()
        with contextlib.suppress(Exception):  # discovery aid only
            await self.state_kv.put(
                names.HTTP_STORE_KEY, msgspec.json.encode(ServiceUrl(base_url + INGEST_PATH))
            )
        ctx.log.info("http_listening", url=base_url + INGEST_PATH)
        self.session = aiohttp.ClientSession()
        self.forwarder = Forwarder(self.session)
        sync, explicit = names.STREAM_STORE_SYNC, AckPolicy.EXPLICIT
        await ctx.consume(
            sync, "store-writer", [names.STORE_SYNC_BUS], self.handle, batch=32, ack=explicit
        )
        await ctx.consume(
            sync,
            "store-http-forwarder",
            [names.STORE_SYNC_HTTP],
            self.forward,
            batch=32,
            ack=explicit,
        )

    async def stop(self) -> None:
        """Close the API and the database (the runtime stopped both consumers first)."""
        if self.api is not None:
            await self.api.stop()
        if self.session is not None:
            await self.session.close()
        await self.writer.close()

    async def handle(self, msgs: list[Msg]) -> None:
        """Write every bar of the pulled batches in one transaction, then report completions."""
        batches: list[tuple[Msg, list[Bar]]] = []
        markers: list[str] = []
        for msg in msgs:
            headers = msg.headers or {}
            try:
                batch = self.codec.decode(msg.data, headers)
            except DecodeError as exc:
                await dead_letter(self.ctx.publisher, self.name, msg, str(exc), "decode")
                continue
            batches.append((msg, await self._valid_bars(msg, batch)))
            if names.END_OF_STREAM in headers:
                markers.append(headers[names.END_OF_STREAM])
        try:
            await self._write([bar for _, bars in batches for bar in bars])
        except InvalidBarError:
            # One bad batch must not hold back the others: write them one by one.
            for msg, bars in batches:
                try:
                    await self._write(bars)
                except InvalidBarError as exc:
                    await dead_letter(self.ctx.publisher, self.name, msg, str(exc), "value")
        BATCHES_STORED.inc(len(msgs))
        observe_publish_to_store("bus", [msg for msg, bars in batches if bars])
        await self._completed(markers)

    async def _valid_bars(self, msg: Msg, batch: BarBatch) -> list[Bar]:
        """The bars of `batch` that keep the bar invariants; each other one is dead-lettered."""
        good, bad = split_bars(batch.bars)
        if not bad:
            return batch.bars
        seq = 0
        with contextlib.suppress(Exception):  # a message without JetStream metadata
            seq = stream_sequence(msg)
        for index, bar, reason in bad:
            # One dead letter per bar, so its id is the message's with the bar's place in it.
            msg_id = names.dead_part_id(self.name, msg.subject, seq, index)
            body, headers = encode(bar), {names.CONTENT_TYPE: JSON}
            await dead_letter_payload(
                self.ctx.publisher, self.name, msg.subject, body, headers, reason, "invalid_bar",
                msg_id,
            )  # fmt: skip
            self.ctx.log.warning(
                "bar_dead_lettered", batch_id=batch.batch_id, bar=bar.bar_id, reason=reason
            )
        return good

    async def _completed(self, markers: list[str]) -> None:
        for header in markers:
            # Everything before the marker is committed: say so, for `mdp replay` and others.
            try:
                marker = msgspec.json.decode(header, type=EndOfStream)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                self.ctx.log.error("bad_end_of_stream", marker=header[:200], error=str(exc))
                continue
            msg_id = names.completed_id(marker.run, marker.symbol)
            await publish_event(self.ctx.publisher, marker, msg_id)
        await self.ctx.publisher.flush()

    async def forward(self, msgs: list[Msg]) -> None:
        """POST every batch of the group; raise (so the group is retried) unless all got 2xx."""
        store_sync = self.policy.store_sync
        own = not store_sync.http_url
        url = store_sync.http_url or (self.api.url + INGEST_PATH if self.api else "")
        # Our own token goes only to our own API; a third-party URL gets the forward token.
        token = self.http_settings.http_token if own else self.http_settings.forward_token
        markers: list[str] = []
        sends: list[tuple[Msg, str, bytes]] = []
        for msg in msgs:
            headers = msg.headers or {}
            try:
                batch = self.codec.decode(msg.data, headers)
            except DecodeError as exc:
                await dead_letter(self.ctx.publisher, self.name, msg, str(exc), "decode")
                continue
            if names.END_OF_STREAM in headers:
                markers.append(headers[names.END_OF_STREAM])
            bars = await self._valid_bars(msg, batch)
            if not bars:
                continue  # an end-of-stream carrier, or nothing valid: nothing to post
            is_json = headers.get(names.CONTENT_TYPE, JSON).startswith(JSON)
            if bars is batch.bars and is_json:
                body = msg.data
            else:  # re-encoded without the bars just dead-lettered
                body = encode(BarBatch(batch.batch_id, bars), JSON)
            sends.append((msg, batch.batch_id, body))
        limit = asyncio.Semaphore(FORWARD_CONCURRENCY)

        async def send(item: tuple[Msg, str, bytes]) -> Rejected | None:
            async with limit:
                return await self.forwarder.post(
                    url, item[1], item[2], token, store_sync.http_timeout_seconds
                )

        results = await asyncio.gather(*(send(item) for item in sends), return_exceptions=True)
        retry = [r for r in results if isinstance(r, BaseException)]
        for (msg, _batch_id, _body), result in zip(sends, results, strict=True):
            if isinstance(result, Rejected):
                await dead_letter(self.ctx.publisher, self.name, msg, result.reason, "http")
        if retry:
            # The 2xx ones are done; the upsert makes posting them again harmless.
            first = retry[0]
            if not isinstance(first, RetryableForwardError):
                raise first
            raise RetryableForwardError(f"{len(retry)} of {len(sends)} batches: {first}")
        posted = [item[0] for item, r in zip(sends, results, strict=True) if r is None]
        observe_publish_to_store("http", posted)
        await self._completed(markers)

    async def _watch_policy(self) -> None:
        """Follow the policy control publishes (the forwarding URL and timeout)."""
        async for _, policy in follow(
            self.state_kv, EffectivePolicy, self.ctx.log, names.POLICY_KEY
        ):
            if policy is None:
                continue
            self.policy = policy
            self.ctx.log.info(
                "policy",
                revision=policy.revision,
                store_sync=policy.store_sync.model_dump(),
            )

    async def _write(self, bars: list[Bar]) -> None:
        if not bars:
            return
        async with self.write_lock:
            started = time.perf_counter()
            try:
                await self.writer.write(bars)
            except StoreError as exc:
                # The caller retries (the bus path with backoff, an HTTP client after a 503).
                WRITE_ERRORS.labels(
                    "unavailable" if isinstance(exc, StoreUnavailableError) else "error"
                ).inc()
                raise
            WRITE_SECONDS.observe(time.perf_counter() - started)
        ROWS_STORED.inc(len(bars))
