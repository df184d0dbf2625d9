"""The provider: runs the adapters the `ingest_jobs` bucket asks for, publishes `md.raw.*`."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
import socket
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, TypeVar

import msgspec
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue
from prometheus_client import Counter, Gauge
from pydantic import ValidationError
from structlog.typing import FilteringBoundLogger

from mdp.services.provider.adapters.base import Adapter, AdapterError, load_adapters, resolve_hosted
from mdp.services.provider.batching import TickBatcher
from mdp.services.provider.pacing import Pacer, pacing_config, unlimited
from mdp.services.provider.retry import Backoff
from mdp.shared.breaker import FailureKind, Transition, failure_kind
from mdp.shared.bus.kv import follow, kv_keys
from mdp.shared.bus.publisher import publish_event
from mdp.shared.circuit import Circuits, Outcome
from mdp.shared.config import EffectivePolicy, local_policy
from mdp.shared.contract import names
from mdp.shared.contract.codec import JSON, encode
from mdp.shared.contract.control import JobSpec
from mdp.shared.contract.events import Failed, Refused, Stopped
from mdp.shared.contract.messages import BadRow, EndOfStream, Tick, TickBatch
from mdp.shared.contract.records import (
    AdapterInfo,
    FeedStatus,
    JobState,
    ProviderHost,
    ProviderState,
)
from mdp.shared.lease import Lease, LeaseLost
from mdp.shared.runtime import Context
from mdp.shared.settings import Settings

TICKS_PUBLISHED = Counter(
    "mdp_provider_ticks_published_total", "Ticks published on md.raw", ["provider"]
)
BATCHES_PUBLISHED = Counter(
    "mdp_provider_batches_published_total", "Tick batches published on md.raw", ["provider"]
)
BAD_ROWS = Counter(
    "mdp_provider_bad_rows_total", "Source rows rejected by an adapter", ["provider"]
)
JOBS_RUNNING = Gauge("mdp_provider_jobs_running", "Jobs this process runs", ["provider"])
RECONCILE_PERIOD_S = 2.0
JOB_RETRIES = Counter(
    "mdp_provider_job_retries_total", "Live jobs restarted after their adapter failed", ["provider"]
)
RETRY = Backoff()
JOB_LEASE_TTL_S = 5.0  # a killed owner's jobs move to a standby within about this long
HEALTH_PERIOD_S = 0.25  # how often live jobs are looked at for their first batch and silences
# A live job that keeps publishing reports a success this often, so that a breaker another job
# (or a silence) opened closes once it half-opens, instead of waiting for a restart to probe it.
SUCCESS_EVERY_S = 5.0
BREAKER_POLL_S = 1.0  # a job held by an open breaker re-reads it this often (a reset is seen)
# Stopping a job holds the jobs lock: its last batches get this long to be stored, then the
# publisher keeps retrying them in the background while other jobs start and stop.
STOP_FLUSH_S = 5.0
T = TypeVar("T")


REJECTED_LINES_SHOWN = 10  # line numbers of rejected rows named in a `Stopped` event


@dataclass
class SinkStore:
    """An adapter's small persistent store (KV `mdp_checkpoints`); an outage reads as a miss."""

    kv: KeyValue
    log: FilteringBoundLogger

    async def get(self, key: str) -> bytes | None:
        """The value under `key`, None when absent or unreadable."""
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            return None
        except Exception as exc:  # a cache: the adapter asks its source instead
            self.log.warning("store_read_failed", key=key, error=repr(exc))
            return None
        return entry.value or None

    async def put(self, key: str, value: bytes) -> None:
        """Store `value` under `key`; a failure is logged (the adapter works without it)."""
        try:
            await self.kv.put(key, value)
        except Exception as exc:
            self.log.warning("store_write_failed", key=key, error=repr(exc))


@dataclass
class JobSink:
    """Where an adapter writes: per-symbol batching, then publication with deterministic ids."""

    ctx: Context
    spec: JobSpec
    clock_rate: float
    batcher: TickBatcher
    ticks: int = 0
    published_seq: dict[str, int] = field(default_factory=dict)
    attempts: int = 0  # retries of a live job since it last ran healthily
    pacer: Pacer = field(default_factory=unlimited)  # the provider's shared rate budget
    store: SinkStore | None = None  # where a live adapter caches (ibkr: qualified contracts)
    feed: FeedStatus | None = None  # a live adapter's latest report, in the job's state record
    # What the source serves each symbol (`live`, `delayed`, ...), sent as a batch header.
    market_data: dict[str, str] = field(default_factory=dict)

    async def put(self, symbol: str, ticks: list[Tick]) -> None:
        """Buffer ticks; publish every batch that became full."""
        for sym, batch in self.batcher.add(symbol, ticks, time.monotonic_ns()):
            await self.publish(sym, batch)

    async def flush_due(self) -> None:
        """Publish batches that waited long enough."""
        for sym, batch in self.batcher.due(time.monotonic_ns()):
            await self.publish(sym, batch)

    async def publish(self, symbol: str, ticks: list[Tick]) -> None:
        """Publish one TickBatch on `md.raw.<provider>.<sym>`."""
        ctx = self.ctx
        body = encode(TickBatch(symbol, self.spec.provider, ticks), ctx.settings.content_type)
        headers = {
            names.CONTENT_TYPE: ctx.settings.content_type,
            names.MSG_ID: names.raw_batch_id(self.spec.run, symbol, ticks[0].seq, ticks[-1].seq),
            names.CLOCK_RATE: repr(self.clock_rate),
            names.RUN: self.spec.run,
        }
        if self.spec.dry_run:
            headers[names.DRY_RUN] = "1"
        kind = self.market_data.get(symbol)
        if kind:
            headers[names.MARKET_DATA] = kind
        await ctx.publisher.publish(names.raw(self.spec.provider, symbol), body, headers)
        self.ticks += len(ticks)
        self.published_seq[symbol] = ticks[-1].seq
        TICKS_PUBLISHED.labels(self.spec.provider).inc(len(ticks))
        BATCHES_PUBLISHED.labels(self.spec.provider).inc()

    async def end_of_stream(
        self, symbols: Sequence[str], ticks_per_symbol: Mapping[str, int]
    ) -> None:
        """Flush, then mark the end of every symbol so downstream stages can finish."""
        for sym, batch in self.batcher.flush():
            await self.publish(sym, batch)
        for symbol in symbols:
            marker = EndOfStream(
                self.spec.run, symbol, len(symbols), int(ticks_per_symbol.get(symbol, 0))
            )
            headers = {
                names.CONTENT_TYPE: JSON,
                names.MSG_ID: names.end_of_stream_id(self.spec.run, symbol),
                names.END_OF_STREAM: msgspec.json.encode(marker).decode(),
                names.CLOCK_RATE: repr(self.clock_rate),
                names.RUN: self.spec.run,
            }
            if self.spec.dry_run:
                headers[names.DRY_RUN] = "1"
            body = encode(TickBatch(symbol, self.spec.provider, []))
            await self.ctx.publisher.publish(names.raw(self.spec.provider, symbol), body, headers)
        await self.ctx.publisher.flush()

    # Set by the provider: counts a failure against the provider's circuit breaker.
    on_failure: Callable[[FailureKind], Awaitable[None]] | None = None

    async def failure(self, kind: FailureKind) -> None:
        """Count one failure of the provider that the adapter saw (a pacing error: `"pacing"`)."""
        if self.on_failure is not None:
            await self.on_failure(kind)

    def report(self, feed: FeedStatus) -> None:
        """Keep the adapter's report on its feed; the job's next state record carries it."""
        self.feed = feed

    async def set_market_data(self, symbol: str, kind: str) -> None:
        """From now on `symbol`'s ticks are of `kind`: what is buffered goes out as before."""
        if self.market_data.get(symbol) == kind:
            return
        pending = self.batcher.pop(symbol)
        if pending:
            await self.publish(symbol, pending)
        self.market_data[symbol] = kind

    async def refuse(self, symbol: str, code: int, reason: str) -> None:
        """Announce that the source refused `symbol` (an `ingest.events.refused` event)."""
        spec = self.spec
        event = Refused(time.time_ns(), spec.job, spec.run, spec.provider, symbol, code, reason)
        await publish_event(self.ctx.publisher, event, event.event_id)


@dataclass
class JobHealth:
    """What the breaker learns from a job: is its adapter running, is it delivering."""

    running: bool = False  # inside the adapter's run (not waiting to retry)
    ticks: int = 0  # the sink's tick count when last looked at
    progress_at: float = 0.0  # monotonic: the last publication seen, or the (re)start
    confirmed: bool = False  # published since the (re)start or the last silence
    silent: bool = False  # the current silence was counted as data_stopped
    success_at: float = 0.0  # monotonic: when a success was last reported

    def begin(self, ticks: int, now: float) -> None:
        """The adapter (re)starts: its first batch will be the success of this attempt."""
        self.running, self.ticks, self.progress_at = True, ticks, now
        self.confirmed = self.silent = False


@dataclass
class RunningJob:
    """A job this process is running."""

    spec: JobSpec
    adapter: Adapter
    sink: JobSink
    task: asyncio.Task[None]
    lease: Lease
    keeper: asyncio.Task[None] | None = None
    health: JobHealth = field(default_factory=JobHealth)


class ProviderService:
    """Watches `ingest_jobs` and runs a task per job whose provider it hosts."""

    name: ClassVar[str] = "provider"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.origins: dict[str, AdapterInfo] = {}
        try:
            registry = load_adapters(origins=self.origins)
            self.adapters = resolve_hosted(settings.provider.adapters, registry, self.origins)
        except AdapterError as exc:
            print(f"mdp provider: MDP_PROVIDER__ADAPTERS / --adapters: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        self.instance = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.jobs: dict[str, RunningJob] = {}
        # Jobs this process could run but another owns: waiting for the lease, by job name.
        self.claims: dict[str, tuple[str, asyncio.Task[None]]] = {}
        self.jobs_lock = asyncio.Lock()
        # Until control's policy is read, the built-in defaults pace ibkr at IB's limits.
        self.policy = EffectivePolicy()
        self.pacers: dict[str, Pacer] = {}

    async def start(self, ctx: Context) -> None:
        """Start watching the desired state."""
        self.ctx = ctx
        self.jobs_kv = await ctx.js.key_value(names.KV_JOBS)
        self.state_kv = await ctx.js.key_value(names.KV_STATE)
        self.lease_kv = await ctx.js.key_value(names.KV_CHECKPOINTS)
        # Until control's policy is read, the one from our own files and environment applies;
        # the published one is read before the first job, so no job starts unpaced.
        self.policy = local_policy(self.name)
        with contextlib.suppress(KeyNotFoundError, ValidationError):
            entry = await self.state_kv.get(names.POLICY_KEY)
            if entry.value:
                self.policy = EffectivePolicy.model_validate_json(entry.value)
        self.circuits = Circuits(
            self.state_kv, ctx.publisher, self.policy.circuit.breaker(), ctx.log
        )
        self._apply_policy(self.policy)
        ctx.spawn(self._watch_policy(), "policy")
        ctx.spawn(self._watch_health(), "watch-health")
        ctx.spawn(self._watch_jobs(), "watch-jobs")
        ctx.spawn(self._reconcile_loop(), "reconcile-jobs")
        ctx.spawn(self._flush_loop(), "flush-due")
        ctx.spawn(self._host_heartbeat(), "host-heartbeat")
        ctx.log.info("adapters", names=sorted(self.adapters), instance=self.instance)

    async def stop(self) -> None:
        """Stop every job and publish what is buffered."""
        for name in list(self.claims):
            self._drop_claim(name)
        async with self.jobs_lock:  # not beside the watcher stopping the same job
            for job in list(self.jobs.values()):
                await self._stop_job(job, state="interrupted")
        with contextlib.suppress(Exception):  # a dead record expires anyway
            await self.state_kv.delete(names.host_key(self.instance))

    async def _announce_host(self) -> None:
        """Say which adapters this process hosts (control fails jobs nobody can host)."""
        record = ProviderHost(
            self.instance,
            [
                msgspec.structs.replace(
                    self.origins[name], live=bool(getattr(self.adapters[name], "live", False))
                )
                for name in sorted(self.adapters)
                if name in self.origins
            ],
            time.time_ns(),
            self.settings.provider.host_ttl_s,
        )
        await self.state_kv.put(names.host_key(self.instance), msgspec.json.encode(record))

    async def _host_heartbeat(self) -> None:
        while True:
            try:
                await self._announce_host()
            except Exception as exc:  # an outage, a permission: the next beat tries again
                self.ctx.log.warning("host_heartbeat_failed", error=repr(exc))
            await asyncio.sleep(self.settings.provider.host_ttl_s / 3)

    def pacer(self, provider: str) -> Pacer:
        """The one pacer of `provider` in this process, shared by all its jobs."""
        pacer = self.pacers.get(provider)
        if pacer is None:
            section = self.policy.pacing.get(provider)
            config = pacing_config(section) if section is not None else None
            pacer = Pacer(provider, self.lease_kv, config, self.ctx.log)
            self.pacers[provider] = pacer
        return pacer

    def _apply_policy(self, policy: EffectivePolicy) -> None:
        """Follow a new policy: the breakers' thresholds, and every pacer whose budget changed."""
        self.policy = policy
        self.circuits.config = policy.circuit.breaker()
        for provider, pacer in self.pacers.items():
            section = policy.pacing.get(provider)
            config = pacing_config(section) if section is not None else None
            if config != pacer.config:
                pacer.configure(config)
                self.ctx.log.info("pacing", provider=provider, budget=msgspec.to_builtins(config))
        self.ctx.log.info(
            "policy",
            revision=policy.revision,
            circuit=policy.circuit.model_dump(),
            pacing={name: section.model_dump() for name, section in policy.pacing.items()},
        )

    async def _watch_policy(self) -> None:
        """Follow the policy control publishes in `ingest_state` (breakers, pacing budgets)."""
        async for _, policy in follow(
            self.state_kv, EffectivePolicy, self.ctx.log, names.POLICY_KEY
        ):
            if policy is not None:
                self._apply_policy(policy)

    async def _watch_jobs(self) -> None:
        async for name, spec in follow(self.jobs_kv, JobSpec, self.ctx.log):
            if spec is not None:
                await self._ensure_job(spec)
                continue
            self._drop_claim(name)
            job = self.jobs.get(name)
            if job is not None:
                async with self.jobs_lock:
                    await self._stop_job(job, state="stopped")

    async def _reconcile_loop(self) -> None:
        """Compare the running jobs with the bucket every few seconds.

        The watcher is the fast path; this catches whatever it missed (a watcher resumes only
        seconds after a server restart, and can start before a new bucket is ready).
        """
        while True:
            await asyncio.sleep(RECONCILE_PERIOD_S)
            try:
                wanted: dict[str, JobSpec] = {}
                for key in await kv_keys(self.ctx.js, names.KV_JOBS):
                    with contextlib.suppress(KeyNotFoundError):
                        entry = await self.jobs_kv.get(key)
                        if entry.value:
                            wanted[key] = msgspec.json.decode(entry.value, type=JobSpec)
            except Exception as exc:
                self.ctx.log.warning("reconcile_failed", error=repr(exc))
                continue
            for name in [n for n in self.claims if n not in wanted]:
                self._drop_claim(name)
            for name, job in list(self.jobs.items()):
                if name not in wanted:
                    async with self.jobs_lock:
                        await self._stop_job(job, state="stopped")
            for spec in wanted.values():
                await self._ensure_job(spec)

    async def _ensure_job(self, spec: JobSpec) -> None:
        async with self.jobs_lock:  # the watcher and the reconciler both call this
            await self._ensure_job_locked(spec)

    async def _ensure_job_locked(self, spec: JobSpec) -> None:
        current = self.jobs.get(spec.job)
        if current is not None:
            if current.spec.run == spec.run:
                return
            await self._stop_job(current, state="replaced")
        if spec.provider not in self.adapters:
            return  # another provider process hosts it
        claim = self.claims.get(spec.job)
        if claim is not None:
            if claim[0] == spec.run:
                return  # already waiting for this run's lease
            self._drop_claim(spec.job)
        task = asyncio.create_task(self._claim(spec), name=f"claim-{spec.job}")
        self.claims[spec.job] = (spec.run, task)

    def _drop_claim(self, name: str) -> None:
        claim = self.claims.pop(name, None)
        if claim is not None:
            claim[1].cancel()

    async def _claim(self, spec: JobSpec) -> None:
        """Own the job through its lease (waiting as a standby while another process runs it).

        One process per job: a second one hosting the same adapter takes the job over, resuming
        from the progress the first recorded, once the first's lease expires (a `kill -9`).
        """
        lease = Lease(
            self.lease_kv,
            names.job_lease_key(spec.job),
            self.instance,
            ttl_s=JOB_LEASE_TTL_S,
            log=self.ctx.log,
        )
        try:
            await lease.acquire()
            async with self.jobs_lock:
                if self.claims.get(spec.job, ("", None))[0] != spec.run:
                    await lease.release()
                    return  # the job changed or went while we waited
                del self.claims[spec.job]
                started = await self._start_job_locked(spec, lease)
            if not started:
                await lease.release()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # e.g. the bucket without a leader: the reconciler retries
            self.ctx.log.warning("job_claim_failed", job=spec.job, error=repr(exc))
            if self.claims.get(spec.job, ("", None))[0] == spec.run:
                del self.claims[spec.job]

    async def _start_job_locked(self, spec: JobSpec, lease: Lease) -> bool:
        """Start the job this process now owns; False when there is nothing to run."""
        adapter_cls = self.adapters[spec.provider]
        previous = await self._previous_state(spec)
        if previous is not None and previous.state in ("completed", "failed"):
            return False  # this run ended already; a new start makes a new run
        log = self.ctx.log.bind(job=spec.job, run=spec.run, provider=spec.provider)
        try:
            adapter = adapter_cls(spec)
        except AdapterError as exc:
            log.error("job_rejected", error=str(exc))
            await self._record(spec, "failed", error=str(exc))
            await self._failed(spec, str(exc))
            return False
        batcher = TickBatcher.from_settings(self.settings.provider)
        sink = JobSink(
            self.ctx,
            spec,
            adapter.clock_rate,
            batcher,
            pacer=self.pacer(spec.provider),
            store=SinkStore(self.lease_kv, self.ctx.log),
        )
        sink.on_failure = functools.partial(self._adapter_failure, spec)
        resume = dict(previous.resume) if previous is not None else {}
        sink.published_seq.update(resume)
        sink.ticks = previous.ticks if previous is not None else 0
        health = JobHealth()
        task = asyncio.create_task(
            self._run(spec, adapter, sink, log, resume or None, health), name=f"job-{spec.job}"
        )
        job = RunningJob(spec, adapter, sink, task, lease, health=health)
        job.keeper = asyncio.create_task(self._keep_lease(job), name=f"lease-{spec.job}")
        self.jobs[spec.job] = job
        JOBS_RUNNING.labels(spec.provider).inc()
        await self._record(spec, "running", ticks=sink.ticks, resume=resume)
        log.info("job_started", symbols=spec.symbols, params=spec.params, resumed=bool(resume))
        return True

    async def _keep_lease(self, job: RunningJob) -> None:
        """Renew the job's lease; once another process holds it, stop here without a word."""
        try:
            await job.lease.keep()
        except LeaseLost:
            self.ctx.log.error("job_lease_lost", job=job.spec.job, run=job.spec.run)
            job.task.cancel()
            self._forget(job.spec)

    async def _run(
        self,
        spec: JobSpec,
        adapter: Adapter,
        sink: JobSink,
        log: FilteringBoundLogger,
        resume: dict[str, int] | None,
        health: JobHealth,
    ) -> None:
        live = bool(getattr(adapter, "live", False))
        attempt = 0
        error: str | None = None  # the last failure, while retrying
        while True:
            if live:
                held = await self._breaker_gate(spec, sink, error, attempt, resume)
                if error is not None or held:
                    await self._record(
                        spec, "running", ticks=sink.ticks, resume=resume, attempts=attempt
                    )
            started = time.monotonic()
            health.begin(sink.ticks, started)
            try:
                await adapter.run(sink, resume)
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error = repr(exc)
                kind = failure_kind(exc)
            finally:
                health.running = False
            if not live:
                # A bounded input (a replay) that failed ends here: retrying reads it again.
                log.error("job_failed", error=error)
                await self._record(spec, "failed", error=error, ticks=sink.ticks)
                await self._failed(spec, error)
                await self._finish(spec)
                return
            counted = await self._count_failure(spec, kind, error)
            attempt = sink.attempts = RETRY.next_attempt(attempt, time.monotonic() - started)
            delay = RETRY.delay_s(attempt, random.random())
            log.warning("job_retrying", error=error, attempt=attempt, retry_in_s=round(delay, 3))
            JOB_RETRIES.labels(spec.provider).inc()
            for symbol, batch in sink.batcher.flush():
                await sink.publish(symbol, batch)
            await self.ctx.publisher.flush()
            resume = dict(sink.published_seq)
            next_attempt_ns = time.time_ns() + int(delay * 1e9)
            if counted is not None:  # an open breaker holds the retry until it half-opens
                next_attempt_ns = max(next_attempt_ns, counted.view.next_allowed_ns)
            await self._record(
                spec,
                "retrying",
                error=error,
                ticks=sink.ticks,
                resume=resume,
                attempts=attempt,
                next_attempt_ns=next_attempt_ns,
            )
            await asyncio.sleep(delay)
            try:
                adapter = type(adapter)(spec)
            except AdapterError as exc:
                await self._record(spec, "failed", error=str(exc), ticks=sink.ticks)
                await self._failed(spec, str(exc))
                await self._finish(spec)
                return
        rejected, lines = await self._report_bad_rows(spec, adapter)
        await self._record(spec, "completed", ticks=sink.ticks)
        event = Stopped(
            time.time_ns(), spec.job, spec.run, spec.provider, "completed", sink.ticks,
            rejected_rows=rejected or None, rejected_lines=lines or None,
        )  # fmt: skip
        await publish_event(self.ctx.publisher, event)
        log.info("job_completed", ticks=sink.ticks)
        await self._finish(spec)

    # -- circuit breaker ---------------------------------------------------------------------

    async def _breaker_gate(
        self,
        spec: JobSpec,
        sink: JobSink,
        error: str | None,
        attempt: int,
        resume: dict[str, int] | None,
    ) -> bool:
        """Return once the provider's breaker lets this live job's adapter (re)start.

        While it is open the job is `retrying`, `next_attempt_ns` when it half-opens (then one
        job's attempt is its probe). It is re-read every second, so a manual reset frees the
        job at once. A breaker that cannot be read lets the attempt go: it guards the provider,
        and must not keep a feed down through a KV outage. True when it held the job back.
        """
        shown = -1
        while True:
            outcome = await self._circuit(spec, lambda: self.circuits.allow(spec.provider))
            if outcome is None or outcome.result:
                return shown != -1
            view = outcome.view
            if view.next_allowed_ns != shown:
                shown = view.next_allowed_ns
                await self._record(
                    spec,
                    "retrying",
                    error=error or f"circuit of provider {spec.provider!r} is {view.state}",
                    ticks=sink.ticks,
                    resume=resume,
                    attempts=attempt,
                    next_attempt_ns=shown,
                )
            wait_s = (shown - time.time_ns()) / 1e9
            await asyncio.sleep(min(max(wait_s, 0.01), BREAKER_POLL_S))

    async def _count_failure(
        self, spec: JobSpec, kind: FailureKind, error: str = ""
    ) -> Outcome[Transition | None] | None:
        """Count one failure against the job's provider; the outcome, None if KV failed."""
        self.ctx.log.warning(
            "circuit_failure", job=spec.job, provider=spec.provider, kind=kind, error=error
        )
        return await self._circuit(spec, lambda: self.circuits.record_failure(spec.provider, kind))

    async def _adapter_failure(self, spec: JobSpec, kind: FailureKind) -> None:
        """`JobSink.failure`: an adapter reports a failure it survived (a pacing error)."""
        await self._count_failure(spec, kind, "reported by the adapter")

    async def _circuit(
        self, spec: JobSpec, call: Callable[[], Awaitable[Outcome[T]]]
    ) -> Outcome[T] | None:
        """One breaker call; None (logged) when KV is unavailable."""
        try:
            return await call()
        except Exception as exc:
            self.ctx.log.warning("circuit_unavailable", provider=spec.provider, error=repr(exc))
            return None

    async def _watch_health(self) -> None:
        """Tell the breakers how the live feeds are doing.

        A job's first batch after its adapter (re)started, or after a silence, is a success
        (the probe's, when the breaker is half open); a running job that published nothing for
        `provider.data_stopped_after_s` counts one `data_stopped` failure per silence.
        """
        silence_s = self.settings.provider.data_stopped_after_s
        while True:
            await asyncio.sleep(HEALTH_PERIOD_S)
            for job in list(self.jobs.values()):
                health = job.health
                if not health.running or not getattr(job.adapter, "live", False):
                    continue
                now = time.monotonic()
                if job.sink.ticks != health.ticks:
                    health.ticks, health.progress_at, health.silent = job.sink.ticks, now, False
                    if not health.confirmed or now - health.success_at >= SUCCESS_EVERY_S:
                        health.confirmed, health.success_at = True, now
                        success = functools.partial(self.circuits.record_success, job.spec.provider)
                        await self._circuit(job.spec, success)
                elif silence_s and not health.silent and now - health.progress_at >= silence_s:
                    health.silent, health.confirmed = True, False
                    silent_for = round(now - health.progress_at, 1)
                    await self._count_failure(
                        job.spec, "data_stopped", f"nothing published for {silent_for} s"
                    )

    async def _finish(self, spec: JobSpec) -> None:
        """A run that ended by itself: give its lease up (a standby sees it ended) and forget it."""
        job = self.jobs.get(spec.job)
        if job is not None and job.spec.run == spec.run:
            if job.keeper is not None:
                job.keeper.cancel()
            self._forget(spec)
            await job.lease.release()

    def _forget(self, spec: JobSpec) -> None:
        job = self.jobs.get(spec.job)
        if job is not None and job.spec.run == spec.run:
            del self.jobs[spec.job]
            JOBS_RUNNING.labels(spec.provider).dec()

    async def _stop_job(self, job: RunningJob, state: JobState) -> None:
        job.task.cancel()
        # asyncio.wait neither raises the task's CancelledError nor swallows our own.
        await asyncio.wait({job.task}, timeout=STOP_FLUSH_S)
        if not job.task.done():
            self.ctx.log.error("job_task_ignores_cancel", job=job.spec.job, run=job.spec.run)
        if job.keeper is not None:
            job.keeper.cancel()
        for sym, batch in job.sink.batcher.flush():
            await job.sink.publish(sym, batch)  # waits only while NATS is away: nothing is dropped
        try:
            async with asyncio.timeout(STOP_FLUSH_S):
                await self.ctx.publisher.flush()
        except TimeoutError:
            self.ctx.log.warning(
                "job_stop_flush_slow",
                job=job.spec.job,
                in_flight=self.ctx.publisher.in_flight,
                waited_s=STOP_FLUSH_S,
            )
        self._forget(job.spec)
        await self._record(
            job.spec, state, ticks=job.sink.ticks, resume=dict(job.sink.published_seq)
        )
        await job.lease.release()
        self.ctx.log.info("job_stopped", job=job.spec.job, state=state, ticks=job.sink.ticks)

    async def _flush_loop(self) -> None:
        period = self.settings.provider.batch_max_delay_ms / 2000
        last_progress = time.monotonic()
        while True:
            await asyncio.sleep(period)
            for job in list(self.jobs.values()):
                await job.sink.flush_due()
            if time.monotonic() - last_progress >= 1.0:
                last_progress = time.monotonic()
                await self._record_progress()

    async def _record_progress(self) -> None:
        """Record, per running job, the last tick of each symbol the stream has stored."""
        snapshots = [
            (job, dict(job.sink.published_seq), job.sink.ticks) for job in self.jobs.values()
        ]
        if not snapshots:
            return
        await self.ctx.publisher.flush()  # everything in the snapshots is now stored
        for job, resume, ticks in snapshots:
            # Only a running adapter: a job waiting to retry keeps its `retrying` report.
            if self.jobs.get(job.spec.job) is job and job.health.running:
                await self._record(
                    job.spec, "running", ticks=ticks, resume=resume, attempts=job.sink.attempts
                )

    async def _report_bad_rows(self, spec: JobSpec, adapter: Adapter) -> tuple[int, list[int]]:
        """Dead-letter the rows the adapter rejected; their count and first line numbers."""
        bad_rows = getattr(adapter, "bad_rows", None) or []
        count = int(getattr(adapter, "bad_row_count", len(bad_rows)))
        if not count:
            return 0, []
        BAD_ROWS.labels(spec.provider).inc(count)
        for line, reason in bad_rows:
            headers = {
                names.CONTENT_TYPE: JSON,
                names.MSG_ID: names.bad_row_id(spec.run, line),
                names.DLQ_REASON: reason,
                names.DLQ_SERVICE: self.name,
            }
            body = msgspec.json.encode(BadRow(spec.job, spec.run, line))
            await self.ctx.publisher.publish(names.dlq(self.name), body, headers)
        return count, [line for line, _ in bad_rows[:REJECTED_LINES_SHOWN]]

    async def _previous_state(self, spec: JobSpec) -> ProviderState | None:
        """What an earlier process recorded for this very run (None for a new run)."""
        try:
            entry = await self.state_kv.get(names.provider_state_key(spec.job))
            state = msgspec.json.decode(entry.value or b"null", type=ProviderState | None)
        except Exception:
            return None
        return state if state is not None and state.run == spec.run else None

    async def _record(
        self,
        spec: JobSpec,
        state: JobState,
        ticks: int = 0,
        error: str | None = None,
        resume: dict[str, int] | None = None,
        attempts: int = 0,
        next_attempt_ns: int = 0,
    ) -> None:
        job = self.jobs.get(spec.job)
        feed = job.sink.feed if job is not None and job.spec.run == spec.run else None
        record = ProviderState(
            spec.job,
            spec.run,
            spec.provider,
            state,
            time.time_ns(),
            ticks,
            error,
            resume or {},
            self.instance,
            attempts,
            next_attempt_ns,
            feed,
        )
        try:
            await self.state_kv.put(names.provider_state_key(spec.job), msgspec.json.encode(record))
        except Exception as exc:
            self.ctx.log.warning("state_write_failed", job=spec.job, error=repr(exc))

    async def _failed(self, spec: JobSpec, error: str) -> None:
        event = Failed(time.time_ns(), error, spec.job, spec.run, spec.provider)
        await publish_event(self.ctx.publisher, event)
