"""Time the bar engine over a full recorded day, beside NautilusTrader and a naive baseline.

    python benchmarks/bars_core.py [TICKS.csv.gz] [--repeat N]

Ticks are parsed into `Tick` structs first (not timed), then fed per symbol in chunks of 1000
in file order with clock_rate 0, intervals 1s and 1m, as a full-speed replay does. Prints
ticks/s and tick-intervals/s for the engine and each baseline, and checks that they agree.

With NautilusTrader installed (the `bench` extra, in its own venv: it needs pandas < 3), the
same ticks, pre-built as its `TradeTick`s (not timed either), go through one
`TimeBarAggregator` per symbol and interval in its batch mode, the mode NautilusTrader itself
uses for historical data (bars close on tick time, no clock to advance). Its intervals are
left-open (a tick exactly on a boundary closes the bar before), ours right-open, so bar counts
may differ by the few bars such ticks open; volume totals must agree.
"""

from __future__ import annotations

import argparse
import csv
import functools
import gc
import gzip
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from mdp.services.aggregator.bars import BarEngine
from mdp.shared.contract.messages import Bar, Tick, interval_ns

DEFAULT = (
    Path(__file__).resolve().parents[1].parent
    / "shared"
    / "data"
    / "ticks"
    / "lean_equity_20131008.ticks.csv.gz"
)
INTERVALS = ("1s", "1m")
CHUNK = 1000
R = TypeVar("R")

Chunk = tuple[str, list[Tick]]


def load_chunks(path: Path) -> tuple[int, list[Chunk]]:
    """Parse the file and cut it into per-symbol chunks of CHUNK ticks, in file order."""
    chunks: list[Chunk] = []
    pending: dict[str, list[Tick]] = {}
    count = 0
    with gzip.open(path, "rt", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        i_ts, i_sym = header.index("ts_ns"), header.index("symbol")
        i_price, i_size = header.index("price"), header.index("size")
        for row in reader:
            ts = int(row[i_ts])
            buf = pending.setdefault(row[i_sym], [])
            buf.append(Tick(ts, ts, count, float(row[i_price]), float(row[i_size])))
            count += 1
            if len(buf) >= CHUNK:
                chunks.append((row[i_sym], buf))
                pending[row[i_sym]] = []
    chunks.extend((symbol, buf) for symbol, buf in pending.items() if buf)
    return count, chunks


def run_engine(chunks: Sequence[Chunk]) -> list[Bar]:
    """The engine as a full-speed replay drives it."""
    engine = BarEngine(INTERVALS, grace_ns=0, revise_window_ns=60_000_000_000)
    bars: list[Bar] = []
    for symbol, ticks in chunks:
        bars.extend(engine.on_ticks(symbol, "replay", ticks, 0, clock_rate=0.0).bars)
    for symbol in engine.symbols:
        bars.extend(engine.end_of_stream(symbol).bars)
    return bars


def run_naive(chunks: Sequence[Chunk]) -> dict[tuple[str, str, int], list[float]]:
    """The obvious implementation: one dict lookup and update per tick and interval."""
    widths = [(i, interval_ns(i)) for i in INTERVALS]
    bars: dict[tuple[str, str, int], list[float]] = {}
    for symbol, ticks in chunks:
        for tick in ticks:
            ts, price, size = tick.ts, tick.price, tick.size
            units = round(size * 1_000_000_000)
            for interval, width in widths:
                key = (symbol, interval, ts - ts % width)
                bar = bars.get(key)
                if bar is None:
                    bars[key] = [price, price, price, price, ts, ts, units, price * size, 1]
                    continue
                bar[1] = max(bar[1], price)
                bar[2] = min(bar[2], price)
                if ts < bar[4]:
                    bar[0], bar[4] = price, ts
                if ts >= bar[5]:
                    bar[3], bar[5] = price, ts
                bar[6] += units
                bar[7] += price * size
                bar[8] += 1
    return bars


PRICE_PRECISION = 8  # wide enough for every file we have (crypto prices, fractional sizes)
SIZE_PRECISION = 8
NautilusInput = list[tuple[Any, list[Any], list[Any]]]
"""Per symbol: its clock, its aggregators (one per interval), its ticks as `TradeTick`s."""


def nautilus_input(chunks: Sequence[Chunk]) -> Callable[[bool], NautilusInput] | None:
    """A factory of fresh NautilusTrader aggregators over the same ticks; None if not installed."""
    try:
        from nautilus_trader.common.component import TestClock
        from nautilus_trader.data.aggregation import TimeBarAggregator
        from nautilus_trader.model.data import BarType, TradeTick
        from nautilus_trader.model.enums import AggressorSide
        from nautilus_trader.model.identifiers import TradeId
        from nautilus_trader.model.objects import Price, Quantity
        from nautilus_trader.test_kit.providers import TestInstrumentProvider
    except ImportError:
        return None
    steps = {"1s": "1-SECOND", "1m": "1-MINUTE"}
    by_symbol: dict[str, list[Tick]] = {}
    for symbol, ticks in chunks:
        by_symbol.setdefault(symbol, []).extend(ticks)
    instruments = {
        s: TestInstrumentProvider.equity(symbol=s.replace("/", "-"), venue="XNAS")
        for s in by_symbol
    }
    trade_ticks = {
        s: [
            TradeTick(
                instruments[s].id,
                Price(t.price, PRICE_PRECISION),
                Quantity(t.size, SIZE_PRECISION),
                AggressorSide.NO_AGGRESSOR,
                TradeId(str(t.seq)),
                t.ts,
                t.ts,
            )
            for t in ticks
        ]
        for s, ticks in by_symbol.items()
    }

    def build(batch: bool) -> NautilusInput:
        made: NautilusInput = []
        for symbol, ticks in trade_ticks.items():
            instrument, first = instruments[symbol], by_symbol[symbol][0].ts
            clock = TestClock()
            clock.set_time(first)
            aggregators: list[object] = []
            for interval in INTERVALS:
                bar_type = BarType.from_str(f"{instrument.id}-{steps[interval]}-LAST-INTERNAL")
                aggregator = TimeBarAggregator(
                    instrument, bar_type, NAUTILUS_BARS.append, clock, build_with_no_updates=False
                )
                if batch:
                    aggregator.start_batch_update(NAUTILUS_BARS.append, first)
                aggregators.append(aggregator)
            made.append((clock, aggregators, list(ticks)))
        return made

    return build


NAUTILUS_BARS: list[object] = []


def run_nautilus_batch(made: NautilusInput) -> list[Any]:
    """Batch mode: bars close on tick time (NautilusTrader's aggregation of historical data)."""
    NAUTILUS_BARS.clear()
    for _, aggregators, ticks in made:
        for aggregator in aggregators:
            handle = aggregator.handle_trade_tick
            for tick in ticks:
                handle(tick)
    return list(NAUTILUS_BARS)


def run_nautilus_clock(made: NautilusInput) -> list[Any]:
    """Clock mode: a test clock advanced to each tick fires the bar timers (as in a backtest)."""
    NAUTILUS_BARS.clear()
    for clock, aggregators, ticks in made:
        handles = [a.handle_trade_tick for a in aggregators]
        advance = clock.advance_time
        now = 0
        for tick in ticks:
            ts = tick.ts_init
            if ts > now:
                now = ts
                for event in advance(ts):
                    event.handle()
            for handle in handles:
                handle(tick)
    return list(NAUTILUS_BARS)


def timed(
    repeat: int, fn: Callable[[Sequence[Chunk]], R], chunks: Sequence[Chunk]
) -> tuple[list[float], R]:
    """Every run's time after a warm-up run (whose result is returned)."""
    times = []
    result = fn(chunks)
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        fn(chunks)
        times.append(time.perf_counter() - start)
    return times, result


def timed_fresh(
    repeat: int, fn: Callable[[NautilusInput], R], build: Callable[[], NautilusInput]
) -> tuple[list[float], R]:
    """Every run's time, each on freshly built aggregators (built outside the timing)."""
    times = []
    result = fn(build())
    for _ in range(repeat):
        made = build()
        gc.collect()
        start = time.perf_counter()
        fn(made)
        times.append(time.perf_counter() - start)
    return times, result


def main() -> None:
    """Run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", type=Path, default=DEFAULT)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    count, chunks = load_chunks(args.path)
    engine_times, bars = timed(args.repeat, run_engine, chunks)
    naive_times, naive = timed(args.repeat, run_naive, chunks)

    agree = len(bars) == len(naive) and all(
        naive[(b.symbol, b.interval, b.start)][6] == round(b.volume * 1_000_000_000)
        and naive[(b.symbol, b.interval, b.start)][8] == b.trade_count
        for b in bars
    )
    n = len(INTERVALS)
    engine_s = min(engine_times)
    print(
        f"file            {args.path.name}: {count:,} ticks, {len(chunks):,} chunks,"
        f" {len(bars):,} bars"
    )

    def line(name: str, times: list[float]) -> None:
        best = min(times)
        print(
            f"{name:<15} {best:7.3f} s (worst {max(times):.3f})  {count / best:12,.0f} ticks/s"
            f"  {count * n / best:12,.0f} tick-intervals/s"
            + ("" if name == "engine" else f"  engine {best / engine_s:.2f}x faster")
        )

    line("engine", engine_times)
    line("naive", naive_times)
    print(f"                naive and engine agree bar for bar: {agree}")
    build = nautilus_input(chunks)
    if build is None:
        print("nautilus        not installed (pip install -e '.[bench]' in a venv of its own)")
        return
    last_bar: dict[tuple[str, str], Bar] = {}
    for b in bars:
        key = (b.symbol, b.interval)
        if key not in last_bar or b.end > last_bar[key].end:
            last_bar[key] = b
    ours = sum(b.volume for b in bars)
    open_volume = sum(b.volume for b in last_bar.values())
    for mode, run in (("batch", run_nautilus_batch), ("clock", run_nautilus_clock)):
        times, theirs = timed_fresh(args.repeat, run, functools.partial(build, mode == "batch"))
        line(f"nautilus {mode}", times)
        # Each symbol's last bar stays open there (nothing closes it): compare the closed ones.
        volume = sum(float(b.volume) for b in theirs)
        print(
            f"{'':<15} bars: engine {len(bars):,}, nautilus {len(theirs):,}; closed-bar volume:"
            f" engine {ours - open_volume:,.0f}, nautilus {volume:,.0f}"
            f" ({abs(ours - open_volume - volume) / ours:.1e} apart)"
        )


if __name__ == "__main__":
    main()
