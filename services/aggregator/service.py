"""The aggregator: `md.quotes.>` in, bars out on `md.bars.*` and in batches to the store.

Crash safety (checkpoint and rewind): for every pulled group of messages the aggregator folds
the ticks, publishes what they produced (bars with `interval:symbol:start:rev` ids, full store
batches) and waits for every PubAck, then writes a checkpoint (the engine, the bars still
waiting in the batchers, the last input sequence) with compare-and-swap, and only then acks the
input. A restart restores the checkpoint and rewinds the consumer to the sequence after it, so
nothing is lost; anything published twice carries the same id, and the store upserts. A lease
keeps a second instance of the same consumer in standby, and the compare-and-swap on the
checkpoint fences off a zombie that lost it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
import zlib
from typing import ClassVar

import msgspec
from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from prometheus_client import Counter

from services.aggregator.bars import BarEngine, Emitted
from services.aggregator.batcher import BarBatcher
from services.aggregator.dedup import SeenSeqs
from services.aggregator.gaps import GapDetector
from shared.bus.consumer import PullConsumer, StopConsuming, stream_sequence
from shared.bus.deadletter import dead_letter
from shared.bus.kv import follow
from shared.bus.publisher import publish_event
from shared.config import EffectivePolicy, StoreSyncConfig
from shared.contract import names
from shared.contract.codec import JSON, Codec, DecodeError, encode
from shared.contract.control import JobSpec
from shared.contract.events import Gap, Suppressed
from shared.contract.messages import Bar, BarBatch, DeadTick, EndOfStream, Tick, TickBatch
from shared.lease import Lease, LeaseLost
from shared.runtime import Context
from shared.settings import Settings

BARS_EMITTED = Counter(
    "aggregator_bars_emitted_total", "Bars published (revisions included)", ["interval"]
)
BATCHES_SENT = Counter("aggregator_batches_total", "Bar batches sent towards the store", ["mode"])
SUPPRESSED = Counter(
    "aggregator_writes_suppressed_total", "Bar batches kept from the store", ["reason"]
)
LATE_TICKS = Counter(
    "late_ticks_total", "Ticks beyond the revise window, dead-lettered", ["symbol"]
)
DUPLICATE_TICKS = Counter(
    "aggregator_duplicate_ticks_total", "Ticks dropped as already seen (same run and seq)"
)
TICKS_AGGREGATED = Counter("aggregator_ticks_total", "Ticks folded into bars")

# Past this many waiting bars a checkpoint sends the batch first, to keep checkpoints small.
CHECKPOINT_MAX_PENDING = 2000


class Checkpoint(msgspec.Struct):
    """Everything needed to resume exactly: see the module docstring."""

    last_seq: int
    engine: bytes
    pending: list[Bar]
    suppressed: dict[str, list[Bar]]
    sources: dict[str, SeenSeqs]
    dry_run: list[str]
    waiting_eos: dict[str, str] = {}
    gaps: bytes = b""


def encode_checkpoint(checkpoint: Checkpoint) -> bytes:
    """msgpack, compressed: the retained bars of many symbols compress several times over."""
    return zlib.compress(msgspec.msgpack.encode(checkpoint), 1)


def decode_checkpoint(data: bytes) -> Checkpoint:
    """Inverse of `encode_checkpoint`."""
    return msgspec.msgpack.decode(zlib.decompress(data), type=Checkpoint)


class Fenced(StopConsuming):
    """Another instance owns this consumer now: stop without acking anything."""


class AggregatorService:
    """Folds ticks into event-time bars; publishes closed bars and batches them to the store."""

    name: ClassVar[str] = "aggregator"

    def __init__(self, settings: Settings) -> None:
        cfg = settings.aggregator
        self.settings = settings
        self.engine = self._new_engine()
        self.batcher = self._new_batcher()
        self.suppressed: dict[str, BarBatcher] = {}
        self.codec = Codec(TickBatch)
        self.lock = asyncio.Lock()
        self.policy = EffectivePolicy(store_sync=StoreSyncConfig(mode=cfg.store_sync_mode))
        self.dry_run: set[str] = set()
        # Per symbol, which ticks of the current provider run were folded: a provider that
        # resumes after a crash may send some again, in differently cut batches.
        self.sources: dict[str, SeenSeqs] = {}
        self.waiting_eos: dict[str, str] = {}  # end-of-stream markers waiting for late ticks
        self.gaps = self._new_gaps()
        self.jobs: dict[str, JobSpec] = {}
        self.last_seq = 0
        self.partition = cfg.partition
        self.durable = "aggregator" if cfg.partition is None else f"aggregator-p{cfg.partition}"
        self.checkpoint_key = names.checkpoint_key(self.durable)
        self.revision = 0
        self.dirty = False
        self.attempted = b""  # the last checkpoint we tried to write
        self._pending_notices: list[Suppressed] = []
        host = socket.gethostname()
        self.instance = f"{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"

    def _new_engine(self) -> BarEngine:
        cfg = self.settings.aggregator
        return BarEngine(
            cfg.intervals,
            grace_ns=cfg.grace_ms * 1_000_000,
            revise_window_ns=int(cfg.revise_window_s * 1e9),
            price_type=cfg.price_type,
        )

    def _new_gaps(self) -> GapDetector | None:
        cfg = self.settings.aggregator
        if not cfg.gap_intervals:
            return None
        return GapDetector(cfg.gap_interval or cfg.intervals[0], cfg.gap_intervals)

    def _new_batcher(self) -> BarBatcher:
        cfg = self.settings.aggregator
        return BarBatcher(
            cfg.batch_max_rows, cfg.batch_max_bytes, cfg.batch_max_delay_ms * 1_000_000
        )

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self, ctx: Context) -> None:
        """Become active in the background: a second instance waits there as a standby."""
        self.ctx = ctx
        self.kv = await ctx.js.key_value(names.KV_CHECKPOINTS)
        self.state_kv = await ctx.js.key_value(names.KV_STATE)
        self.lease = Lease(self.kv, names.lease_key(self.durable), self.instance, log=ctx.log)
        self.active = asyncio.Event()
        ctx.spawn(self._activate(), "activate")

    async def _activate(self) -> None:
        """Take the lease, restore the checkpoint, rewind, then consume (retrying outages)."""
        backoff = 0.5
        while not self.ctx.stopping.is_set():
            try:
                await self._become_active()
                return
            except Exception as exc:  # e.g. a timeout while the cluster elects a leader
                self.ctx.log.warning("activation_retry", error=repr(exc), retry_in_s=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)

    async def _become_active(self) -> None:
        ctx = self.ctx
        if not await self.lease.acquire(ctx.stopping):
            return
        self.engine, self.batcher, self.suppressed = self._new_engine(), self._new_batcher(), {}
        self.revision, self.last_seq = 0, 0
        await self._restore()
        self.consumer = PullConsumer(
            ctx.nc,
            ctx.js,
            names.STREAM_QUOTES,
            self.durable,
            [names.quote_partition(self.partition)],
            self.handle,
            ctx.log,
        )
        await self.consumer.ensure()
        await self.consumer.rewind(self.last_seq + 1 if self.last_seq else None)
        await self.consumer.start()
        self.active.set()
        ctx.log.info("active", durable=self.durable, resume_after_seq=self.last_seq)
        ctx.spawn(self._keep_lease(), "lease")
        ctx.spawn(self._watch_policy(), "policy")
        if self.gaps is not None:
            ctx.spawn(self._watch_jobs(), "jobs")
        ctx.spawn(self._timer(), "close-timer")

    async def stop(self) -> None:
        """Stop consuming, checkpoint what is held, give the lease up."""
        if not self.active.is_set():
            return  # a standby holds nothing
        await self.consumer.stop()
        async with self.lock:
            with contextlib.suppress(Fenced):
                await self.ctx.publisher.flush()
                await self._checkpoint(force=True)
        await self.lease.release()

    # -- input ---------------------------------------------------------------------------------

    async def handle(self, msgs: list[Msg]) -> None:
        """Fold one pulled group; returns once its outputs and the checkpoint are durable."""
        async with self.lock:
            for msg in msgs:
                seq = stream_sequence(msg)
                if seq <= self.last_seq:
                    continue  # applied before a restart: the checkpoint has it
                await self._handle_one(msg)
                self.last_seq = seq
                self.dirty = True
            await self._send(self.batcher.due(time.monotonic_ns()))
            await self._send_suppressed(due=True)
            await self.ctx.publisher.flush()
            await self._checkpoint()

    async def _handle_one(self, msg: Msg) -> None:
        headers = msg.headers or {}
        try:
            batch = self.codec.decode(msg.data, headers)
            clock_rate = float(headers.get(names.CLOCK_RATE, "1"))
        except (DecodeError, ValueError) as exc:
            await dead_letter(self.ctx.publisher, self.name, msg, f"undecodable: {exc}", "decode")
            return
        if headers.get(names.DRY_RUN) == "1":
            self.dry_run.add(batch.symbol)
        else:
            self.dry_run.discard(batch.symbol)
        ticks = self._fresh_ticks(batch, headers.get(names.RUN, ""))
        if ticks:
            now = time.time_ns()
            emitted = self.engine.on_ticks(batch.symbol, batch.provider, ticks, now, clock_rate)
            TICKS_AGGREGATED.inc(len(ticks))
            await self._emit(emitted)
            if self.gaps is not None:
                await self._gap_events(self.gaps.on_ticks(batch.symbol, now))
        eos_header = headers.get(names.END_OF_STREAM)
        if eos_header is not None:
            self.waiting_eos[batch.symbol] = eos_header
        if batch.symbol in self.waiting_eos:
            await self._end_of_stream_if_complete(batch.symbol, msg)

    async def _end_of_stream_if_complete(self, symbol: str, msg: Msg) -> None:
        """Finish a symbol's bounded stream once every one of its ticks was folded.

        A tick batch retried after an outage can reach the stream after the marker; closing
        the bars before it arrived would store them without it.
        """
        header = self.waiting_eos[symbol]
        try:
            marker = msgspec.json.decode(header, type=EndOfStream)
        except msgspec.DecodeError as exc:
            del self.waiting_eos[symbol]
            await dead_letter(self.ctx.publisher, self.name, msg, f"bad marker: {exc}", "decode")
            return
        seen = self.sources.get(symbol)
        if seen is not None and seen.run == marker.run and seen.floor < marker.ticks:
            return  # some ticks are still on their way
        del self.waiting_eos[symbol]
        await self._end_of_stream(symbol, marker, header)

    def _fresh_ticks(self, batch: TickBatch, run: str) -> list[Tick]:
        """Drop ticks of this symbol's run already folded (a resumed provider may resend)."""
        if not run:
            return batch.ticks
        seen = self.sources.get(batch.symbol)
        if seen is None or seen.run != run:
            seen = self.sources[batch.symbol] = SeenSeqs(run)
        ticks, duplicates = seen.fresh(batch.ticks)
        if duplicates:
            DUPLICATE_TICKS.inc(duplicates)
        return ticks

    async def _end_of_stream(self, symbol: str, marker: EndOfStream, header: str) -> None:
        await self._emit(self.engine.end_of_stream(symbol))
        if self.gaps is not None:
            await self._gap_events(self.gaps.unsubscribe(symbol, time.time_ns()))
        # The bounded stream is over: a later run of the same symbol starts afresh.
        self.engine.forget(symbol)
        await self._send(self.batcher.flush())
        await self._send_suppressed(due=False)
        subject = names.STORE_SYNC.get(self.policy.store_sync.mode)
        if subject is None or symbol in self.dry_run or not self.policy.write_path.enabled:
            # No store will see the marker: announce completion here.
            msg_id = names.completed_id(marker.run, marker.symbol)
            await publish_event(self.ctx.publisher, marker, msg_id)
            return
        # An empty batch carries the marker: the store reports completion once it reaches it.
        headers = {
            names.CONTENT_TYPE: JSON,
            names.MSG_ID: names.end_of_stream_id(marker.run, symbol),
            names.END_OF_STREAM: header,
        }
        body = encode(BarBatch(f"eos:{marker.run}:{symbol}", []))
        await self.ctx.publisher.publish(subject, body, headers)

    # -- output --------------------------------------------------------------------------------

    def _suppression(self, symbol: str) -> str | None:
        if not self.policy.write_path.enabled:
            return "write_path_disabled"
        if symbol in self.dry_run:
            return "dry_run"
        return None

    async def _emit(self, emitted: Emitted) -> None:
        ctx = self.ctx
        content_type = ctx.settings.content_type
        now = time.monotonic_ns()
        to_store = self.policy.store_sync.mode in names.STORE_SYNC
        for bar in emitted.bars:
            body = encode(bar, content_type)
            headers = {
                names.CONTENT_TYPE: content_type,
                names.MSG_ID: bar.bar_id,
                names.PRODUCER: self.instance,
            }
            await ctx.publisher.publish(names.bars(bar.interval, bar.symbol), body, headers)
            BARS_EMITTED.labels(bar.interval).inc()
            if not to_store:
                continue
            reason = self._suppression(bar.symbol)
            if reason is None:
                await self._send(self.batcher.add(bar, len(body), now))
            else:
                batcher = self.suppressed.setdefault(reason, self._new_batcher())
                self._count_suppressed(reason, batcher.add(bar, len(body), now))
        for invalid in emitted.invalid:
            msg_id = names.invalid_tick_id(invalid.symbol, invalid.tick.seq)
            await self._dlq(DeadTick(invalid.symbol, invalid.tick), msg_id, invalid.reason)
        for late in emitted.late:
            LATE_TICKS.labels(late.symbol).inc()
            msg_id = names.late_tick_id(late.interval, late.symbol, late.tick.seq, late.tick.ts)
            await self._dlq(DeadTick(late.symbol, late.tick, late.interval), msg_id, late.reason)

    async def _dlq(self, body: DeadTick, msg_id: str, reason: str) -> None:
        headers = {
            names.CONTENT_TYPE: JSON,
            names.MSG_ID: msg_id,
            names.DLQ_REASON: reason,
            names.DLQ_SERVICE: self.name,
        }
        await self.ctx.publisher.publish(names.dlq(self.name), encode(body), headers)

    async def _send(self, batches: list[BarBatch]) -> None:
        subject = names.STORE_SYNC.get(self.policy.store_sync.mode)
        if subject is None:
            return
        ctx = self.ctx
        for batch in batches:
            body = encode(batch, ctx.settings.content_type)
            headers = {
                names.CONTENT_TYPE: ctx.settings.content_type,
                names.MSG_ID: names.bar_batch_id(batch.batch_id),
            }
            await ctx.publisher.publish(subject, body, headers)
            BATCHES_SENT.labels(self.policy.store_sync.mode).inc()

    async def _send_suppressed(self, due: bool) -> None:
        now = time.monotonic_ns()
        for reason, batcher in self.suppressed.items():
            self._count_suppressed(reason, batcher.due(now) if due else batcher.flush())

    def _count_suppressed(self, reason: str, batches: list[BarBatch]) -> None:
        for batch in batches:
            SUPPRESSED.labels(reason).inc()
            # Announced after the next flush; control counts them in ingest_writes_suppressed_total.
            self._pending_notices.append(Suppressed(reason, len(batch.bars)))

    async def _notify_suppressed(self) -> None:
        notices, self._pending_notices = self._pending_notices, []
        for notice in notices:
            await publish_event(self.ctx.publisher, notice)

    # -- checkpoints ---------------------------------------------------------------------------

    async def _checkpoint(self, force: bool = False) -> None:
        """Write the state with compare-and-swap; a failed swap means we were fenced off."""
        await self._notify_suppressed()
        if not (self.dirty or force):
            return
        if self.batcher.pending_rows > CHECKPOINT_MAX_PENDING:
            await self._send(self.batcher.flush())
            await self.ctx.publisher.flush()
        checkpoint = Checkpoint(
            last_seq=self.last_seq,
            engine=self.engine.snapshot(),
            pending=self.batcher.pending,
            suppressed={reason: b.pending for reason, b in self.suppressed.items() if b.pending},
            sources=self.sources,
            dry_run=sorted(self.dry_run),
            waiting_eos=self.waiting_eos,
            gaps=self.gaps.snapshot() if self.gaps is not None else b"",
        )
        data = encode_checkpoint(checkpoint)
        if len(data) > self.ctx.nc.max_payload:
            # Retrying cannot help: say what to change, and stop instead of spinning.
            problem = (
                f"checkpoint of {len(data)} bytes exceeds the server's max_payload "
                f"({self.ctx.nc.max_payload}): raise max_payload, shorten the revise window, or "
                "split the symbols over more partitions (MDP_STREAM__QUOTE_PARTITIONS)"
            )
            self.ctx.log.error("checkpoint_too_large", problem=problem)
            self.ctx.crashed = True
            self.ctx.stopping.set()
            raise StopConsuming(problem)
        previous, self.attempted = self.attempted, data
        for _ in range(2):
            try:
                if self.revision:
                    self.revision = await self.kv.update(
                        self.checkpoint_key, data, last=self.revision
                    )
                else:
                    self.revision = await self.kv.create(self.checkpoint_key, data)
                break
            except KeyWrongLastSequenceError as exc:
                await self._fenced_unless_ours(exc, previous)
        self.dirty = False

    async def _fenced_unless_ours(self, exc: Exception, previous: bytes) -> None:
        """A failed swap is fine when the stored value is our own last write (its reply was
        lost in an outage): adopt its revision. Anything else means another instance wrote."""
        with contextlib.suppress(Exception):
            entry = await self.kv.get(self.checkpoint_key)
            if entry.value == previous and entry.revision:
                self.revision = entry.revision
                return
        self.ctx.log.error("fenced_off", key=self.checkpoint_key, error=repr(exc))
        self.ctx.stopping.set()
        raise Fenced(str(exc)) from exc

    async def _restore(self) -> None:
        try:
            entry = await self.kv.get(self.checkpoint_key)
        except KeyNotFoundError:
            return
        if not entry.value:
            return
        checkpoint = decode_checkpoint(entry.value)
        cfg = self.settings.aggregator
        self.engine = BarEngine.restore(
            checkpoint.engine,
            intervals=cfg.intervals,
            grace_ns=cfg.grace_ms * 1_000_000,
            revise_window_ns=int(cfg.revise_window_s * 1e9),
            price_type=cfg.price_type,
        )
        now = time.monotonic_ns()
        for bar in checkpoint.pending:
            await self._send(self.batcher.add(bar, len(encode(bar)), now))
        for reason, bars in checkpoint.suppressed.items():
            batcher = self.suppressed.setdefault(reason, self._new_batcher())
            for bar in bars:
                self._count_suppressed(reason, batcher.add(bar, len(encode(bar)), now))
        self.sources = checkpoint.sources
        self.dry_run = set(checkpoint.dry_run)
        self.waiting_eos = dict(checkpoint.waiting_eos)
        if self.gaps is not None and checkpoint.gaps:
            self.gaps = GapDetector.restore(
                checkpoint.gaps,
                interval=self.gaps.interval,
                missing_intervals=cfg.gap_intervals,
            )
        self.last_seq = checkpoint.last_seq
        self.revision = entry.revision or 0
        self.ctx.log.info(
            "checkpoint_restored", last_seq=self.last_seq, pending=len(checkpoint.pending)
        )

    # -- background ----------------------------------------------------------------------------

    async def _keep_lease(self) -> None:
        try:
            await self.lease.keep()
        except LeaseLost:
            self.ctx.log.error("lease_lost", key=self.lease.key)
            self.ctx.stopping.set()

    async def _watch_policy(self) -> None:
        """Follow the policy control publishes in `ingest_state`."""
        async for _, policy in follow(
            self.state_kv, EffectivePolicy, self.ctx.log, names.POLICY_KEY
        ):
            if policy is None:
                continue
            async with self.lock:
                self.policy = policy
            self.ctx.log.info("policy", policy=policy.model_dump())

    async def _gap_events(self, events: list[Gap]) -> None:
        for event in events:
            self.dirty = True
            await publish_event(self.ctx.publisher, event, event.event_id)

    async def _watch_jobs(self) -> None:
        """Follow the live subscriptions: a replay is bounded, its end is not a gap."""
        assert self.gaps is not None
        jobs_kv = await self.ctx.js.key_value(names.KV_JOBS)
        async for name, spec in follow(jobs_kv, JobSpec, self.ctx.log):
            if spec is None:
                self.jobs.pop(name, None)
            else:
                self.jobs[name] = spec
            live = {
                s for job in self.jobs.values() if job.provider != "replay" for s in job.symbols
            }
            async with self.lock:
                await self._gap_events(self.gaps.sync(live, time.time_ns()))

    async def _timer(self) -> None:
        """Close idle symbols' bars by the wall clock and send batches that waited long enough."""
        retry_checkpoint = False
        while True:
            await asyncio.sleep(0.05)
            async with self.lock:
                now = time.time_ns()
                emitted = self.engine.advance(now)
                due = self.batcher.due(time.monotonic_ns())
                gap_events = self.gaps.check(now) if self.gaps is not None else []
                busy = emitted or due or gap_events or self._due_suppressed()
                if not (busy or retry_checkpoint):
                    continue
                await self._gap_events(gap_events)
                await self._emit(emitted)
                await self._send(due)
                await self._send_suppressed(due=True)
                await self.ctx.publisher.flush()
                self.dirty = True
                try:
                    await self._checkpoint()
                    retry_checkpoint = False
                except StopConsuming:
                    raise
                except Exception as exc:  # the bucket has no leader for a moment: next tick
                    self.ctx.log.warning("checkpoint_retry", error=repr(exc))
                    retry_checkpoint = True

    def _due_suppressed(self) -> bool:
        now = time.monotonic_ns()
        return any(
            (deadline := b.next_deadline_ns) is not None and deadline <= now
            for b in self.suppressed.values()
        )
