"""The control protocol (`ingest.control.*`) and the desired jobs (`ingest_jobs`).

The effective policy control publishes is `shared.config.EffectivePolicy`, the config model itself.
"""

from __future__ import annotations

from typing import Any

from msgspec import Struct


class StartRequest(Struct, forbid_unknown_fields=True):
    """`ingest.control.start`: only `provider` is required."""

    provider: str
    symbols: list[str] | None = None
    dry_run: bool | None = None
    job: str = "default"
    params: dict[str, Any] = {}


class StopRequest(Struct, forbid_unknown_fields=True):
    """`ingest.control.stop`."""

    job: str = "default"
    reason: str = "operator_request"


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


class ErrorBody(Struct):
    """The error object of a failed reply."""

    code: str
    message: str


class ErrorReply(Struct):
    """A failed request's reply (`{"ok": false, "error": {code, message}}`), on NATS and HTTP."""

    error: ErrorBody
    ok: bool = False
