"""Messages on the bus, as plain typed msgspec structs. Field names are public API."""

from __future__ import annotations

import re
from typing import Annotated, Any

from msgspec import Meta, Struct

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
    """Whether bars reach the store at all, and the default dry-run of new jobs."""

    enabled: bool = True
    dry_run: bool = False


class StoreSync(Struct, frozen=True, omit_defaults=True):
    """How bar batches travel to the store: `bus`, `http` (forwarded by POST) or `none`."""

    mode: str = "bus"
    http_url: str = ""


class Policy(Struct, omit_defaults=True):
    """The effective ingestion policy, published by control in `ingest_state` under `policy`."""

    write_path: WritePath = WritePath()
    store_sync: StoreSync = StoreSync()
    revision: int = 0
