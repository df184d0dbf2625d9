"""The control protocol (`ingest.control.*`), the desired jobs (`ingest_jobs`) and the policy."""

from __future__ import annotations

from typing import Any

from msgspec import Struct, field


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


class WritePath(Struct, frozen=True, omit_defaults=True):
    """Whether bars reach the store at all, the default dry-run of new jobs, the auto-stop."""

    enabled: bool = True
    dry_run: bool = False
    max_runtime_seconds: float = 0.0


class StoreSync(Struct, frozen=True, omit_defaults=True):
    """How bar batches travel to the store: `bus`, `http` (forwarded by POST) or `none`.

    `http_url` empty means the store service's own ingest API (`POST /v1/bars`).
    """

    mode: str = "bus"
    http_url: str = ""
    http_timeout_s: float = 10.0


class Batching(Struct, frozen=True, omit_defaults=True):
    """The aggregator's hybrid batcher towards the store (rows / bytes / time)."""

    max_rows: int = 5000
    max_bytes: int = 1_000_000
    max_delay_ms: int = 200


class BarsPolicy(Struct, frozen=True, omit_defaults=True):
    """Bar intervals and closing rules."""

    intervals: list[str] = field(default_factory=lambda: ["1s", "1m"])
    grace_ms: int = 500
    revise_window_s: float = 60.0
    price_type: str = "LAST"


class Fallback(Struct, frozen=True, omit_defaults=True):
    """Source order per symbol (first available wins), and the default order."""

    default: list[str] = field(default_factory=lambda: ["ibkr", "replay", "synthetic"])
    symbols: dict[str, list[str]] = {}


class Policy(Struct, omit_defaults=True):
    """The effective ingestion policy, published by control in `ingest_state` under `policy`.

    `batching`, `bars` and `fallback` are None when the writer did not set them: a reader then
    keeps its own settings.
    """

    write_path: WritePath = WritePath()
    store_sync: StoreSync = StoreSync()
    revision: int = 0
    batching: Batching | None = None
    bars: BarsPolicy | None = None
    fallback: Fallback | None = None
