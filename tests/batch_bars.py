"""The bar definition of `shared/data/README.md` as a direct batch computation, in exact decimals.

Independent of the engine on purpose: no watermarks, no incremental state, no float sums. Ticks
are read from a recorded file keeping their decimal strings; every bar is computed from all of
its ticks at once (open/close by (event time, arrival), volume and notional as `Decimal` sums)
and only then converted to float64, so the result can be compared with `tests.reference`.
"""

from __future__ import annotations

import csv
import gzip
from collections import defaultdict
from collections.abc import Collection, Iterable, Sequence
from decimal import Decimal
from pathlib import Path
from typing import NamedTuple

from mdp.shared.contract.messages import Tick, interval_ns
from tests.reference import RefBar, RefKey


class RawTick(NamedTuple):
    """One row of a ticks file: event time, exact decimal strings, receive time, per-symbol seq."""

    symbol: str
    ts: int
    price: str
    size: str
    recv: int
    seq: int

    def tick(self) -> Tick:
        """The `Tick` the replay provider publishes for this row."""
        return Tick(self.ts, self.recv, self.seq, float(self.price), float(self.size))


def read_raw_ticks(path: str | Path) -> tuple[list[str], list[list[str]]]:
    """The header and every row of a ticks file (gzip or not), as strings, in file order."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        return header, list(reader)


def raw_ticks(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[RawTick]:
    """Rows as `RawTick`s; `recv` is `recv_ns` when present, else the event time; seq from 1."""
    i_ts, i_sym = header.index("ts_ns"), header.index("symbol")
    i_price, i_size = header.index("price"), header.index("size")
    i_recv = header.index("recv_ns") if "recv_ns" in header else i_ts
    seqs: dict[str, int] = {}
    out = []
    for row in rows:
        symbol = row[i_sym]
        seqs[symbol] = seq = seqs.get(symbol, 0) + 1
        out.append(
            RawTick(symbol, int(row[i_ts]), row[i_price], row[i_size], int(row[i_recv]), seq)
        )
    return out


def batch_bars(
    ticks: Sequence[RawTick],
    intervals: Iterable[str],
    skip: Collection[tuple[str, int]] = (),
) -> dict[RefKey, RefBar]:
    """Bars of `ticks` (arrival order) per the README; `skip` holds (interval, arrival index)."""
    decimals = [(Decimal(t.price), Decimal(t.size)) for t in ticks]
    out: dict[RefKey, RefBar] = {}
    for interval in intervals:
        width = interval_ns(interval)
        groups: dict[RefKey, list[int]] = defaultdict(list)
        for i, t in enumerate(ticks):
            if (interval, i) not in skip:
                groups[(t.symbol, interval, t.ts // width * width)].append(i)
        for key, members in groups.items():
            first = min(members, key=lambda i: (ticks[i].ts, i))
            last = max(members, key=lambda i: (ticks[i].ts, i))
            volume = sum((decimals[i][1] for i in members), Decimal(0))
            notional = sum((decimals[i][0] * decimals[i][1] for i in members), Decimal(0))
            prices = [decimals[i][0] for i in members]
            out[key] = RefBar(
                open=float(decimals[first][0]),
                high=float(max(prices)),
                low=float(min(prices)),
                close=float(decimals[last][0]),
                volume=float(volume),
                trade_count=len(members),
                vwap=float(notional / volume) if volume else None,
            )
    return out
