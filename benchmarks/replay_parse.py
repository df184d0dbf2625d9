"""Replay parse rate: `ReplayAdapter` into a no-op sink vs a plain `csv.DictReader` loop.

Both sides read the same gzip CSV, validate every row, number ticks per symbol and build the
same `Tick` structs; the best of `--repeat` runs is reported for each, with the ratio.

    python benchmarks/replay_parse.py [FILE.csv[.gz]] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import gzip
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from mdp.services.provider.adapters.replay import ReplayAdapter
from mdp.shared.contract.control import JobSpec
from mdp.shared.contract.messages import Tick

DEFAULT_FILE = (
    Path(__file__).resolve().parents[1].parent
    / "shared"
    / "data"
    / "ticks"
    / "lean_equity_20131008.ticks.csv.gz"
)


class NullSink:
    """Counts ticks and drops them."""

    def __init__(self) -> None:
        self.ticks = 0

    async def put(self, symbol: str, ticks: list[Tick]) -> None:
        self.ticks += len(ticks)

    async def end_of_stream(
        self, symbols: Sequence[str], ticks_per_symbol: Mapping[str, int]
    ) -> None:
        pass


def adapter_run(path: Path) -> int:
    """Rows replayed by the adapter."""
    adapter = ReplayAdapter(JobSpec("bench", "replay", [], {"path": str(path)}))
    sink = NullSink()
    asyncio.run(adapter.run(sink))
    return sink.ticks


def baseline_run(path: Path) -> int:
    """Rows replayed by the obvious loop: DictReader, per-row checks, per-symbol lists."""
    opener = gzip.open if path.read_bytes()[:2] == b"\x1f\x8b" else open
    seqs: dict[str, int] = {}
    groups: dict[str, list[Tick]] = {}
    rows = 0
    with opener(path, "rt", newline="") as stream:
        for row in csv.DictReader(stream):
            ts = int(row["ts_ns"])
            price = float(row["price"])
            size = float(row["size"])
            if ts <= 0 or not math.isfinite(price) or not math.isfinite(size) or size < 0:
                continue
            recv = int(row["recv_ns"]) if row.get("recv_ns") else ts
            symbol = row["symbol"]
            seq = seqs.get(symbol, 0) + 1
            seqs[symbol] = seq
            groups.setdefault(symbol, []).append(Tick(ts, recv, seq, price, size))
            rows += 1
            if rows % 20_000 == 0:
                groups.clear()  # hand a chunk over, as the adapter does
    return rows


def best_of(repeat: int, run: Callable[[Path], int], path: Path) -> tuple[int, float]:
    """Rows and the fastest wall time of `repeat` runs."""
    best = math.inf
    rows = 0
    for _ in range(repeat):
        start = time.perf_counter()
        rows = run(path)
        best = min(best, time.perf_counter() - start)
    return rows, best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", nargs="?", type=Path, default=DEFAULT_FILE)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    rows_a, secs_a = best_of(args.repeat, adapter_run, args.file)
    rows_b, secs_b = best_of(args.repeat, baseline_run, args.file)
    if rows_a != rows_b:
        print(f"row counts differ: adapter {rows_a}, baseline {rows_b}", file=sys.stderr)
        return 1
    rate_a, rate_b = rows_a / secs_a, rows_b / secs_b
    print(f"file      {args.file} ({rows_a:,} rows, best of {args.repeat})")
    print(f"adapter   {secs_a:7.3f} s  {rate_a:>12,.0f} rows/s")
    print(f"baseline  {secs_b:7.3f} s  {rate_b:>12,.0f} rows/s  (csv.DictReader loop)")
    print(f"ratio     {rate_a / rate_b:7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
