"""The control service: `ingest.control.*` in, desired state in `ingest_jobs`, policy out.

State that matters lives in JetStream KV, never only in this process: the desired jobs (with
their deadlines) in `ingest_jobs`, the effective policy, the last stop of each job and the HTTP
facade's address in `ingest_state`. A control service restarted mid-job therefore answers
`status` exactly as before and still stops the job at its deadline; several replicas can run.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sys
import time
from collections.abc import Awaitable, Callable
from typing import ClassVar

import msgspec
from msgspec import UNSET
from nats.aio.msg import Msg
from nats.js.api import AckPolicy
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from prometheus_client import Counter, Gauge
from pydantic import ValidationError

from mdp.services.control.guards import (
    ControlError,
    build_job,
    check_capacity,
    expired,
    is_live,
    job_state,
    live_host,
    load_checked_config,
    next_deadline,
    parse_reload,
    parse_reset,
    parse_start,
    parse_status,
    parse_stop,
    standby_jobs,
)
from mdp.services.control.http import ControlHttp
from mdp.shared.bus.kv import follow, kv_keys
from mdp.shared.bus.publisher import publish_event
from mdp.shared.circuit import Circuits, view
from mdp.shared.config import Config, ConfigError, EffectivePolicy
from mdp.shared.contract import names
from mdp.shared.contract.control import (
    ENDPOINTS,
    JobSpec,
    JobStatus,
    JobView,
    Limits,
    ProviderInfo,
    ProviderReport,
    ReloadReply,
    Reply,
    ResetReply,
    StartReply,
    StatusReply,
    StopReply,
    endpoint_metadata,
)
from mdp.shared.contract.events import (
    Event,
    Failed,
    Reloaded,
    Started,
    Stopped,
    Suppressed,
    decode_event,
)
from mdp.shared.contract.records import (
    CircuitRecord,
    CircuitState,
    ProviderHost,
    ProviderState,
    ServiceUrl,
    StopRecord,
)
from mdp.shared.runtime import Context, ServiceError
from mdp.shared.settings import Settings

INGEST_ACTIVE = Gauge("ingest_active", "Jobs running per provider", ["provider"])
INGEST_STARTS = Counter("ingest_starts_total", "Jobs started", ["provider"])
INGEST_STOPS = Counter("ingest_stops_total", "Jobs stopped", ["provider", "reason"])
INGEST_ERRORS = Counter(
    "ingest_errors_total", "Refused requests and failed jobs", ["provider", "stage"]
)
INGEST_SUPPRESSED = Counter(
    "ingest_writes_suppressed_total",
    "Bar batches kept from the store by the dry run or the disabled write path",
    ["reason"],
)
BARS_SUPPRESSED = Counter(
    "mdp_ingest_bars_suppressed_total", "Bars in the suppressed batches", ["reason"]
)
PROVIDER_CIRCUIT = Gauge(
    "mdp_provider_circuit_state",
    "Each provider's circuit breaker: 0 closed, 1 half_open, 2 open",
    ["provider"],
)
CIRCUIT_LEVELS: dict[CircuitState, int] = {"closed": 0, "half_open": 1, "open": 2}
SUPPRESSION_REASONS = ("dry_run", "write_path_disabled")
for _reason in SUPPRESSION_REASONS:
    INGEST_SUPPRESSED.labels(_reason)
    BARS_SUPPRESSED.labels(_reason)

AUTO_STOP_REASON = "auto_duration_reached"
NO_HOST = "no_adapter_host"
HOST_CHECK_PERIOD_S = 1.0
# The gauge is recomputed this often: an open breaker turns half_open by the clock alone.
CIRCUIT_GAUGE_PERIOD_S = 1.0

Handler = Callable[[bytes], Awaitable[Reply]]


def load_or_exit(loader: Callable[[], Config]) -> Config:
    """Run a configuration loader; on an invalid configuration print why and exit 2."""
    try:
        return loader()
    except ConfigError as exc:
        print(f"mdp control: {exc.message}", file=sys.stderr)
    raise SystemExit(2)


class ControlService:
    """Answers start, stop, status, reload, reset over NATS and HTTP; stops jobs at deadlines."""

    name: ClassVar[str] = "control"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Validated before connecting: a bad file is a clean exit with its message, no traceback.
        self.config: Config = load_or_exit(load_checked_config)
        self.http_settings = settings.control
        # Resolved once: the directories a replay job may read (the working directory may move).
        self.replay_roots = settings.replay_roots()
        self.policy_revision = 0
        self.lock = asyncio.Lock()
        self.jobs: dict[str, JobSpec] = {}  # as last seen in `ingest_jobs` (for the timer)
        self.provider_states: dict[str, ProviderState] = {}
        self.hosts: dict[str, ProviderHost] = {}  # provider processes, by instance
        self.circuit_records: dict[str, CircuitRecord] = {}  # `circuit.<provider>`, followed
        self.failed_runs: set[str] = set()
        self.changed = asyncio.Event()
        self.http: ControlHttp | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self, ctx: Context) -> None:
        """Publish the policy, follow the buckets, register the endpoints, open the facade."""
        self.ctx = ctx
        self.jobs_kv = await ctx.js.key_value(names.KV_JOBS)
        self.state_kv = await ctx.js.key_value(names.KV_STATE)
        for source in self.config.sources.items():
            ctx.log.info("config", file=source[0], source=source[1])
        for provider in self.config.providers.providers:
            INGEST_ACTIVE.labels(provider).set(0)
            PROVIDER_CIRCUIT.labels(provider).set(0)
        self.circuits = Circuits(
            self.state_kv, ctx.publisher, self.config.policy.circuit.breaker(), ctx.log
        )
        await self._publish_policy()
        ctx.spawn(self._watch_jobs(), "watch-jobs")
        ctx.spawn(self._watch_provider_states(), "watch-provider-states")
        ctx.spawn(self._auto_stop(), "auto-stop")
        ctx.spawn(self._watch_hosts(), "watch-hosts")
        ctx.spawn(self._fail_unhosted(), "fail-unhosted")
        ctx.spawn(self._watch_circuits(), "watch-circuits")
        ctx.spawn(self._circuit_gauge(), "circuit-gauge")
        suppressed = names.event("suppressed")
        await ctx.consume(
            names.STREAM_EVENTS,
            "control-suppressed",
            [suppressed],
            self._on_suppressed,
            batch=64,
            ack=AckPolicy.EXPLICIT,
        )
        handlers: dict[str, Handler] = {
            "start": self.start_job,
            "stop": self.stop_job,
            "status": self.status,
            "reload": self.reload,
            "reset": self.reset,
        }
        self.handlers = handlers
        for verb in ENDPOINTS:  # the contract's table: one endpoint per verb
            await ctx.add_endpoint(
                verb,
                names.control(verb),
                functools.partial(self.answer, verb),
                metadata=endpoint_metadata(verb),
            )
        self.http = ControlHttp(self.dispatch, self.http_settings)
        url = await self.http.start()
        await self.state_kv.put(names.HTTP_CONTROL_KEY, msgspec.json.encode(ServiceUrl(url)))
        ctx.log.info("http_listening", url=url)

    async def stop(self) -> None:
        """Close the facade and stop counting; the desired state stays in the bucket."""
        if self.http is not None:
            await self.http.stop()

    # -- request handling ----------------------------------------------------------------------

    async def answer(self, verb: str, body: bytes) -> bytes:
        """Run one request; its JSON reply, or a `ControlError` (counted, logged) to answer.

        Nothing else leaves it: a failure is an `internal` error reply, never an exception
        the runtime would turn into an empty reply.
        """
        try:
            reply = await self.handlers[verb](body)
        except ControlError as exc:
            error = exc
        except Exception as exc:
            self.ctx.log.error("control_failed", verb=verb, error=repr(exc), exc_info=True)
            error = ControlError("internal", f"{verb} failed: {exc!r}")
            try:
                await self._event(Failed(time.time_ns(), error.message, stage=verb))
            except Exception as event_exc:  # NATS down, say: the reply still goes out
                self.ctx.log.error("failed_event_lost", verb=verb, error=repr(event_exc))
        else:
            return msgspec.json.encode(reply)
        INGEST_ERRORS.labels(self._provider_label(body), verb).inc()
        self.ctx.log.info("refused", verb=verb, code=error.code, message=error.message)
        raise error

    async def dispatch(self, verb: str, body: bytes) -> tuple[int, bytes]:
        """`answer` for the HTTP facade: the status and the same JSON as on NATS."""
        try:
            return 200, await self.answer(verb, body)
        except ServiceError as exc:
            return exc.status, msgspec.json.encode(exc.reply)

    def _provider_label(self, body: bytes) -> str:
        # Only configured names become label values: a client must not mint time series.
        try:
            value = msgspec.json.decode(body or b"{}")
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            return "none"
        name = value.get("provider") if isinstance(value, dict) else None
        if name is None:
            return "none"
        if not isinstance(name, str):  # a list, a number: refused as invalid_request anyway
            return "unknown"
        return name if name in self.config.providers.providers else "unknown"

    async def start_job(self, body: bytes) -> StartReply:
        """Validate, apply the guards, write the job, announce it."""
        request = parse_start(body)
        async with self.lock:
            spec = build_job(request, self.config, time.time_ns(), roots=self.replay_roots)
            standbys: list[JobSpec] = []
            if request.standby:
                live_adapters = {
                    adapter.name
                    for host in self._live_hosts(time.time_ns())
                    for adapter in host.adapters
                    if adapter.live
                }
                standbys = standby_jobs(spec, self.config, live_adapters, roots=self.replay_roots)
            live = await self._live_jobs()
            max_jobs = self.config.policy.guards.max_concurrent_jobs
            for job in (spec, *standbys):
                check_capacity(job, live, max_jobs)
                live[job.job] = job  # the standbys count against the limit too
            for job in (spec, *standbys):
                await self._write_job(job)
            self._wake()
        for job in (spec, *standbys):
            INGEST_STARTS.labels(job.provider).inc()
            event = Started(
                time.time_ns(),
                job.job,
                job.run,
                job.provider,
                job.symbols,
                job.dry_run,
                job.deadline_ns,
            )
            await self._event(event)
            self.ctx.log.info(
                "job_started",
                job=job.job,
                run=job.run,
                provider=job.provider,
                standby_of=job.standby_of or None,
            )
        reply = StartReply(job=_job_view(spec))
        if request.standby:
            reply.standbys = [_job_view(job) for job in standbys]
        return reply

    async def _write_job(self, spec: JobSpec) -> None:
        """Put a job into the desired state (replacing a finished run of the same name)."""
        try:
            await self.jobs_kv.create(spec.job, msgspec.json.encode(spec))
        except KeyWrongLastSequenceError:
            # A finished run of the same name is replaced; a live one raced us (a replica).
            entry = await self._entry(spec.job)
            if entry is not None and spec.job in await self._live_jobs():
                raise ControlError(
                    "already_running", f"job {spec.job!r} was started concurrently"
                ) from None
            await self.jobs_kv.update(
                spec.job, msgspec.json.encode(spec), last=entry[1] if entry else 0
            )
        self.jobs[spec.job] = spec

    async def stop_job(self, body: bytes) -> StopReply:
        """Remove the job from the desired state; stopping an idle job is not an error."""
        request = parse_stop(body)
        async with self.lock:
            stopped = await self._stop(request.job, request.reason)
            # Its hot standbys stop with it.
            for standby in [s for s in self.jobs.values() if s.standby_of == request.job]:
                await self._stop(standby.job, request.reason)
        if stopped is None:
            return StopReply(status="idle", job=request.job)
        return StopReply(status="stopped", job=request.job, run=stopped.run, reason=request.reason)

    async def _stop(self, job: str, reason: str, run: str | None = None) -> JobSpec | None:
        """Delete `job` (only run `run` when given); record and announce it. Lock held."""
        entry = await self._entry(job)
        if entry is None:
            return None
        spec, revision = entry
        if run is not None and spec.run != run:
            return None  # restarted since: its new deadline applies
        try:
            await self.jobs_kv.delete(job, last=revision)
        except KeyWrongLastSequenceError:
            return None  # another replica changed it first
        self.jobs.pop(job, None)
        self._wake()
        now = time.time_ns()
        record = StopRecord(job, spec.run, spec.provider, reason, spec.started_ns, now)
        await self.state_kv.put(names.stopped_key(job), msgspec.json.encode(record))
        INGEST_STOPS.labels(spec.provider, reason).inc()
        await self._event(Stopped(now, job, spec.run, spec.provider, reason))
        self.ctx.log.info("job_stopped", job=job, run=spec.run, reason=reason)
        return spec

    async def status(self, body: bytes) -> StatusReply:
        """Jobs with their state and counters, the providers, the policy, recent stops."""
        parse_status(body)
        jobs: list[JobStatus] = []
        now = time.time_ns()
        for key in sorted(await kv_keys(self.ctx.js, names.KV_JOBS)):
            entry = await self._entry(key)
            if entry is None:
                continue
            spec = entry[0]
            provider_state = await self._provider_state(spec.job)
            state = job_state(spec, provider_state)
            report = ProviderReport()
            if provider_state is not None and state != "pending":
                report = ProviderReport(
                    provider_state.state,
                    provider_state.updated_ns,
                    provider_state.ticks,
                    UNSET if provider_state.error is None else provider_state.error,
                    provider_state.owner or UNSET,
                    provider_state.attempts or UNSET,
                    provider_state.next_attempt_ns or UNSET,
                    UNSET if provider_state.feed is None else provider_state.feed,
                )
            view = JobStatus(
                **msgspec.structs.asdict(_job_view(spec)), state=state, provider_state=report
            )
            if spec.deadline_ns:
                view.remaining_s = round(max(0, spec.deadline_ns - now) / 1e9, 3)
            jobs.append(view)
        stopped: list[StopRecord] = []
        for key in await kv_keys(self.ctx.js, names.KV_STATE, names.STOPPED_PREFIX):
            with contextlib.suppress(KeyNotFoundError, msgspec.DecodeError):
                entry_value = (await self.state_kv.get(key)).value
                if entry_value:
                    stopped.append(msgspec.json.decode(entry_value, type=StopRecord))
        stopped.sort(key=lambda record: -record.stopped_ns)
        running = sum(1 for job in jobs if is_live(job.state))
        providers: dict[str, ProviderInfo] = {}
        for name, p in sorted(self.config.providers.providers.items()):
            circuit = await self.circuits.read(name)  # from KV, as of now
            PROVIDER_CIRCUIT.labels(name).set(CIRCUIT_LEVELS[circuit.state])
            providers[name] = ProviderInfo(
                p.enabled,
                list(p.symbols),
                p.symbols_from_source,
                circuit.state,
                circuit.failures,
                UNSET if circuit.opened_at_ns is None else circuit.opened_at_ns,
            )
        return StatusReply(
            jobs=jobs,
            providers=providers,
            policy=self.config.policy.model_dump(),
            policy_revision=self.policy_revision,
            limits=Limits(running, self.config.policy.guards.max_concurrent_jobs),
            stopped=stopped[:20],
            config=dict(self.config.sources),
            http=self.http.url if self.http is not None else None,
            hosts=sorted(self._live_hosts(now), key=lambda host: host.instance),
            effective=self.config.effective_policy(self.policy_revision).model_dump(),
        )

    async def reload(self, body: bytes) -> ReloadReply:
        """Re-read both files; an invalid one is refused and the running config kept."""
        parse_reload(body)
        try:
            config = await asyncio.to_thread(load_checked_config)
        except ConfigError as exc:
            self.ctx.log.error("reload_refused", problems=exc.problems)
            await self._event(Failed(time.time_ns(), exc.message, stage="reload"))
            raise ControlError("config_invalid", exc.message) from None
        async with self.lock:
            self.config = config
            self.circuits.config = config.policy.circuit.breaker()
            await self._publish_policy()
        for provider in config.providers.providers:
            INGEST_ACTIVE.labels(provider).inc(0)
            PROVIDER_CIRCUIT.labels(provider).inc(0)
        self._update_active()
        enabled = sorted(n for n, p in config.providers.providers.items() if p.enabled)
        await self._event(
            Reloaded(time.time_ns(), self.policy_revision, enabled, dict(config.sources))
        )
        self.ctx.log.info("reloaded", revision=self.policy_revision)
        return ReloadReply(
            policy_revision=self.policy_revision,
            policy=config.policy.model_dump(),
            providers=enabled,
            config=dict(config.sources),
        )

    async def reset(self, body: bytes) -> ResetReply:
        """Close a configured provider's breaker by hand; an unknown one disturbs nothing."""
        request = parse_reset(body, self.config)
        outcome = await self.circuits.reset(request.provider)
        await self.ctx.publisher.flush()  # its Circuit event is stored before the reply
        before = outcome.result.from_state if outcome.result is not None else outcome.view.state
        PROVIDER_CIRCUIT.labels(request.provider).set(CIRCUIT_LEVELS[outcome.view.state])
        self.ctx.log.info("circuit_reset", provider=request.provider, from_state=before)
        return ResetReply(provider=request.provider, from_state=before, to_state=outcome.view.state)

    # -- background ------------------------------------------------------------------------------

    async def _publish_policy(self) -> None:
        """Write the effective policy to `ingest_state` under `policy` with the next revision."""
        previous = 0
        with contextlib.suppress(KeyNotFoundError, ValidationError):
            entry = await self.state_kv.get(names.POLICY_KEY)
            if entry.value:
                previous = EffectivePolicy.model_validate_json(entry.value).revision
        self.policy_revision = max(previous, self.policy_revision) + 1
        policy = self.config.effective_policy(self.policy_revision)
        await self.state_kv.put(names.POLICY_KEY, policy.model_dump_json().encode())
        self.ctx.log.info("policy_published", policy=policy.model_dump())

    async def _watch_jobs(self) -> None:
        """Mirror `ingest_jobs` (written by any replica) for the deadline timer and the gauge."""
        async for name, spec in follow(self.jobs_kv, JobSpec, self.ctx.log):
            if spec is None:
                self.jobs.pop(name, None)
            else:
                self.jobs[name] = spec
            self._update_active()
            self._wake()

    async def _watch_provider_states(self) -> None:
        """Follow what providers report, for `ingest_active` and failed-job errors."""
        prefix = names.provider_state_key("")
        async for key, state in follow(self.state_kv, ProviderState, self.ctx.log, prefix + ">"):
            job = key.removeprefix(prefix)
            if state is None:
                self.provider_states.pop(job, None)
            else:
                self.provider_states[job] = state
                if state.state == "failed" and state.run not in self.failed_runs:
                    self.failed_runs.add(state.run)
                    INGEST_ERRORS.labels(self._known(state.provider), "provider").inc()
            self._update_active()

    async def _watch_hosts(self) -> None:
        """Follow which provider processes run, and what each hosts."""
        async for key, host in follow(
            self.state_kv, ProviderHost, self.ctx.log, names.HOSTS_PREFIX + ">"
        ):
            instance = key.removeprefix(names.HOSTS_PREFIX)
            if host is None:
                self.hosts.pop(instance, None)
            else:
                self.hosts[instance] = host

    async def _watch_circuits(self) -> None:
        """Follow the breakers the providers write, for the `mdp_provider_circuit_state` gauge."""
        async for key, record in follow(
            self.state_kv, CircuitRecord, self.ctx.log, names.CIRCUIT_PREFIX + ">"
        ):
            provider = key.removeprefix(names.CIRCUIT_PREFIX)
            if record is None:
                self.circuit_records.pop(provider, None)
            else:
                self.circuit_records[provider] = record
            self._update_circuit_gauge()

    async def _circuit_gauge(self) -> None:
        while True:
            await asyncio.sleep(CIRCUIT_GAUGE_PERIOD_S)
            self._update_circuit_gauge()

    def _update_circuit_gauge(self) -> None:
        """Each configured provider's breaker as of now (only configured names become labels)."""
        now = time.time_ns()
        config = self.config.policy.circuit.breaker()
        for provider in self.config.providers.providers:
            record = self.circuit_records.get(provider)
            state = view(provider, record, config, now).state
            PROVIDER_CIRCUIT.labels(provider).set(CIRCUIT_LEVELS[state])

    def _live_hosts(self, now_ns: int) -> list[ProviderHost]:
        return [h for h in self.hosts.values() if live_host(h, now_ns)]

    async def _fail_unhosted(self) -> None:
        """Fail a pending job no running provider process can host (`no_adapter_host`)."""
        while True:
            await asyncio.sleep(HOST_CHECK_PERIOD_S)
            now = time.time_ns()
            timeout = self.config.policy.ingest.host_timeout_seconds
            hosted = {a.name for host in self._live_hosts(now) for a in host.adapters}
            for spec in list(self.jobs.values()):
                if spec.provider in hosted or now - spec.started_ns < timeout * 1e9:
                    continue
                if job_state(spec, self.provider_states.get(spec.job)) != "pending":
                    continue
                try:
                    await self._fail_pending(spec, hosted, timeout)
                except Exception as exc:  # retried on the next turn
                    self.ctx.log.warning("fail_unhosted_failed", job=spec.job, error=repr(exc))

    async def _fail_pending(self, spec: JobSpec, hosted: set[str], timeout: float) -> None:
        offered = ", ".join(sorted(hosted)) or "none"
        error = (
            f"no_adapter_host: no running provider process hosts adapter {spec.provider!r} "
            f"(hosted: {offered}); started {timeout:g} s ago. Run `mdp service provider "
            f"--adapters {spec.provider}`, or install the adapter's package"
        )
        state = ProviderState(spec.job, spec.run, spec.provider, "failed", time.time_ns(), 0, error)
        await self.state_kv.put(names.provider_state_key(spec.job), msgspec.json.encode(state))
        failed = Failed(time.time_ns(), error, spec.job, spec.run, spec.provider, code=NO_HOST)
        await self._event(failed)
        self.ctx.log.error("job_unhosted", job=spec.job, provider=spec.provider)

    def _known(self, provider: str) -> str:
        return provider if provider in self.config.providers.providers else "unknown"

    def _update_active(self) -> None:
        counts = dict.fromkeys(self.config.providers.providers, 0)
        for spec in self.jobs.values():
            # A pending job counts once a provider runs it: it may never be hosted.
            if job_state(spec, self.provider_states.get(spec.job)) == "running":
                key = self._known(spec.provider)
                counts[key] = counts.get(key, 0) + 1
        for provider, count in counts.items():
            INGEST_ACTIVE.labels(provider).set(count)

    def _wake(self) -> None:
        self.changed.set()

    async def _auto_stop(self) -> None:
        """Stop every job whose deadline passed (reason `auto_duration_reached`)."""
        while True:
            # Cleared before looking, so a job written meanwhile wakes the wait below.
            self.changed.clear()
            for spec in expired(self.jobs, time.time_ns()):
                try:
                    async with self.lock:
                        await self._stop(spec.job, AUTO_STOP_REASON, run=spec.run)
                except Exception as exc:  # retried on the next turn; never kill the timer
                    self.ctx.log.error("auto_stop_failed", job=spec.job, error=repr(exc))
                    INGEST_ERRORS.labels(self._known(spec.provider), "auto_stop").inc()
                    await asyncio.sleep(1.0)
            deadline = next_deadline(self.jobs)
            timeout = 60.0
            if deadline:
                # At least 50 ms: a job whose stop lost a race stays due until the watch catches up.
                timeout = min(timeout, max(0.05, (deadline - time.time_ns()) / 1e9 + 0.001))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), timeout=timeout)

    async def _on_suppressed(self, msgs: list[Msg]) -> None:
        """Count each batch the aggregator kept from the store (`ingest.events.suppressed`)."""
        for msg in msgs:
            try:
                event = decode_event(msg.subject, msg.data)
            except ValueError:  # msgspec's errors and an unknown event alike
                self.ctx.log.warning("bad_suppressed_event", data=msg.data[:200])
                continue
            if not isinstance(event, Suppressed):
                continue
            reason = event.reason if event.reason in SUPPRESSION_REASONS else "other"
            INGEST_SUPPRESSED.labels(reason).inc()
            BARS_SUPPRESSED.labels(reason).inc(max(event.bars, 0))

    # -- KV helpers ------------------------------------------------------------------------------

    async def _entry(self, name: str) -> tuple[JobSpec, int] | None:
        try:
            entry = await self.jobs_kv.get(name)
        except KeyNotFoundError:
            return None
        if not entry.value:
            return None
        return msgspec.json.decode(entry.value, type=JobSpec), int(entry.revision or 0)

    async def _provider_state(self, job: str) -> ProviderState | None:
        try:
            entry = await self.state_kv.get(names.provider_state_key(job))
            return msgspec.json.decode(entry.value or b"null", type=ProviderState | None)
        except (KeyNotFoundError, msgspec.DecodeError):
            return None

    async def _live_jobs(self) -> dict[str, JobSpec]:
        live = {}
        for key in await kv_keys(self.ctx.js, names.KV_JOBS):
            entry = await self._entry(key)
            if entry is None:
                continue
            spec = entry[0]
            if is_live(job_state(spec, await self._provider_state(spec.job))):
                live[spec.job] = spec
        return live

    async def _event(self, event: Event) -> None:
        await publish_event(self.ctx.publisher, event)
        await self.ctx.publisher.flush()


def _job_view(spec: JobSpec) -> JobView:
    return JobView(**msgspec.structs.asdict(spec))
