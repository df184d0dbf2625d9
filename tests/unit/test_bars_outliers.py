"""No outlier moves a watermark; no value overflows a bar (the engine's guards, see bars.py).

The property: a single tick far ahead of its symbol's event times, inserted anywhere in a
stream except last, leaves every bar exactly as the stream without it, and is reported as an
unconfirmed jump; real jumps (a 6.5-hour halt, a weekend) are confirmed and change nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mdp.services.aggregator.bars import REJECT_AFTER, BarEngine, Emitted
from mdp.shared.contract.messages import Bar, Tick
from tests.unit.test_bars_properties import (
    INTERVALS,
    WINDOW,
    Feed,
    Raw,
    deliveries,
    tick_streams,
    to_tick,
)

S = 1_000_000_000
JUMP = 600 * S
T0 = 28_333_333 * 60 * S
Final = dict[tuple[str, str, int], tuple[float, float, float, float, float, int]]


def final(bars: Sequence[Bar]) -> Final:
    """The latest revision of every bar, without its rev (that depends on timing)."""
    latest = {(b.symbol, b.interval, b.start): b for b in bars}
    return {k: (b.open, b.high, b.low, b.close, b.volume, b.trade_count) for k, b in latest.items()}


def engine(jump: int = JUMP) -> BarEngine:
    return BarEngine(INTERVALS, grace_ns=0, revise_window_ns=WINDOW, max_jump_ns=jump)


def run(
    steps: Sequence[Feed], symbols: Sequence[str], eng: BarEngine, skip: Raw | None = None
) -> tuple[list[Bar], Emitted]:
    """Feed every step (leaving out `skip`), then end every symbol's stream."""
    bars: list[Bar] = []
    reports = Emitted()
    now = 10**15
    seq = 0
    for step in steps:
        now += step.dt
        ticks = []
        for raw in step.chunk:
            seq += 1
            if raw is not skip:
                ticks.append(to_tick(raw, seq))
        out = eng.on_ticks(step.symbol, "prop", ticks, now, clock_rate=step.rate)
        bars += out.bars
        reports.extend(out)
        if step.dt % 3 == 0:  # now and then the timer runs as well
            advanced = eng.advance(now)
            bars += advanced.bars
            reports.extend(advanced)
    for symbol in symbols:
        out = eng.end_of_stream(symbol, now)
        bars += out.bars
        reports.extend(out)
    return bars, reports


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_single_outlier_leaves_every_other_bar_as_without_it(data: st.DataObject) -> None:
    streams = data.draw(tick_streams())
    symbol = data.draw(st.sampled_from(sorted(streams)))
    ticks = streams[symbol]
    if len(ticks) < 2:
        ticks.append(ticks[0])
    # Far ahead of the whole stream (a day, or a clock in seconds read as milliseconds...).
    ahead = data.draw(st.sampled_from([2 * JUMP, 86_400 * S, 10**6 * S]))
    outlier: Raw = (symbol, max(t[1] for t in ticks) + ahead, "99999", "1")
    position = data.draw(st.integers(0, len(ticks) - 1))  # anywhere but last
    ticks.insert(position, outlier)
    # Live and full speed (a fast paced replay's clock would reach the outlier's time itself).
    steps = [
        s._replace(rate=min(s.rate, 1.0))
        for s in data.draw(deliveries(streams))
        if isinstance(s, Feed)
    ]

    with_outlier, reports = run(steps, sorted(streams), engine())
    without, _ = run(steps, sorted(streams), engine(), skip=outlier)
    assert final(with_outlier) == final(without)
    rejected = [i for i in reports.invalid if i.tick.price == 99999.0]
    assert len(rejected) == 1 and rejected[0].reason.startswith("unconfirmed jump"), reports
    assert not reports.late


def tk(ts: int, price: float = 10.0, seq: int = 0, size: float = 1.0) -> Tick:
    return Tick(ts=ts, recv=ts, seq=seq, price=price, size=size)


def feed_all(eng: BarEngine, stamps: Sequence[int], now: int = 0, rate: float = 0.0) -> Emitted:
    out = Emitted()
    for i, ts in enumerate(stamps):
        price = 10.0 + ts // S % 7  # by event time, so dropping a tick changes no other price
        out.extend(eng.on_ticks("AAA", "p", [tk(ts, price, i)], now, clock_rate=rate))
    out.extend(eng.end_of_stream("AAA", now))
    return out


def test_real_jumps_are_confirmed_and_change_nothing() -> None:
    halt = int(6.5 * 3600) * S
    weekend = 64 * 3600 * S
    day = [T0 + i * S for i in range(30)]
    after_halt = [day[-1] + halt + i * S for i in range(10)]
    monday = [after_halt[-1] + weekend + i * 7 * S for i in range(5)]
    stamps = day + after_halt + monday
    guarded, plain = feed_all(engine(), stamps), feed_all(engine(0), stamps)
    assert final(guarded.bars) == final(plain.bars)
    assert guarded.invalid == [] and guarded.late == []


def test_an_outlier_first_is_rejected_and_the_stream_settles_on_the_real_ticks() -> None:
    stamps = [T0 + 20 * 3600 * S] + [T0 + i * S for i in range(10)]
    out = feed_all(engine(), stamps)
    assert [i.tick.seq for i in out.invalid] == [0]
    assert final(out.bars) == final(feed_all(engine(0), stamps[1:]).bars)


def test_a_suspect_is_rejected_after_the_contradicting_ticks() -> None:
    eng = engine()
    eng.on_ticks("AAA", "p", [tk(T0)], 0, clock_rate=0.0)
    eng.on_ticks("AAA", "p", [tk(T0 + S)], 0, clock_rate=0.0)
    assert eng.on_ticks("AAA", "p", [tk(T0 + 86_400 * S, 1e6, 9)], 0, clock_rate=0.0).bars == []
    reports = [
        eng.on_ticks("AAA", "p", [tk(T0 + (2 + i) * S)], 0, clock_rate=0.0)
        for i in range(REJECT_AFTER)
    ]
    assert all(not r.invalid for r in reports[:-1])
    [rejected] = reports[-1].invalid
    assert rejected.tick.seq == 9 and "3 later ticks" in rejected.reason
    assert eng.watermark("AAA", 0) == T0 + (1 + REJECT_AFTER) * S  # never moved by the outlier


def test_the_last_tick_after_a_jump_is_kept_at_end_of_stream() -> None:
    stamps = [T0 + i * S for i in range(5)] + [T0 + 3 * 3600 * S]
    out = feed_all(engine(), stamps)
    assert out.invalid == []
    assert final(out.bars) == final(feed_all(engine(0), stamps).bars)


def test_a_live_symbol_confirms_a_suspect_once_the_clock_reaches_it() -> None:
    eng = engine()
    now = T0
    eng.on_ticks("AAA", "p", [tk(T0), tk(T0 + S)], now, clock_rate=1.0)
    eng.on_ticks("AAA", "p", [tk(T0 + 2 * JUMP, 11.0, 5)], now, clock_rate=1.0)  # far ahead
    assert eng.watermark("AAA", now) == T0 + S
    assert not eng.advance(now + JUMP // 2).bars or eng.watermark("AAA", now + JUMP // 2) < (
        T0 + 2 * JUMP
    )
    eng.advance(now + JUMP + S)  # the wall clock is within max_jump of it: plausible now
    assert eng.watermark("AAA", now + JUMP + S) >= T0 + 2 * JUMP


def test_suspects_survive_a_checkpoint() -> None:
    eng = engine()
    eng.on_ticks("AAA", "p", [tk(T0), tk(T0 + S)], 0, clock_rate=0.0)
    eng.on_ticks("AAA", "p", [tk(T0 + 86_400 * S, 1e6, 9)], 0, clock_rate=0.0)
    eng.on_ticks("AAA", "p", [tk(T0 + 2 * S)], 0, clock_rate=0.0)  # one contradiction
    restored = BarEngine.restore(eng.snapshot())
    out = Emitted()
    for i in range(REJECT_AFTER - 1):
        out.extend(restored.on_ticks("AAA", "p", [tk(T0 + (3 + i) * S)], 0, clock_rate=0.0))
    assert [i.tick.seq for i in out.invalid] == [9]


# -- numbers ------------------------------------------------------------------------------------


def test_meme_coin_sizes_stay_exact_and_checkpoint() -> None:
    eng = engine()
    ticks = [tk(T0 + i, 1e-8, i, 2e10) for i in range(1000)]  # 2e13 in one bar: > 2**64 units
    eng.on_ticks("PEPE", "p", ticks, 0, clock_rate=0.0)
    restored = BarEngine.restore(eng.snapshot())  # units beyond 64 bits survive
    [bar, *_] = restored.end_of_stream("PEPE", 0).bars
    assert bar.volume == 2e13 and bar.trade_count == 1000
    assert bar.vwap is not None and abs(bar.vwap - 1e-8) < 1e-20


def test_sums_that_would_overflow_are_rejected_per_tick() -> None:
    eng = engine()
    big = [tk(T0 + i, 1.0, i, 1e308) for i in range(3)]  # the second makes volume 2e308
    out = eng.on_ticks("AAA", "p", [tk(T0 - 1, 1.0, 99, 1.0), *big], 0, clock_rate=0.0)
    assert [i.tick.seq for i in out.invalid] == [1, 2]
    assert all(i.reason.startswith("volume overflow") for i in out.invalid)
    bars = eng.end_of_stream("AAA", 0).bars
    assert {b.volume for b in bars if b.interval == "1s"} == {1e308 + 1.0}
    # 1e308 units of 1e-9 are far beyond 64 bits: the checkpoint still encodes and restores.
    restored = BarEngine.restore(eng.snapshot())
    assert restored.symbols == ["AAA"] and restored.snapshot() == eng.snapshot()
