"""The control service: `ingest.control.*` requests in, desired state in `ingest_jobs` out."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from importlib.metadata import entry_points
from typing import Any, ClassVar

import msgspec
from nats.js.errors import KeyNotFoundError
from nats.micro.request import Request
from prometheus_client import Counter, Gauge

from services.control.guards import ControlError, build_job, parse_start, parse_stop
from shared import subjects
from shared.bus import KV_JOBS, KV_STATE
from shared.codec import CONTENT_TYPE, JSON
from shared.runtime import Context
from shared.schemas import JobSpec
from shared.settings import Settings

INGEST_ACTIVE = Gauge("ingest_active", "Jobs running per provider", ["provider"])
INGEST_STARTS = Counter("ingest_starts_total", "Jobs started", ["provider"])
INGEST_STOPS = Counter("ingest_stops_total", "Jobs stopped", ["provider", "reason"])
INGEST_ERRORS = Counter("ingest_errors_total", "Control errors", ["provider", "stage"])

# Providers whose symbols come from their source when the request names none.
SYMBOLS_FROM_SOURCE = frozenset({"replay"})


def provider_names() -> set[str]:
    """Adapters installed in this environment (entry-point group `mdp.adapters`)."""
    names = {ep.name for ep in entry_points(group="mdp.adapters")}
    return names or {"synthetic", "replay"}


Handler = Callable[[bytes], Awaitable[dict[str, Any]]]


class ControlService:
    """Answers start, stop, status and reload; the providers act on what it writes."""

    name: ClassVar[str] = "control"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.providers = provider_names()

    async def start(self, ctx: Context) -> None:
        """Open the buckets and register the endpoints."""
        self.ctx = ctx
        self.jobs_kv = await ctx.js.key_value(KV_JOBS)
        self.state_kv = await ctx.js.key_value(KV_STATE)
        handlers: dict[str, Handler] = {
            "start": self.start_job,
            "stop": self.stop_job,
            "status": self.status,
            "reload": self.reload,
        }
        for verb, handler in handlers.items():
            await ctx.micro.add_endpoint(
                name=verb, subject=subjects.control(verb), handler=self._endpoint(verb, handler)
            )

    async def stop(self) -> None:
        """Nothing is held: the desired state lives in the bucket."""

    def _endpoint(self, verb: str, handler: Handler) -> Callable[[Request], Awaitable[None]]:
        async def endpoint(request: Request) -> None:
            try:
                reply = await handler(request.data)
            except ControlError as exc:
                await self._refuse(request, verb, exc)
                return
            except Exception as exc:
                self.ctx.log.error("control_failed", verb=verb, error=repr(exc))
                await self._refuse(request, verb, ControlError("internal", repr(exc)))
                return
            await request.respond(msgspec.json.encode({"ok": True, **reply}))

        return endpoint

    async def _refuse(self, request: Request, verb: str, exc: ControlError) -> None:
        INGEST_ERRORS.labels(_provider_of(request.data), verb).inc()
        body = msgspec.json.encode(
            {"ok": False, "error": {"code": exc.code, "message": exc.message}}
        )
        await request.respond_error(str(exc.http_status), f"{exc.code}: {exc.message}", body)

    async def start_job(self, body: bytes) -> dict[str, Any]:
        """Validate, apply the guards, write the job, announce it."""
        request = parse_start(body)
        spec = build_job(request, self.providers, SYMBOLS_FROM_SOURCE, False, time.time_ns())
        current = await self._job(spec.job)
        if current is not None and await self._is_live(current):
            raise ControlError(
                "already_running",
                f"job {spec.job!r} is already running provider {current.provider!r}; "
                "stop it first or start another job name",
            )
        await self.jobs_kv.put(spec.job, msgspec.json.encode(spec))
        INGEST_STARTS.labels(spec.provider).inc()
        INGEST_ACTIVE.labels(spec.provider).inc()
        await self._event("started", spec)
        return {"status": "running", "job": _job_view(spec)}

    async def stop_job(self, body: bytes) -> dict[str, Any]:
        """Remove the job from the desired state; stopping an idle job is not an error."""
        request = parse_stop(body)
        current = await self._job(request.job)
        if current is None:
            return {"status": "idle", "job": request.job}
        await self.jobs_kv.delete(request.job)
        INGEST_STOPS.labels(current.provider, request.reason).inc()
        INGEST_ACTIVE.labels(current.provider).dec()
        await self._event("stopped", current, reason=request.reason)
        return {"status": "stopped", "job": request.job, "reason": request.reason}

    async def status(self, body: bytes) -> dict[str, Any]:
        """Jobs with their provider-side state, and the providers known here."""
        del body
        jobs = []
        for key in await self._keys():
            spec = await self._job(key)
            if spec is None:
                continue
            view = _job_view(spec)
            view["provider_state"] = await self._provider_state(spec)
            jobs.append(view)
        return {
            "jobs": jobs,
            "providers": {name: {"enabled": True} for name in sorted(self.providers)},
        }

    async def reload(self, body: bytes) -> dict[str, Any]:
        """Re-read the provider registry."""
        del body
        self.providers = provider_names()
        await self.ctx.publisher.publish(
            subjects.event("reloaded"),
            msgspec.json.encode({"ts": time.time_ns(), "providers": sorted(self.providers)}),
            {CONTENT_TYPE: JSON},
        )
        return {"status": "reloaded", "providers": sorted(self.providers)}

    async def _keys(self) -> list[str]:
        try:
            return list(await self.jobs_kv.keys())
        except Exception:  # nats-py raises NoKeysError on an empty bucket
            return []

    async def _job(self, name: str) -> JobSpec | None:
        try:
            entry = await self.jobs_kv.get(name)
        except KeyNotFoundError:
            return None
        if not entry.value:
            return None
        return msgspec.json.decode(entry.value, type=JobSpec)

    async def _provider_state(self, spec: JobSpec) -> dict[str, Any]:
        try:
            entry = await self.state_kv.get(f"provider.{spec.job}")
        except KeyNotFoundError:
            return {"state": "pending"}
        state: dict[str, Any] = msgspec.json.decode(entry.value or b"{}")
        return state if state.get("run") == spec.run else {"state": "pending"}

    async def _is_live(self, spec: JobSpec) -> bool:
        state = await self._provider_state(spec)
        return state.get("state") not in ("completed", "failed")

    async def _event(self, name: str, spec: JobSpec, **extra: Any) -> None:
        body = {"ts": time.time_ns(), "job": spec.job, "run": spec.run, "provider": spec.provider}
        body.update(extra)
        await self.ctx.publisher.publish(
            subjects.event(name), msgspec.json.encode(body), {CONTENT_TYPE: JSON}
        )
        await self.ctx.publisher.flush()


def _job_view(spec: JobSpec) -> dict[str, Any]:
    view: dict[str, Any] = msgspec.to_builtins(spec)
    view.setdefault("dry_run", False)
    return view


def _provider_of(body: bytes) -> str:
    try:
        value = msgspec.json.decode(body or b"{}")
    except msgspec.DecodeError:
        return "unknown"
    return str(value.get("provider", "unknown")) if isinstance(value, dict) else "unknown"
