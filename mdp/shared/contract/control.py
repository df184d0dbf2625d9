"""The control protocol (`ingest.control.*`) and the desired jobs (`ingest_jobs`).

The effective policy control publishes is `mdp.shared.config.EffectivePolicy`, the config
model itself.
"""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import UNSET, Struct, UnsetType

from mdp.shared.contract.records import CircuitState, FeedStatus, ProviderHost, StopRecord


class StartRequest(Struct, forbid_unknown_fields=True):
    """`ingest.control.start`: only `provider` is required."""

    provider: str
    symbols: list[str] | None = None
    dry_run: bool | None = None
    job: str = "default"
    params: dict[str, Any] = {}
    # Also start the job's fallback sources (data_providers.yaml `fallback`) as hot standbys.
    standby: bool = False


class StopRequest(Struct, forbid_unknown_fields=True):
    """`ingest.control.stop`."""

    job: str = "default"
    reason: str = "operator_request"


class ResetRequest(Struct, forbid_unknown_fields=True):
    """`ingest.control.reset`: close a provider's circuit breaker by hand."""

    provider: str


class StatusRequest(Struct, forbid_unknown_fields=True):
    """`ingest.control.status`: no fields; the body is optional (empty or `{}`)."""


class ReloadRequest(Struct, forbid_unknown_fields=True):
    """`ingest.control.reload`: no fields; the body is optional (empty or `{}`)."""


class JobSpec(Struct, omit_defaults=True):
    """A job the providers must run, as the control service writes it into `ingest_jobs`."""

    job: str
    provider: str
    symbols: list[str]
    params: dict[str, Any] = {}
    dry_run: bool = False
    started_ns: int = 0
    deadline_ns: int = 0
    run: str = ""
    standby_of: str = ""  # a hot standby: the job whose symbols it backs up (stops with it)


class ErrorBody(Struct):
    """The error object of a failed reply."""

    code: str
    message: str


class ErrorReply(Struct):
    """A failed request's reply (`{"ok": false, "error": {code, message}}`), on NATS and HTTP."""

    error: ErrorBody
    ok: bool = False


# ---------------------------------------------------------------------------------------------
# Successful replies (`{"ok": true, ...}`)


class JobView(JobSpec, omit_defaults=False):
    """A job as replies show it: every field of its JobSpec, defaults included."""


class ProviderReport(Struct):
    """What the job's provider reported on this run (`{}` while the job is pending)."""

    state: str | UnsetType = UNSET
    updated_ns: int | UnsetType = UNSET
    ticks: int | UnsetType = UNSET
    error: str | UnsetType = UNSET
    owner: str | UnsetType = UNSET
    attempts: int | UnsetType = UNSET
    next_attempt_ns: int | UnsetType = UNSET
    feed: FeedStatus | UnsetType = UNSET  # a live feed's connection report (ibkr)


class JobStatus(JobView, kw_only=True):
    """A job in `status`: its spec, its state, the provider's report, time left (if due)."""

    state: str
    provider_state: ProviderReport
    remaining_s: float | UnsetType = UNSET


class ProviderInfo(Struct):
    """A configured provider in `status`; its breaker as of the request (`circuit.<provider>`).

    `circuit` is `closed`, `open` or `half_open` (an open breaker past its recovery reads
    half_open); `failures_in_window` the failures its window holds now; `opened_at_ns` when it
    last opened (absent while closed).
    """

    enabled: bool
    symbols: list[str]
    symbols_from_source: bool
    circuit: CircuitState
    failures_in_window: int = 0
    opened_at_ns: int | UnsetType = UNSET


class Limits(Struct):
    """How many jobs run, against the limit."""

    running: int
    max_concurrent_jobs: int


class StartReply(Struct, kw_only=True):
    """`start` succeeded: the job is in the desired state."""

    ok: bool = True
    status: str = "running"
    job: JobView
    standbys: list[JobView] | UnsetType = UNSET  # started with `"standby": true`


class StopReply(Struct, kw_only=True):
    """`stop`: `stopped` with the run and reason, or `idle` when the job was not running."""

    ok: bool = True
    status: str
    job: str
    run: str | UnsetType = UNSET
    reason: str | UnsetType = UNSET


class StatusReply(Struct, kw_only=True):
    """`status`: jobs, providers, the policy (as the files say, and as published), recent stops."""

    ok: bool = True
    jobs: list[JobStatus]
    providers: dict[str, ProviderInfo]
    policy: dict[str, Any]
    policy_revision: int
    limits: Limits
    stopped: list[StopRecord]
    config: dict[str, str]
    http: str | None
    hosts: list[ProviderHost]  # the live provider processes and the adapters each hosts
    # The published policy the other services follow (bars, batching, fallback, ...).
    effective: dict[str, Any] = {}


class ReloadReply(Struct, kw_only=True):
    """`reload` succeeded: the new policy revision and what is in force."""

    ok: bool = True
    status: str = "reloaded"
    policy_revision: int
    policy: dict[str, Any]
    providers: list[str]
    config: dict[str, str]


class ResetReply(Struct, kw_only=True):
    """`reset` succeeded: the provider's breaker before (`from_state`) and now (`closed`)."""

    ok: bool = True
    status: str = "reset"
    provider: str
    from_state: CircuitState
    to_state: CircuitState


Reply = StartReply | StopReply | StatusReply | ReloadReply | ResetReply


ENDPOINTS: dict[str, tuple[type[Any], type[Any]]] = {
    "start": (StartRequest, StartReply),
    "stop": (StopRequest, StopReply),
    "status": (StatusRequest, StatusReply),
    "reload": (ReloadRequest, ReloadReply),
    "reset": (ResetRequest, ResetReply),
}
"""Each `ingest.control.<verb>`: the request it decodes and the reply it answers (or ErrorReply)."""


def endpoint_metadata(verb: str) -> dict[str, str]:
    """The JSON Schemas of a control endpoint, as its micro metadata (`$SRV.INFO`)."""
    request, reply = ENDPOINTS[verb]
    schema = msgspec.json.schema
    return {
        "request_schema": msgspec.json.encode(schema(request)).decode(),
        "response_schema": msgspec.json.encode(schema(reply)).decode(),
        "error_schema": msgspec.json.encode(schema(ErrorReply)).decode(),
    }
