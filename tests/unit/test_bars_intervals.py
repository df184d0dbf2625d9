"""Several intervals at once: 1s, 5s, 15s, 1m, 5m, 15m and 1h on real slices.

Each interval must equal the bar definition computed directly in exact decimals
(`tests/batch_bars.py`); 1s and 1m must also equal the reference files of the datasets.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest

from mdp.services.aggregator.bars import BarEngine
from mdp.shared.contract.messages import Bar, interval_ns
from tests.batch_bars import RawTick, batch_bars, raw_ticks, read_raw_ticks
from tests.reference import RefBar, RefKey, compare_bars, load_reference

DATA = Path(__file__).resolve().parents[1] / "data"
SLICES = ["lean_equity_20131008_slice", "binance_20240808_09_slice"]
INTERVALS = ("1s", "5s", "15s", "1m", "5m", "15m", "1h")
S = 1_000_000_000


@cache
def raw_of(stem: str) -> list[RawTick]:
    return raw_ticks(*read_raw_ticks(DATA / f"{stem}.ticks.csv.gz"))


@cache
def expected_of(stem: str) -> dict[RefKey, RefBar]:
    return batch_bars(raw_of(stem), INTERVALS)


def run_engine(ticks: list[RawTick], chunk: int) -> list[Bar]:
    """Every interval in one engine, per-symbol chunks in file order at full speed."""
    engine = BarEngine(list(reversed(INTERVALS)), grace_ns=0, revise_window_ns=60 * S)
    assert engine.intervals == list(INTERVALS)  # narrowest first, whatever the order given
    bars: list[Bar] = []
    pending: dict[str, list[RawTick]] = {}
    for raw in ticks:
        buf = pending.setdefault(raw.symbol, [])
        buf.append(raw)
        if len(buf) >= chunk:
            out = engine.on_ticks(raw.symbol, "replay", [t.tick() for t in buf], 0, 0.0)
            assert out.late == [] and out.invalid == []
            bars += out.bars
            buf.clear()
    for symbol, buf in pending.items():
        if buf:
            bars += engine.on_ticks(symbol, "replay", [t.tick() for t in buf], 0, 0.0).bars
    for symbol in engine.symbols:
        bars += engine.end_of_stream(symbol).bars
    return bars


@pytest.mark.parametrize("stem", SLICES)
def test_the_exact_batch_definition_equals_the_reference_files(stem: str) -> None:
    """The independent implementation used below agrees with the datasets' own references."""
    expected = expected_of(stem)
    for interval in ("1s", "1m"):
        reference = load_reference(DATA / f"{stem}.bars_{interval}.csv")
        mine = {k: v for k, v in expected.items() if k[1] == interval}
        assert mine == reference


@pytest.mark.parametrize("stem", SLICES)
@pytest.mark.parametrize("chunk", [1000, 7])
def test_seven_intervals_at_once_equal_the_batch_definition(stem: str, chunk: int) -> None:
    bars = run_engine(raw_of(stem), chunk)
    expected = expected_of(stem)
    for interval in INTERVALS:
        mine = [b for b in bars if b.interval == interval]
        assert mine, f"no {interval} bars"
        assert all(b.end - b.start == interval_ns(interval) for b in mine)
        assert all(b.start % interval_ns(interval) == 0 for b in mine)
        problems = compare_bars(mine, expected, interval)
        assert problems == [], f"{stem} {interval}: {len(problems)} problems: {problems[:5]}"
    for interval in ("1s", "1m"):
        reference = load_reference(DATA / f"{stem}.bars_{interval}.csv")
        assert compare_bars(bars, reference, interval) == []
    # in order per symbol: nothing revised, every bar emitted exactly once
    assert all(b.rev == 0 for b in bars)
    assert len({(b.symbol, b.interval, b.start) for b in bars}) == len(bars) == len(expected)


def test_wider_intervals_aggregate_the_narrower_ones() -> None:
    """A cross-check that needs no reference: 5 x 1m = 5m, 4 x 15m = 1h (counts and volumes)."""
    bars = run_engine(raw_of(SLICES[0]), 1000)
    by = {(b.symbol, b.interval, b.start): b for b in bars}
    for (symbol, interval, start), bar in by.items():
        if interval not in ("5m", "1h"):
            continue
        part, n = ("1m", 5) if interval == "5m" else ("15m", 4)
        width = interval_ns(part)
        parts = [by[k] for i in range(n) if (k := (symbol, part, start + i * width)) in by]
        assert sum(p.trade_count for p in parts) == bar.trade_count
        assert max(p.high for p in parts) == bar.high
        assert min(p.low for p in parts) == bar.low
        assert (parts[0].open, parts[-1].close) == (bar.open, bar.close)
