"""Market data on the bus (ticks, bars, end markers, dead letters); field names are public API."""

from __future__ import annotations

import re
from typing import Annotated

from msgspec import Meta, Struct

from mdp.shared.contract import names

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
        return names.bar_id(self.interval, self.symbol, self.start, self.rev)


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


def check_intervals(intervals: list[str]) -> list[str]:
    """Intervals de-duplicated, narrowest first; ValueError for none or one that does not parse."""
    if not intervals:
        raise ValueError("at least one interval is needed")
    return sorted(set(intervals), key=interval_ns)


class EndOfStream(Struct, omit_defaults=True):
    """Marks that a bounded source has delivered every tick of `symbol` for run `run`."""

    run: str
    symbol: str
    symbols_total: int
    ticks: int = 0


# ---------------------------------------------------------------------------------------------
# Dead-letter bodies (on `md.dlq.<service>`, the reason in headers)


class DeadTick(Struct, omit_defaults=True):
    """A tick the aggregator rejected; `interval` set when it was late for that interval."""

    symbol: str
    tick: Tick
    interval: str | None = None


class BadRow(Struct):
    """A source row an adapter rejected (its reason in the headers)."""

    job: str
    run: str
    line: int
