"""The aggregator: `md.quotes.>` in, bars out on `md.bars.*` and in batches to the store.

Crash safety (checkpoint and rewind): for every pulled group of messages the aggregator folds
the ticks, publishes what they produced (bars with `interval:symbol:start:rev` ids, full store
batches) and waits for every PubAck, then writes a checkpoint (the engine, the bars still
waiting in the batchers, the last input sequence) with compare-and-swap, and only then acks the
input. A restart restores the checkpoint and rewinds the consumer to the sequence after it, so
nothing is lost; anything published twice carries the same id, and the store upserts. A lease
keeps a second instance of the same consumer in standby, and the compare-and-swap on the
checkpoint fences off a zombie that lost it.

This is the shell: it feeds the pure parts (`dedup`, `bars`, `gaps`, `eos`, `outputs`) and
publishes what they return; `checkpoint` owns the stored state, `activation` the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import socket
import time
import uuid
from typing import ClassVar

from nats.aio.msg import Msg
from nats.js.kv import KeyValue
from prometheus_client import Counter, Gauge
from structlog.typing import FilteringBoundLogger

from mdp.services.aggregator.activation import activate_with_retries, keep_lease
from mdp.services.aggregator.builders import new_engine, new_gaps
from mdp.services.aggregator.checkpoint import (
    CHECKPOINT_MAX_PENDING,
    Checkpoint,
    CheckpointStore,
    Fenced,
)
from mdp.services.aggregator.dedup import SeenSeqs, fresh_ticks
from mdp.services.aggregator.eos import BadMarker, EndOfStreamTracker
from mdp.services.aggregator.outputs import Outgoing, OutputRouter
from mdp.shared.bus.consumer import StopConsuming, stream_sequence
from mdp.shared.bus.deadletter import dead_letter
from mdp.shared.bus.kv import follow
from mdp.shared.config import EffectivePolicy, local_policy
from mdp.shared.contract import names
from mdp.shared.contract.codec import Codec, DecodeError
from mdp.shared.contract.control import JobSpec
from mdp.shared.contract.events import Gap
from mdp.shared.contract.messages import EndOfStream, TickBatch
from mdp.shared.lease import Lease
from mdp.shared.runtime import Context
from mdp.shared.settings import Settings

DUPLICATE_TICKS = Counter(
    "mdp_aggregator_duplicate_ticks_total", "Ticks dropped as already seen (same run and seq)"
)
TICKS_AGGREGATED = Counter("mdp_aggregator_ticks_aggregated_total", "Ticks folded into bars")
LEASE_ACTIVE = Gauge(
    "mdp_aggregator_lease_active",
    "1 while this instance holds its consumer's lease (active), 0 in standby",
    ["consumer"],
)
# How often idle symbols' bars are closed by the wall clock: a bar closes at most this late.
TIMER_S = 0.025


def transit_credited(now_ns: int, recv_ns: int, clock_rate: float, credit_ns: int) -> int:
    """The arrival time the engine ages a live batch's watermark from: `now`, moved back by the
    time since the newest tick's source receipt (`recv`), at most `credit_ns`.

    Only at clock rate 1 (live), where event time is the source's wall clock: at a replay's
    rate N a wall-clock credit would become N times as much event time. A `recv` ahead of
    `now` (another host's clock) earns nothing.
    """
    if clock_rate != 1.0 or credit_ns <= 0 or not 0 < recv_ns <= now_ns:
        return now_ns
    return now_ns - min(now_ns - recv_ns, credit_ns)


class AggregatorService:
    """Folds ticks into event-time bars; publishes closed bars and batches them to the store."""

    name: ClassVar[str] = "aggregator"

    def __init__(self, settings: Settings) -> None:
        cfg = settings.aggregator
        self.settings = settings
        self.instance = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        # Until control's policy is read, the one from our own files and environment applies.
        policy = local_policy(self.name)
        self.engine = new_engine(policy.bars)
        self.router = OutputRouter(
            policy,
            settings.content_type,
            self.instance,
            self.name,
            late_by_symbol=cfg.late_ticks_by_symbol,
        )
        self.codec = Codec(TickBatch)
        self.lock = asyncio.Lock()
        # Per symbol, which ticks of the current provider run were folded: a provider that
        # resumes after a crash may send some again, in differently cut batches.
        self.sources: dict[str, SeenSeqs] = {}
        self.eos = EndOfStreamTracker()
        self.gaps = new_gaps(cfg, policy.bars)
        self.jobs: dict[str, JobSpec] = {}
        self.last_seq = 0
        self.durable = "aggregator" if cfg.partition is None else f"aggregator-p{cfg.partition}"
        self.dirty = False
        self.checkpoint_every_ns = cfg.checkpoint_interval_ms * 1_000_000
        self.checkpointed_at = 0  # monotonic ns of the last checkpoint written

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self, ctx: Context) -> None:
        """Become active in the background: a second instance waits there as a standby."""
        self.ctx = ctx
        self.log: FilteringBoundLogger = ctx.log
        kv: KeyValue = await ctx.js.key_value(names.KV_CHECKPOINTS)
        self.state_kv: KeyValue = await ctx.js.key_value(names.KV_STATE)
        self.store = CheckpointStore(ctx, kv, names.checkpoint_key(self.durable))
        self.lease = Lease(kv, names.lease_key(self.durable), self.instance, log=self.log)
        self.active = asyncio.Event()
        ctx.health.details["lease"] = "standby"
        LEASE_ACTIVE.labels(self.durable).set(0)
        ctx.spawn(activate_with_retries(self._become_active, ctx.stopping, self.log), "activate")

    async def _become_active(self) -> None:
        ctx = self.ctx
        if not await self.lease.acquire(ctx.stopping):
            return
        # A retried activation starts from the checkpoint again, not from a half restore.
        self.engine = new_engine(self.router.policy.bars)
        self.router.reset()
        self.last_seq = 0
        await self._restore()
        self.consumer = await ctx.consume(
            names.STREAM_QUOTES,
            self.durable,
            [names.quote_partition(self.settings.aggregator.partition)],
            self.handle,
            resume_at=self.last_seq + 1 if self.last_seq else None,
            dead_letter_poison=True,
        )
        self.active.set()
        self.ctx.health.details["lease"] = "active"
        LEASE_ACTIVE.labels(self.durable).set(1)
        self.log.info("active", durable=self.durable, resume_after_seq=self.last_seq)
        ctx.spawn(keep_lease(self.lease, ctx.stopping, self.log), "lease")
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
            await self._publish(self.router.due(time.monotonic_ns()))
            self.router.due_suppressed(time.monotonic_ns())
            await self.ctx.publisher.flush()
            await self._checkpoint()

    async def _handle_one(self, msg: Msg) -> None:
        """Decode, drop what was folded before, fold, route; then end the stream if complete."""
        headers = msg.headers or {}
        try:
            batch = self.codec.decode(msg.data, headers)
            clock_rate = float(headers.get(names.CLOCK_RATE, "1"))
            if not (math.isfinite(clock_rate) and clock_rate >= 0):
                raise ValueError(f"{names.CLOCK_RATE} must be a number >= 0, not {clock_rate}")
        except (DecodeError, ValueError) as exc:
            await dead_letter(self.ctx.publisher, self.name, msg, f"undecodable: {exc}", "decode")
            return
        symbol = batch.symbol
        if names.escape_symbol(symbol) != msg.subject.rsplit(".", 1)[-1]:
            reason = f"payload symbol {symbol!r} does not match the subject {msg.subject!r}"
            await dead_letter(self.ctx.publisher, self.name, msg, reason, "subject_mismatch")
            return
        self.router.mark_dry_run(symbol, headers.get(names.DRY_RUN) == "1")
        rejected = [int(s) for s in headers.get(names.REJECTED_SEQS, "").split(",") if s.isdigit()]
        ticks, duplicates = fresh_ticks(
            self.sources, symbol, headers.get(names.RUN, ""), batch.ticks, rejected
        )
        if duplicates:
            DUPLICATE_TICKS.inc(duplicates)
        if ticks:
            now = time.time_ns()
            credit = self.router.policy.bars.transit_credit_ms * 1_000_000
            arrived = transit_credited(now, ticks[-1].recv, clock_rate, credit)
            emitted = self.engine.on_ticks(symbol, batch.provider, ticks, arrived, clock_rate)
            TICKS_AGGREGATED.inc(len(ticks))
            await self._publish(self.router.route(emitted, time.monotonic_ns()))
            if self.gaps is not None:
                await self._publish_gaps(self.gaps.on_ticks(symbol, now))
        self.eos.note(symbol, headers.get(names.END_OF_STREAM))
        try:
            finished = self.eos.take_complete(symbol, self.sources)
        except BadMarker as exc:
            await dead_letter(self.ctx.publisher, self.name, msg, f"bad marker: {exc}", "decode")
            return
        if finished is not None:
            await self._end_of_stream(symbol, *finished)

    async def _end_of_stream(self, symbol: str, marker: EndOfStream, header: str) -> None:
        """Close the symbol's bars, stop watching it for gaps, send everything held, announce."""
        await self._publish(
            self.router.route(
                self.engine.end_of_stream(symbol, time.time_ns()), time.monotonic_ns()
            )
        )
        if self.gaps is not None:
            await self._publish_gaps(self.gaps.unsubscribe(symbol, time.time_ns()))
        # The bounded stream is over: a later run of the same symbol starts afresh.
        self.engine.forget(symbol)
        await self._publish(self.router.end_of_stream(symbol, marker, header))

    # -- output --------------------------------------------------------------------------------

    async def _publish(self, messages: list[Outgoing]) -> None:
        for message in messages:
            await self.ctx.publisher.publish(message.subject, message.data, message.headers)

    async def _publish_gaps(self, events: list[Gap]) -> None:
        if events:
            self.dirty = True  # the detector's state changed: checkpoint it
        await self._publish(self.router.gap_events(events))

    # -- checkpoints ---------------------------------------------------------------------------

    async def _checkpoint(self, force: bool = False) -> None:
        """Write the state with compare-and-swap; a failed swap means we were fenced off.

        At most every `checkpoint_interval_ms`: the state is proportional to the symbols, not
        to what changed, so writing it after every pulled batch would cost more than folding.
        Input acknowledged since the last checkpoint is safe: a restart rewinds the consumer
        to the checkpoint's sequence (the stream keeps it) and folds it again; what that
        publishes carries the same ids.
        """
        await self._publish(self.router.notices())
        if not (self.dirty or force):
            return
        now = time.monotonic_ns()
        if not force and now - self.checkpointed_at < self.checkpoint_every_ns:
            return
        if self.router.pending_rows > CHECKPOINT_MAX_PENDING:
            await self._publish(self.router.flush())
            await self.ctx.publisher.flush()
        checkpoint = Checkpoint(
            last_seq=self.last_seq,
            engine=self.engine.snapshot(),
            pending=self.router.pending,
            suppressed=self.router.suppressed_pending,
            sources=self.sources,
            dry_run=sorted(self.router.dry_run),
            waiting_eos=self.eos.waiting,
            gaps=self.gaps.snapshot() if self.gaps is not None else b"",
        )
        await self.store.save(checkpoint)
        self.dirty = False
        self.checkpointed_at = now

    async def _restore(self) -> None:
        checkpoint = await self.store.load()
        if checkpoint is None:
            return
        cfg = self.settings.aggregator
        bars = self.router.policy.bars
        self.engine = new_engine(bars, checkpoint.engine)
        now = time.monotonic_ns()
        await self._publish(self.router.restore(checkpoint.pending, checkpoint.suppressed, now))
        self.sources = checkpoint.sources
        self.router.dry_run = set(checkpoint.dry_run)
        self.eos = EndOfStreamTracker(checkpoint.waiting_eos)
        if checkpoint.gaps:
            self.gaps = new_gaps(cfg, bars, checkpoint.gaps)
        self.last_seq = checkpoint.last_seq
        self.log.info(
            "checkpoint_restored", last_seq=self.last_seq, pending=len(checkpoint.pending)
        )

    # -- background ----------------------------------------------------------------------------

    async def _watch_policy(self) -> None:
        """Follow the policy control publishes in `ingest_state`."""
        async for _, policy in follow(self.state_kv, EffectivePolicy, self.log, names.POLICY_KEY):
            if policy is None:
                continue
            async with self.lock:
                self._apply(policy)
            self.log.info("policy", policy=self.router.policy.model_dump())

    def _apply(self, policy: EffectivePolicy) -> None:
        """Follow a new policy: bars from now on (open bars kept), batching from the next batch."""
        current = self.router.policy
        if policy.bars != current.bars:
            try:
                self.engine = new_engine(policy.bars, self.engine.snapshot())
            except ValueError as exc:  # a changed price type: the running bars stay as they are
                self.log.error("policy_bars_refused", error=str(exc), kept=current.bars)
                policy = policy.model_copy(update={"bars": current.bars})
        self.router.apply(policy)

    async def _watch_jobs(self) -> None:
        """Follow the live subscriptions: a replay is bounded, its end is not a gap."""
        assert self.gaps is not None
        jobs_kv = await self.ctx.js.key_value(names.KV_JOBS)
        async for name, spec in follow(jobs_kv, JobSpec, self.log):
            if spec is None:
                self.jobs.pop(name, None)
            else:
                self.jobs[name] = spec
            live = {
                s for job in self.jobs.values() if job.provider != "replay" for s in job.symbols
            }
            async with self.lock:
                await self._publish_gaps(self.gaps.sync(live, time.time_ns()))

    async def _timer(self) -> None:
        """Close idle symbols' bars by the wall clock and send batches that waited long enough."""
        retry_checkpoint = False
        while True:
            await asyncio.sleep(TIMER_S)
            async with self.lock:
                now, mono = time.time_ns(), time.monotonic_ns()
                emitted = self.engine.advance(now)
                gap_events = self.gaps.check(now) if self.gaps is not None else []
                # A checkpoint the last batches skipped (too soon after the previous) is due too.
                stale = self.dirty and mono - self.checkpointed_at >= self.checkpoint_every_ns
                busy = emitted or gap_events or self.router.is_due(mono)
                if not (busy or retry_checkpoint or stale):
                    continue
                # Cut the due batch before the new bars join it: they start the next one.
                due = self.router.due(mono)
                await self._publish_gaps(gap_events)
                await self._publish(self.router.route(emitted, time.monotonic_ns()))
                await self._publish(due)
                self.router.due_suppressed(time.monotonic_ns())
                await self.ctx.publisher.flush()
                self.dirty = True
                try:
                    await self._checkpoint()
                    retry_checkpoint = False
                except StopConsuming:
                    raise
                except Exception as exc:  # the bucket has no leader for a moment: next tick
                    self.log.warning("checkpoint_retry", error=repr(exc))
                    retry_checkpoint = True
