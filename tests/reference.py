"""Load recorded tick files and their reference bars, and compare bars with the references.

The files follow `shared/data/README.md`: ticks as `ts_ns,ts_utc,symbol,price,size,...`
(optionally gzipped, in arrival order), reference bars as
`symbol,bar_start_utc,bar_start_ns,open,high,low,close,volume,trade_count,vwap`.
"""

from __future__ import annotations

import csv
import gzip
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple, TextIO

from mdp.shared.contract.messages import Bar, Tick

VWAP_REL_TOL = 1e-9

RefKey = tuple[str, str, int]
"""(symbol, interval, bar start ns)"""


class RefBar(NamedTuple):
    """One reference bar, numbers parsed as float64 from the exact decimal strings."""

    open: float
    high: float
    low: float
    close: float
    volume: float
    trade_count: int
    vwap: float | None


def _open_text(path: Path) -> TextIO:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def load_ticks(path: str | Path) -> list[tuple[str, Tick]]:
    """Every row of a ticks file as `(symbol, Tick)`, in file (arrival) order.

    `recv` is the file's `recv_ns` when it has one, else the event time; `seq` counts the
    symbol's ticks from 1.
    """
    out: list[tuple[str, Tick]] = []
    seqs: dict[str, int] = {}
    with _open_text(Path(path)) as fh:
        reader = csv.reader(fh)
        header = next(reader)
        i_ts, i_sym = header.index("ts_ns"), header.index("symbol")
        i_price, i_size = header.index("price"), header.index("size")
        i_recv = header.index("recv_ns") if "recv_ns" in header else i_ts
        for row in reader:
            symbol = row[i_sym]
            seq = seqs[symbol] = seqs.get(symbol, 0) + 1
            # Positional (ts, recv, seq, price, size): a noticeable saving over 700k rows.
            tick = Tick(
                int(row[i_ts]), int(row[i_recv]), seq, float(row[i_price]), float(row[i_size])
            )
            out.append((symbol, tick))
    return out


def interval_of(path: str | Path) -> str:
    """The interval of a reference file from its name (`<stem>.bars_1s.csv` -> `1s`)."""
    match = re.search(r"\.bars_([0-9]+[a-z]+)\.csv(\.gz)?$", Path(path).name)
    if not match:
        raise ValueError(f"cannot tell the interval of {path}: expected <stem>.bars_<interval>.csv")
    return match.group(1)


def load_reference(path: str | Path, interval: str | None = None) -> dict[RefKey, RefBar]:
    """Reference bars keyed by (symbol, interval, start ns); interval defaults from the name."""
    interval = interval or interval_of(path)
    out: dict[RefKey, RefBar] = {}
    with _open_text(Path(path)) as fh:
        for row in csv.DictReader(fh):
            key = (row["symbol"], interval, int(row["bar_start_ns"]))
            out[key] = RefBar(
                open=float(row["open"]),
                high=float(row["high"]),
                low=float(row["low"]),
                close=float(row["close"]),
                volume=float(row["volume"]),
                trade_count=int(row["trade_count"]),
                vwap=float(row["vwap"]) if row["vwap"] else None,
            )
    return out


def latest_revisions(bars: Iterable[Bar]) -> dict[RefKey, Bar]:
    """The highest `rev` of every (symbol, interval, start)."""
    latest: dict[RefKey, Bar] = {}
    for bar in bars:
        key = (bar.symbol, bar.interval, bar.start)
        seen = latest.get(key)
        if seen is None or bar.rev >= seen.rev:
            latest[key] = bar
    return latest


def compare_bars(
    actual: Iterable[Bar], reference: dict[RefKey, RefBar], interval: str
) -> list[str]:
    """Human-readable differences between bars of `interval` and the reference; empty if equal.

    Only the latest revision of each bar counts. Prices, volume and trade count must be exactly
    equal (float64 of the reference strings); vwap within a relative 1e-9, None for an empty
    reference vwap. Missing and extra bars are reported.
    """
    latest = {k: b for k, b in latest_revisions(actual).items() if k[1] == interval}
    expected = {k: r for k, r in reference.items() if k[1] == interval}
    problems: list[str] = []
    for key in sorted(expected.keys() - latest.keys()):
        problems.append(f"missing bar {_fmt(key)}: expected {expected[key]}")
    for key in sorted(latest.keys() - expected.keys()):
        problems.append(f"extra bar {_fmt(key)}: {latest[key]}")
    for key in sorted(expected.keys() & latest.keys()):
        ref, bar = expected[key], latest[key]
        diffs = []
        for field in ("open", "high", "low", "close", "volume", "trade_count"):
            got, want = getattr(bar, field), getattr(ref, field)
            if got != want:
                diffs.append(f"{field} {got!r} != {want!r}")
        if bar.end - bar.start <= 0:
            diffs.append(f"end {bar.end} not after start")
        if (bar.vwap is None) != (ref.vwap is None) or (
            bar.vwap is not None
            and ref.vwap is not None
            and not math.isclose(bar.vwap, ref.vwap, rel_tol=VWAP_REL_TOL, abs_tol=0.0)
        ):
            diffs.append(f"vwap {bar.vwap!r} != {ref.vwap!r}")
        if diffs:
            problems.append(f"bar {_fmt(key)} rev {bar.rev}: " + ", ".join(diffs))
    return problems


def _fmt(key: RefKey) -> str:
    symbol, interval, start = key
    return f"{interval} {symbol!r} start {start}"
