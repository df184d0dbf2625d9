"""The engine against independently computed reference bars of real trade streams.

The slices in `tests/data` always run; the full files in `shared/data` (726k ticks) run when
that directory is present next to the repository.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache
from pathlib import Path

import msgspec
import pytest

from mdp.services.aggregator.bars import BarEngine
from mdp.shared.contract.messages import Bar, Tick
from tests.reference import compare_bars, load_reference, load_ticks

DATA = Path(__file__).resolve().parents[1] / "data"
SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
SLICES = ["lean_equity_20131008_slice", "binance_20240808_09_slice"]
FULL = ["lean_equity_20131008", "binance_20240808_09"]
INTERVALS = ("1s", "1m")
S = 1_000_000_000

needs_shared_data = pytest.mark.skipif(
    not (SHARED_DATA / "ticks").is_dir(),
    reason=f"the full recorded datasets are not present at {SHARED_DATA}",
)


@cache
def ticks_of(path: Path) -> list[tuple[str, Tick]]:
    return load_ticks(path)


def replay(
    ticks: Iterable[tuple[str, Tick]], chunk: int = 1000, engine: BarEngine | None = None
) -> tuple[list[Bar], BarEngine]:
    """Feed per-symbol chunks in file order at full speed (clock_rate 0), then end of stream."""
    engine = engine or BarEngine(INTERVALS, grace_ns=0, revise_window_ns=60 * S)
    bars: list[Bar] = []
    pending: dict[str, list[Tick]] = {}
    for symbol, tick in ticks:
        buf = pending.setdefault(symbol, [])
        buf.append(tick)
        if len(buf) >= chunk:
            out = engine.on_ticks(symbol, "replay", buf, 0, clock_rate=0.0)
            assert out.late == []
            bars.extend(out.bars)
            pending[symbol] = []
    for symbol, buf in pending.items():
        if buf:
            bars.extend(engine.on_ticks(symbol, "replay", buf, 0, clock_rate=0.0).bars)
    for symbol in engine.symbols:
        bars.extend(engine.end_of_stream(symbol).bars)
    return bars, engine


def assert_matches_reference(bars: list[Bar], directory: Path, stem: str) -> None:
    for interval in INTERVALS:
        reference = load_reference(directory / f"{stem}.bars_{interval}.csv")
        assert reference, f"empty reference for {stem} {interval}"
        problems = compare_bars(bars, reference, interval)
        assert problems == [], f"{len(problems)} mismatches, first: " + "\n".join(problems[:20])


@pytest.mark.parametrize("stem", SLICES)
def test_slice_matches_reference(stem: str) -> None:
    ticks = ticks_of(DATA / f"{stem}.ticks.csv.gz")
    bars, engine = replay(ticks)
    assert_matches_reference(bars, DATA, stem)
    assert all(bar.rev == 0 for bar in bars)  # in order per symbol: nothing to revise
    assert engine.open_bars() == 0


@pytest.mark.parametrize("stem", SLICES)
@pytest.mark.parametrize("chunk", [1, 37])
def test_slice_chunking_gives_the_same_bars(stem: str, chunk: int) -> None:
    ticks = ticks_of(DATA / f"{stem}.ticks.csv.gz")
    bars, _ = replay(ticks, chunk=chunk)
    assert_matches_reference(bars, DATA, stem)


@pytest.mark.parametrize("grace_ms", [0, 250])
def test_binance_slice_live_by_receive_time(grace_ms: int) -> None:
    """Live mode: one batch per run of same-symbol rows, the wall clock being `recv_ns`.

    Delivery latency jitters by up to ~220 ms in this capture, so without grace some ticks
    arrive after their bar closed and revise it; 250 ms of grace absorbs all of them. Either
    way the final bars are the reference.
    """
    ticks = ticks_of(DATA / "binance_20240808_09_slice.ticks.csv.gz")
    engine = BarEngine(INTERVALS, grace_ns=grace_ms * 1_000_000, revise_window_ns=60 * S)
    bars: list[Bar] = []
    batch: list[Tick] = []
    batch_symbol = ""
    next_advance = 0

    def flush() -> None:
        if batch:
            out = engine.on_ticks(batch_symbol, "binance", batch, batch[-1].recv, clock_rate=1.0)
            assert out.late == []
            bars.extend(out.bars)

    for symbol, tick in ticks:
        if symbol != batch_symbol or tick.recv != batch[-1].recv:
            flush()
            batch, batch_symbol = [], symbol
        batch.append(tick)
        if tick.recv >= next_advance:  # the service's periodic advance()
            bars.extend(engine.advance(tick.recv).bars)
            next_advance = tick.recv + 100_000_000
    flush()
    at_end = [bar for symbol in engine.symbols for bar in engine.end_of_stream(symbol).bars]

    assert_matches_reference(bars + at_end, DATA, "binance_20240808_09_slice")
    # the wall clock closed every bar but the last one of each symbol and interval
    assert len(at_end) == len(engine.symbols) * len(INTERVALS) == 10
    revisions = sum(bar.rev > 0 for bar in bars)
    if grace_ms == 0:
        assert revisions > 100
    else:
        assert revisions == 0


@needs_shared_data
@pytest.mark.parametrize("stem", FULL)
def test_full_dataset_matches_reference(stem: str) -> None:
    bars, _ = replay(load_ticks(SHARED_DATA / "ticks" / f"{stem}.ticks.csv.gz"))
    assert_matches_reference(bars, SHARED_DATA / "ticks", stem)


def test_compare_bars_reports_every_kind_of_difference() -> None:
    stem = "lean_equity_20131008_slice"
    bars, _ = replay(ticks_of(DATA / f"{stem}.ticks.csv.gz"))
    reference = load_reference(DATA / f"{stem}.bars_1m.csv")
    minutes = sorted((b for b in bars if b.interval == "1m"), key=lambda b: (b.symbol, b.start))
    assert compare_bars(minutes, reference, "1m") == []

    first, second, third, *rest = minutes
    changed = msgspec.structs.replace(first, volume=first.volume + 1, rev=1)
    close_vwap = msgspec.structs.replace(second, vwap=second.vwap * (1 + 1e-12))  # type: ignore[operator]
    far_vwap = msgspec.structs.replace(third, vwap=third.vwap * (1 + 1e-8))  # type: ignore[operator]
    extra = msgspec.structs.replace(first, symbol="XYZ")
    problems = compare_bars(
        [first, changed, close_vwap, far_vwap, extra, *rest[1:]], reference, "1m"
    )
    assert len(problems) == 4, problems
    assert problems[0].startswith(f"missing bar 1m {rest[0].symbol!r} start {rest[0].start}")
    assert problems[1].startswith("extra bar 1m 'XYZ'")
    assert "volume" in problems[2] and "rev 1" in problems[2]  # the latest rev is compared
    assert "vwap" in problems[3]
    assert compare_bars(bars, reference, "1s") != []  # other intervals are not confused
