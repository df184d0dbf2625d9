"""Price type MID on a real slice: bars from the mid of each two-sided quote.

The recorded files hold trades only, so quotes are put around every trade (a spread of one to
three cents, deterministic), some one-sided (no mid: skipped) and some without a trade (size 0).
The MID bars must equal the bar definition applied to the mids `(bid + ask) / 2` of the two-sided
quotes, computed independently in exact decimals of those float64 mids; the default LAST engine
fed the same ticks must still give the trade bars of the reference files.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from mdp.services.aggregator.bars import BarEngine
from mdp.shared.contract.messages import Bar, Tick
from tests.batch_bars import RawTick, batch_bars, raw_ticks, read_raw_ticks
from tests.reference import compare_bars, load_reference

DATA = Path(__file__).resolve().parents[1] / "data"
STEM = "binance_20240808_09_slice"
INTERVALS = ("1s", "1m")
S = 1_000_000_000


def quoted(raw: RawTick) -> Tick:
    """The trade with a quote around it; every 13th one-sided, every 7th a quote-only update."""
    price = float(raw.price)
    bid = price - 0.01 * (1 + raw.seq % 2)
    ask = price + 0.01 * (1 + raw.seq % 3)
    tick = raw.tick()
    if raw.seq % 13 == 0:
        return msgspec.structs.replace(tick, bid=bid)  # no ask: no mid
    size = 0.0 if raw.seq % 7 == 0 else tick.size
    return msgspec.structs.replace(tick, size=size, bid=bid, ask=ask, bid_size=1.0, ask_size=2.0)


def run(engine: BarEngine, ticks: list[tuple[str, Tick]]) -> list[Bar]:
    bars: list[Bar] = []
    for symbol, tick in ticks:
        bars += engine.on_ticks(symbol, "quotes", [tick], 0, clock_rate=0.0).bars
    for symbol in engine.symbols:
        bars += engine.end_of_stream(symbol).bars
    return bars


def test_mid_bars_of_a_real_slice() -> None:
    raws = raw_ticks(*read_raw_ticks(DATA / f"{STEM}.ticks.csv.gz"))
    ticks = [(raw.symbol, quoted(raw)) for raw in raws]
    mid_bars = run(BarEngine(INTERVALS, 0, 60 * S, price_type="MID"), ticks)

    mids = [
        raw._replace(price=repr((t.bid + t.ask) / 2), size=repr(t.size))
        for raw, (_, t) in zip(raws, ticks, strict=True)
        if t.bid is not None and t.ask is not None
    ]
    assert 0 < len(mids) < len(raws)
    expected = batch_bars(mids, INTERVALS)
    for interval in INTERVALS:
        problems = compare_bars(mid_bars, expected, interval)
        assert problems == [], f"{interval}: {len(problems)} problems: {problems[:5]}"
    # the mids really differ from the trades: the MID bars are not the trade bars
    trade_1s = load_reference(DATA / f"{STEM}.bars_1s.csv")
    assert compare_bars(mid_bars, trade_1s, "1s") != []

    # LAST (the default) ignores the quotes: the same ticks with their trade sizes give the
    # trade bars of the reference
    with_sizes = [
        (raw.symbol, msgspec.structs.replace(t, size=float(raw.size)))
        for raw, (_, t) in zip(raws, ticks, strict=True)
    ]
    last_bars = run(BarEngine(INTERVALS, 0, 60 * S), with_sizes)
    for interval in INTERVALS:
        reference = load_reference(DATA / f"{STEM}.bars_{interval}.csv")
        assert compare_bars(last_bars, reference, interval) == []
