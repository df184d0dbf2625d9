"""Messages on the bus, as plain typed msgspec structs. Field names are public API."""

from __future__ import annotations

import re
from typing import Annotated, Any

from msgspec import Meta, Struct, field

NonNegative = Annotated[float, Meta(ge=0)]
EpochNs = Annotated[int, Meta(gt=0)]


class Tick(Struct, omit_defaults=True, gc=False):
    """One trade (price, size) and optionally the quote around it; times in ns since the epoch."""

    ts: EpochNs
    recv: int
    seq: int
    price: float
    size: NonNegative
    bid: float | None = None
    ask: float | None = None
    bid_size: NonNegative | None = None
    ask_size: NonNegative | None = None


class TickBatch(Struct, gc=False):
    """1..N ticks of one symbol from one provider, in arrival order."""

    symbol: str
    provider: str
    ticks: list[Tick]


class Bar(Struct, gc=False):
    """An OHLCV bar over `[start, end)` by event time; `rev` grows with each revision."""

    symbol: str
    interval: str
    start: int
    end: int
    open: float
    high: float
    low: float
    close: float
    volume: float
    trade_count: int
    vwap: float | None
    provider: str
    rev: int = 0

    @property
    def bar_id(self) -> str:
        """The deterministic id `interval:symbol:start:rev` (also its `Nats-Msg-Id`)."""
        return f"{self.interval}:{self.symbol}:{self.start}:{self.rev}"


class BarBatch(Struct, gc=False):
    """Bars on their way to the store."""

    batch_id: str
    bars: list[Bar]


# ---------------------------------------------------------------------------------------------
# Intervals ("1s", "5m", "1h"): the subject token of a bar spec.

_INTERVAL_RE = re.compile(r"^([1-9][0-9]*)(ms|s|m|h|d)$")
_UNIT_NS = {"ms": 1_000_000, "s": 1_000_000_000, "m": 60_000_000_000, "h": 3_600_000_000_000}
_UNIT_NS["d"] = 24 * _UNIT_NS["h"]


def interval_ns(interval: str) -> int:
    """Width in ns of an interval such as `1s`, `15m`, `1h`; ValueError for anything else."""
    match = _INTERVAL_RE.match(interval)
    if not match:
        raise ValueError(
            f"interval {interval!r} is not <positive integer><unit> with unit ms, s, m, h or d"
        )
    return int(match.group(1)) * _UNIT_NS[match.group(2)]


# ---------------------------------------------------------------------------------------------
# Control protocol (`ingest.control.*`) and desired state (`ingest_jobs` KV).


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
    """The error object of a failed control reply."""

    code: str
    message: str


class EndOfStream(Struct, omit_defaults=True):
    """Marks that a bounded source has delivered every tick of `symbol` for run `run`."""

    run: str
    symbol: str
    symbols_total: int
    ticks: int = 0


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
