"""Unit cases of the event-time bar engine: boundaries, ordering, closing, lateness, checkpoints."""

from __future__ import annotations

import pytest

from mdp.services.aggregator.bars import BarEngine, Emitted, InvalidTick, LateTick
from mdp.shared.contract.messages import Bar, Tick

S = 1_000_000_000
MS = 1_000_000
T0 = 28_333_333 * 60 * S  # 2023-11-14T22:13:00Z: a whole minute
NOW = 5_000 * S  # an arbitrary wall clock, unrelated to event time
WINDOW = 60 * S


def tk(ts: int, price: float, size: float = 1.0, **quote: float) -> Tick:
    """A tick at event time `ts` (ns)."""
    return Tick(ts=ts, recv=ts, seq=0, price=price, size=size, **quote)


def engine(
    intervals: tuple[str, ...] = ("1s",), grace: int = 0, window: int = WINDOW, **kw: str
) -> BarEngine:
    return BarEngine(list(intervals), grace_ns=grace, revise_window_ns=window, **kw)  # type: ignore[arg-type]


def feed(
    eng: BarEngine, ticks: list[Tick], symbol: str = "AAPL", now: int = NOW, rate: float = 0.0
) -> Emitted:
    return eng.on_ticks(symbol, "test", ticks, now, clock_rate=rate)


def closed_all(eng: BarEngine, symbol: str = "AAPL") -> list[Bar]:
    return eng.end_of_stream(symbol).bars


def by_start(bars: list[Bar], interval: str = "1s") -> dict[int, Bar]:
    return {b.start - T0: b for b in bars if b.interval == interval}


# -- the bar definition ------------------------------------------------------------------------


def test_boundary_timestamps_open_the_next_bar() -> None:
    eng = engine(("1s", "1m"))
    ticks = [
        tk(T0, 10.0),  # exactly on a second and a minute boundary
        tk(T0 + S - 1, 11.0),  # the last ns of the first second
        tk(T0 + S, 12.0),  # exactly on the next second
        tk(T0 + 60 * S - 1, 13.0),
        tk(T0 + 60 * S, 14.0),  # exactly on the next minute
    ]
    bars = feed(eng, ticks).bars + closed_all(eng)
    secs = by_start(bars, "1s")
    assert sorted(secs) == [0, S, 59 * S, 60 * S]
    assert (secs[0].open, secs[0].close, secs[0].trade_count) == (10.0, 11.0, 2)
    assert (secs[S].open, secs[S].trade_count) == (12.0, 1)
    assert (secs[0].start, secs[0].end) == (T0, T0 + S)
    mins = by_start(bars, "1m")
    assert sorted(mins) == [0, 60 * S]
    assert (mins[0].open, mins[0].close, mins[0].trade_count) == (10.0, 13.0, 4)
    assert (mins[60 * S].open, mins[60 * S].end) == (14.0, T0 + 120 * S)
    assert all(b.rev == 0 and b.provider == "test" for b in bars)
    assert {b.interval for b in bars} == {"1s", "1m"}


def test_equal_timestamps_keep_arrival_order() -> None:
    eng = engine()
    t = T0 + 5 * MS
    feed(eng, [tk(t, 10.0), tk(t, 11.0), tk(t, 12.0)])
    feed(eng, [tk(t, 13.0)])  # a later batch at the same instant closes the bar
    (bar,) = closed_all(eng)
    assert (bar.open, bar.close, bar.high, bar.low, bar.trade_count) == (10.0, 13.0, 13.0, 10.0, 4)


def test_out_of_order_ticks_within_an_open_bar() -> None:
    eng = engine()
    feed(
        eng,
        [
            tk(T0 + 500 * MS, 20.0),
            tk(T0 + 100 * MS, 21.0),  # earlier event time, later arrival: the new open
            tk(T0 + 100 * MS, 22.0),  # same time as the open, arrived later: not the open
            tk(T0 + 500 * MS, 23.0),  # same time as the close, arrived later: the new close
            tk(T0 + 300 * MS, 24.0),  # in the middle: neither
        ],
    )
    (bar,) = closed_all(eng)
    assert (bar.open, bar.high, bar.low, bar.close) == (21.0, 24.0, 20.0, 23.0)
    assert bar.trade_count == 5


def test_volume_is_exact_decimal_sum_and_vwap() -> None:
    eng = engine()
    feed(eng, [tk(T0, 100.0, 0.1), tk(T0 + 1, 200.0, 0.2), tk(T0 + 2, 300.0, 0.002)])
    (bar,) = closed_all(eng)
    assert 0.1 + 0.2 + 0.002 != 0.302  # naive float summing would be wrong here
    assert bar.volume == 0.302
    assert bar.vwap == pytest.approx((10.0 + 40.0 + 0.6) / 0.302, rel=1e-12)


def test_zero_size_trades_count_and_set_ohlc() -> None:
    eng = engine()
    feed(eng, [tk(T0, 10.0, 5.0), tk(T0 + 1, 50.0, 0.0), tk(T0 + 2, 1.0, 0.0)])
    (bar,) = closed_all(eng)
    assert (bar.open, bar.high, bar.low, bar.close) == (10.0, 50.0, 1.0, 1.0)
    assert bar.trade_count == 3
    assert bar.volume == 5.0
    assert bar.vwap == 10.0  # zero-size prints do not weigh in


def test_vwap_is_none_at_zero_volume() -> None:
    eng = engine()
    feed(eng, [tk(T0, 10.0, 0.0), tk(T0 + 1, 11.0, 0.0)])
    (bar,) = closed_all(eng)
    assert bar.volume == 0.0
    assert bar.vwap is None
    assert bar.trade_count == 2


def test_vwap_stays_within_high_and_low() -> None:
    eng = engine()
    price = 0.1 + 0.2  # a price whose products round awkwardly
    feed(eng, [tk(T0 + i, price, 0.1 * (i + 1)) for i in range(50)])
    (bar,) = closed_all(eng)
    assert bar.low <= bar.vwap <= bar.high  # type: ignore[operator]


def test_mid_price_type_uses_bid_ask_and_skips_one_sided_quotes() -> None:
    eng = engine(price_type="MID")
    feed(
        eng,
        [
            tk(T0, 99.0, 2.0, bid=10.0, ask=11.0),
            tk(T0 + 1, 99.0, 1.0, bid=12.0),  # no ask: skipped
            tk(T0 + 2, 99.0, 1.0),  # a bare trade: skipped
            tk(T0 + 3, 99.0, 1.0, bid=11.0, ask=14.0),
        ],
    )
    (bar,) = closed_all(eng)
    assert (bar.open, bar.high, bar.low, bar.close) == (10.5, 12.5, 10.5, 12.5)
    assert bar.trade_count == 2
    assert bar.volume == 3.0
    assert bar.vwap == pytest.approx((10.5 * 2 + 12.5) / 3)


def test_mid_batch_without_quotes_creates_nothing() -> None:
    eng = engine(price_type="MID")
    assert not feed(eng, [tk(T0, 10.0), tk(T0 + 2 * S, 11.0)])
    assert closed_all(eng) == []


def test_special_symbols_are_kept_verbatim() -> None:
    eng = engine()
    symbols = ["BRK.B", "BTC/USD", "ES 202412", "Nestlé", "日経225", "BTCUSD_PERP.BINANCE"]
    for i, symbol in enumerate(symbols):
        feed(eng, [tk(T0, 10.0 + i), tk(T0 + S, 20.0 + i)], symbol=symbol)
    out = eng.advance(NOW)
    assert out.bars == []  # rate 0: nothing moves with the clock
    for i, symbol in enumerate(symbols):
        (bar,) = [b for b in eng.end_of_stream(symbol).bars if b.start == T0 + S]
        assert bar.symbol == symbol
        assert bar.open == 20.0 + i
        assert bar.bar_id == f"1s:{symbol}:{T0 + S}:0"
    assert eng.symbols == symbols


@pytest.mark.parametrize("price_type", ["LAST", "MID"])
def test_non_finite_ticks_are_reported_and_left_out(price_type: str) -> None:
    eng = engine(price_type=price_type)
    nan, inf = float("nan"), float("inf")
    q = {"bid": 9.0, "ask": 11.0}
    bad = [
        tk(T0 + 1, nan, 1.0, bid=nan, ask=11.0),
        tk(T0 + 2, inf, 0.0, bid=9.0, ask=inf),
        tk(T0 + 3, 10.0, nan, **q),
        tk(T0 + 4, 10.0, inf, **q),
    ]
    good = [tk(T0, 10.0, 1.0, **q), tk(T0 + 5, 10.0, 2.0, **q)]
    out = feed(eng, [good[0], *bad, good[1]])
    assert [(i.tick, i.reason.split()[0], i.provider) for i in out.invalid] == [
        (t, "non-finite", "test") for t in bad
    ]
    assert out.invalid[0].symbol == "AAPL"
    assert out.bars == [] and out.late == []
    (bar,) = closed_all(eng)
    assert (bar.open, bar.high, bar.low, bar.close, bar.volume, bar.trade_count) == (
        10.0, 10.0, 10.0, 10.0, 3.0, 2
    )  # fmt: skip
    big = {"bid": 1e300, "ask": 1e300}
    assert feed(eng, [tk(T0 + 9, 1e300, 1e5, **big)]).invalid == []  # huge but finite is fine
    huge = {"bid": 1e307, "ask": 1e307}
    [overflow] = feed(eng, [tk(T0 + 9, 1e307, 1e10, **huge)]).invalid  # notional overflows
    assert overflow.reason == "price * size overflows a float64"
    assert isinstance(out.invalid[0], InvalidTick)


# -- closing ----------------------------------------------------------------------------------


def test_bar_closes_when_the_watermark_reaches_its_end() -> None:
    eng = engine()
    assert feed(eng, [tk(T0 + 100 * MS, 10.0), tk(T0 + S - 1, 11.0)]).bars == []
    out = feed(eng, [tk(T0 + S, 12.0)])  # wm == end: closed
    assert [(b.start, b.close, b.rev) for b in out.bars] == [(T0, 11.0, 0)]


def test_grace_holds_a_bar_open() -> None:
    eng = engine(grace=500 * MS)
    feed(eng, [tk(T0 + 100 * MS, 10.0)])
    assert feed(eng, [tk(T0 + 1_200 * MS, 11.0)]).bars == []  # wm 1.2 s < end + grace 1.5 s
    out = feed(eng, [tk(T0 + 1_300 * MS, 12.0), tk(T0 + 900 * MS, 13.0)])
    assert out.bars == []
    out = feed(eng, [tk(T0 + 1_500 * MS, 14.0)])  # wm == end + grace
    (bar,) = out.bars
    # the tick at 0.9 s arrived late but within grace: part of rev 0
    assert (bar.start, bar.close, bar.trade_count, bar.rev) == (T0, 13.0, 2, 0)
    assert out.late == []


def test_idle_symbol_closes_by_wall_clock_only_when_live() -> None:
    live = engine(grace=100 * MS)
    replay = engine(grace=100 * MS)
    feed(live, [tk(T0 + 200 * MS, 10.0)], now=NOW, rate=1.0)
    feed(replay, [tk(T0 + 200 * MS, 10.0)], now=NOW, rate=0.0)

    assert live.advance(NOW + 899 * MS).bars == []  # wm = 1.099 s < 1.1 s
    assert live.watermark("AAPL", NOW + 899 * MS) == T0 + 1_099 * MS
    (bar,) = live.advance(NOW + 900 * MS).bars  # wm = 1.1 s = end + grace
    assert (bar.start, bar.open, bar.rev) == (T0, 10.0, 0)
    assert live.advance(NOW + 10 * S).bars == []  # emitted once only

    assert replay.advance(NOW + 3600 * S).bars == []  # event time alone: stays open
    assert replay.watermark("AAPL", NOW + 3600 * S) == T0 + 200 * MS
    assert [b.start for b in replay.end_of_stream("AAPL").bars] == [T0]


def test_clock_rate_scales_the_wall_clock() -> None:
    eng = engine()
    feed(eng, [tk(T0, 10.0)], now=NOW, rate=0.5)
    assert eng.advance(NOW + 1_999 * MS).bars == []
    assert len(eng.advance(NOW + 2 * S).bars) == 1


def test_wall_clock_deadline_closes_before_the_next_batch_is_folded() -> None:
    eng = engine(grace=200 * MS)
    feed(eng, [tk(T0 + 100 * MS, 10.0)], now=NOW, rate=1.0)
    # 1.2 s of wall clock later (no advance() call in between) a tick of the same bar arrives:
    # its bar was due before it arrived, so it is a revision, as if advance() had run.
    out = feed(eng, [tk(T0 + 900 * MS, 11.0)], now=NOW + 1_200 * MS, rate=1.0)
    assert [(b.close, b.trade_count, b.rev) for b in out.bars] == [(10.0, 1, 0), (11.0, 2, 1)]


def test_paced_replay_waits_grace_in_wall_clock_time() -> None:
    """At 1000x a wall-clock ms is a second of event time: grace holds in wall-clock terms."""
    eng = engine(grace=500 * MS)
    feed(eng, [tk(T0 + 100 * MS, 10.0)], now=NOW, rate=1000.0)
    # wm = 100.1 s of event time after 100 ms of wall clock, far past end + grace (1.5 s), but
    # ticks in flight for 100 ms are normal: the bar waits 500 ms of wall clock (500 s at 1000x)
    assert eng.watermark("AAPL", NOW + 100 * MS) == T0 + 100_100 * MS
    assert eng.advance(NOW + 100 * MS).bars == []
    assert eng.advance(NOW + 500 * MS).bars == []  # wm - 500 s = 0.1 s < end
    (bar,) = eng.advance(NOW + 501 * MS).bars  # wm - 500 s = 1.1 s >= end
    assert (bar.start, bar.rev) == (T0, 0)


def test_paced_replay_still_closes_by_its_own_ticks_with_event_time_grace() -> None:
    eng = engine(grace=500 * MS)
    feed(eng, [tk(T0 + 100 * MS, 10.0)], now=NOW, rate=1000.0)
    assert feed(eng, [tk(T0 + 1_499 * MS, 11.0)], now=NOW + 1 * MS, rate=1000.0).bars == []
    out = feed(eng, [tk(T0 + 1_500 * MS, 12.0)], now=NOW + 1 * MS, rate=1000.0)
    assert [(b.start, b.close, b.rev) for b in out.bars] == [(T0, 10.0, 0)]


def test_a_tick_delayed_in_transport_revises_instead_of_being_dropped() -> None:
    """Lateness is judged in event time: an in-order tick held up in transport is never lost."""
    eng = engine(("1s", "1m"), grace=200 * MS, window=10 * S)
    feed(eng, [tk(T0 + 100 * MS, 10.0)], now=NOW, rate=1.0)
    # the symbol goes quiet: the wall clock closes its 1 s bar, later its minute
    assert [b.interval for b in eng.advance(NOW + 2 * S).bars] == ["1s"]
    assert [b.interval for b in eng.advance(NOW + 90 * S).bars] == ["1m"]
    # 90 s of wall clock later the next tick of the same second arrives: the watermark is
    # 90 s past it, but it is newer than every tick seen, so it is not late data
    out = feed(eng, [tk(T0 + 900 * MS, 11.0)], now=NOW + 90 * S, rate=1.0)
    assert out.late == []
    assert [(b.interval, b.start, b.close, b.trade_count, b.rev) for b in out.bars] == [
        ("1s", T0, 11.0, 2, 1),
        ("1m", T0, 11.0, 2, 1),
    ]
    # newer again, into seconds the clock closed empty: created at rev 0, the minute revised
    out = feed(eng, [tk(T0 + 20 * S, 12.0)], now=NOW + 91 * S, rate=1.0)
    assert out.late == []
    assert [(b.interval, b.start - T0, b.rev) for b in out.bars] == [
        ("1s", 20 * S, 0),
        ("1m", 0, 2),
    ]
    # a tick more than the window behind the latest event time is late data: dropped
    out = feed(eng, [tk(T0 + 9 * S, 13.0)], now=NOW + 91 * S, rate=1.0)
    assert out.bars == []
    assert [(lt.interval, lt.lag_ns) for lt in out.late] == [("1s", 11 * S), ("1m", 11 * S)]
    assert eng.end_of_stream("AAPL").bars == []


def test_watermark_never_goes_backwards() -> None:
    eng = engine()
    feed(eng, [tk(T0 + 100 * MS, 10.0)], now=NOW, rate=1.0)
    assert eng.watermark("AAPL", NOW + 5 * S) == T0 + 5_100 * MS
    # a delayed tick older than the watermark does not pull it back
    feed(eng, [tk(T0 + 3 * S, 11.0)], now=NOW + 5 * S, rate=1.0)
    assert eng.watermark("AAPL", NOW + 5 * S) == T0 + 5_100 * MS
    assert eng.watermark("AAPL", NOW + 6 * S) == T0 + 6_100 * MS
    assert eng.watermark("NOPE", NOW) is None


def test_advance_orders_bars_by_width_symbol_start() -> None:
    eng = engine(("1m", "1s"))
    assert eng.intervals == ["1s", "1m"]
    for symbol in ("ZZ", "AA"):
        feed(eng, [tk(T0, 1.0), tk(T0 + 2 * S, 2.0)], symbol=symbol, rate=1.0)
    out = eng.advance(NOW + 60 * S)
    keys = [(b.interval, b.symbol, b.start - T0) for b in out.bars]
    assert keys == [
        ("1s", "AA", 2 * S),
        ("1s", "ZZ", 2 * S),
        ("1m", "AA", 0),
        ("1m", "ZZ", 0),
    ]


def test_several_bars_close_in_one_call_in_start_order() -> None:
    eng = engine(("1s", "1m"), grace=5 * S)
    feed(eng, [tk(T0 + i * S, float(i)) for i in range(4)])
    out = feed(eng, [tk(T0 + 64 * S, 9.0)])  # wm - grace = 59 s: the minute is not due yet
    assert [b.interval for b in out.bars] == ["1s"] * 4
    out = feed(eng, [tk(T0 + 65 * S, 9.0)])
    assert [(b.interval, b.start - T0) for b in out.bars] == [("1m", 0)]
    eng = engine(("1s", "1m"), grace=5 * S)
    feed(eng, [tk(T0 + i * S, float(i)) for i in range(4)])
    out = feed(eng, [tk(T0 + 66 * S, 9.0)])
    assert [(b.interval, b.start - T0) for b in out.bars] == [
        ("1s", 0),
        ("1s", S),
        ("1s", 2 * S),
        ("1s", 3 * S),
        ("1m", 0),
    ]


def test_end_of_stream_closes_everything_and_later_ticks_revise() -> None:
    eng = engine(("1s", "1m"), grace=10 * S)
    feed(eng, [tk(T0, 10.0), tk(T0 + 1500 * MS, 11.0)])
    bars = eng.end_of_stream("AAPL").bars
    assert [(b.interval, b.start - T0, b.rev) for b in bars] == [
        ("1s", 0, 0),
        ("1s", S, 0),
        ("1m", 0, 0),
    ]
    assert eng.end_of_stream("AAPL").bars == []
    assert eng.end_of_stream("UNKNOWN").bars == []
    # the same bar again is a revision, never a second rev 0 (same Nats-Msg-Id, other content)
    out = feed(eng, [tk(T0 + 1600 * MS, 12.0)])
    assert [(b.interval, b.start - T0, b.close, b.rev) for b in out.bars] == [
        ("1s", S, 12.0, 1),
        ("1m", 0, 12.0, 1),
    ]


# -- late ticks and revisions ------------------------------------------------------------------


def test_late_tick_within_window_revises_the_bar() -> None:
    eng = engine(("1s", "1m"))
    feed(eng, [tk(T0 + 100 * MS, 10.0, 1.0), tk(T0 + 800 * MS, 11.0, 1.0)])
    (closed,) = feed(eng, [tk(T0 + 5 * S, 12.0)]).bars
    assert (closed.start, closed.rev, closed.high, closed.trade_count) == (T0, 0, 11.0, 2)

    out = feed(eng, [tk(T0 + 50 * MS, 15.0, 2.0)])  # 4.95 s behind, window 60 s
    assert out.late == []
    (rev1,) = out.bars  # the 1m bar is still open: only the 1s bar is revised
    assert (rev1.interval, rev1.start, rev1.rev) == ("1s", T0, 1)
    assert (rev1.open, rev1.high, rev1.low, rev1.close) == (15.0, 15.0, 10.0, 11.0)
    assert (rev1.volume, rev1.trade_count) == (4.0, 3)
    assert rev1.vwap == pytest.approx((10 + 11 + 30) / 4)

    out = feed(eng, [tk(T0 + 700 * MS, 9.0), tk(T0 + 900 * MS, 8.0)])
    (rev2,) = out.bars  # two late ticks in one batch: one revision
    assert (rev2.rev, rev2.low, rev2.close, rev2.trade_count) == (2, 8.0, 8.0, 5)

    (minute,) = [b for b in closed_all(eng) if b.interval == "1m"]
    assert (minute.open, minute.trade_count, minute.rev) == (15.0, 6, 0)


def test_late_tick_into_an_empty_interval_creates_the_bar_at_rev_0() -> None:
    eng = engine()
    feed(eng, [tk(T0, 10.0), tk(T0 + 5 * S, 11.0)])
    out = feed(eng, [tk(T0 + 2 * S + 1, 12.0)])
    assert [(b.start - T0, b.open, b.rev) for b in out.bars] == [(2 * S, 12.0, 0)]
    out = feed(eng, [tk(T0 + 2 * S, 13.0)])
    assert [(b.start - T0, b.open, b.close, b.rev) for b in out.bars] == [(2 * S, 13.0, 12.0, 1)]


def test_late_tick_beyond_window_is_reported_and_changes_nothing() -> None:
    eng = engine(("1s", "1m"))
    feed(eng, [tk(T0 + 10 * S, 10.0)])
    first = feed(eng, [tk(T0 + 100 * S + 700 * MS, 11.0)]).bars
    assert {(b.interval, b.start - T0) for b in first} == {("1s", 10 * S), ("1m", 0)}

    lost = tk(T0 + 10 * S + 500 * MS, 99.0)  # 90.2 s behind the watermark
    before = eng.snapshot()
    out = feed(eng, [lost], symbol="AAPL")
    assert eng.snapshot() == before  # no bar, no watermark, nothing changed
    assert out.bars == []
    assert out.late == [
        LateTick(
            symbol="AAPL",
            interval=interval,
            tick=lost,
            reason=(
                "beyond revise window: 90.2 s behind the symbol's latest event time (window 60 s)"
            ),
            provider="test",
            lag_ns=90_200 * MS,
        )
        for interval in ("1s", "1m")
    ]
    # a tick of the same second that is within the window revises it from the old state
    eng = engine(window=100 * S)
    feed(eng, [tk(T0 + 10 * S, 10.0)])
    feed(eng, [tk(T0 + 100 * S + 700 * MS, 11.0)])
    (rev1,) = feed(eng, [lost]).bars
    assert (rev1.start - T0, rev1.rev, rev1.open, rev1.close, rev1.trade_count) == (
        10 * S,
        1,
        10.0,
        99.0,
        2,
    )


def test_a_tick_can_be_late_for_1s_and_on_time_for_1m() -> None:
    eng = engine(("1s", "1m"), window=1 * S)
    feed(eng, [tk(T0 + 1 * S, 10.0), tk(T0 + 30 * S, 11.0)])
    out = feed(eng, [tk(T0 + 2 * S, 12.0)])  # 28 s behind: beyond the 1 s window
    assert [lt.interval for lt in out.late] == ["1s"]
    (minute,) = [b for b in closed_all(eng) if b.interval == "1m"]
    assert minute.trade_count == 3  # folded into the still open minute


def test_window_boundary_is_inclusive() -> None:
    eng = engine(window=10 * S)
    feed(eng, [tk(T0, 10.0), tk(T0 + 15 * S, 11.0)])
    out = feed(eng, [tk(T0 + 5 * S, 12.0)])  # exactly 10 s behind: within
    assert [b.start - T0 for b in out.bars] == [5 * S]
    out = feed(eng, [tk(T0 + 5 * S - 1, 13.0)])  # 1 ns more: beyond
    assert out.bars == []
    assert len(out.late) == 1


def test_closed_bars_are_pruned_out_of_the_window() -> None:
    eng = engine(window=10 * S)
    for i in range(1000):
        feed(eng, [tk(T0 + i * S, float(i))])
        # keep while end + window >= wm (= i s): the bars starting at i-11 .. i-1 seconds
        assert eng.retained_bars() == min(i, 11)
    assert eng.open_bars() == 1
    # a tick for a pruned bar is beyond the window, never a fresh rev 0
    out = feed(eng, [tk(T0 + 500 * S, 1.0)])
    assert out.bars == []
    assert len(out.late) == 1


def test_forget_drops_the_symbol() -> None:
    eng = engine()
    feed(eng, [tk(T0, 1.0)])
    eng.forget("AAPL")
    assert eng.symbols == []
    assert eng.end_of_stream("AAPL").bars == []


# -- determinism and checkpoints ----------------------------------------------------------------


def _script() -> list[tuple[str, list[Tick], int, float]]:
    """A mixed scenario: two symbols, live and replay rates, late ticks, idle periods."""
    steps: list[tuple[str, list[Tick], int, float]] = []
    for i in range(40):
        rate = 1.0 if i % 3 else 0.0
        base = T0 + i * 700 * MS
        steps.append(
            ("AAA", [tk(base, 10.0 + i % 7, 0.5), tk(base + 3, 9.0 + i % 5, 0.0)], i, rate)
        )
        steps.append(("B.B", [tk(base + 350 * MS, 20.0 - i % 4, 1.25)], i, rate))
        if i % 9 == 8:
            steps.append(("AAA", [tk(base - 5 * S, 1.0, 2.0), tk(base - 90 * S, 2.0)], i, rate))
    return steps


def _run(eng: BarEngine, steps: list[tuple[str, list[Tick], int, float]]) -> list[object]:
    out: list[object] = []
    for symbol, ticks, i, rate in steps:
        now = NOW + i * 500 * MS
        res = eng.on_ticks(symbol, "p", ticks, now, clock_rate=rate)
        out.append((res.bars, res.late))
        out.append(eng.advance(now + 250 * MS).bars)
    return out


def test_identical_input_gives_identical_output() -> None:
    steps = _script()
    a = _run(engine(("1s", "1m"), grace=300 * MS, window=30 * S), steps)
    b = _run(engine(("1s", "1m"), grace=300 * MS, window=30 * S), steps)
    assert a == b
    assert any(late for bars_late in a[::2] for late in bars_late[1])  # type: ignore[index]
    assert any(b.rev > 0 for bars_late in a[::2] for b in bars_late[0])  # type: ignore[index]


@pytest.mark.parametrize("cut", [0, 1, 17, 40, 83])
def test_snapshot_restore_continues_identically(cut: int) -> None:
    steps = _script()
    reference = engine(("1s", "1m"), grace=300 * MS, window=30 * S)
    expected = _run(reference, steps)

    eng = engine(("1s", "1m"), grace=300 * MS, window=30 * S)
    got = _run(eng, steps[:cut])
    data = eng.snapshot()
    restored = BarEngine.restore(data)
    assert restored.snapshot() == data
    got += _run(restored, steps[cut:])
    assert got == expected
    assert restored.end_of_stream("AAA").bars == reference.end_of_stream("AAA").bars


def test_restore_applies_new_settings_and_refuses_another_price_type() -> None:
    eng = engine(("1s", "1m"), grace=300 * MS)
    feed(eng, [tk(T0, 1.0)])
    restored = BarEngine.restore(eng.snapshot(), intervals=["1s", "5s"], grace_ns=0)
    assert restored.intervals == ["1s", "5s"]
    out = restored.on_ticks("AAPL", "test", [tk(T0 + 5 * S, 2.0)], NOW, clock_rate=0.0)
    assert [(b.interval, b.start) for b in out.bars] == [("1s", T0)]  # the 1s bar kept its tick
    with pytest.raises(ValueError, match="price type"):
        BarEngine.restore(eng.snapshot(), price_type="MID")
    with pytest.raises(ValueError, match="snapshot"):
        BarEngine.restore(b"not msgpack")


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        BarEngine([], 0, 0)
    with pytest.raises(ValueError):
        BarEngine(["1x"], 0, 0)
    with pytest.raises(ValueError):
        BarEngine(["1s"], -1, 0)
    with pytest.raises(ValueError):
        BarEngine(["1s"], 0, 0, price_type="BID")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        engine().on_ticks("A", "p", [], NOW, clock_rate=-1.0)


def test_huge_sizes_keep_the_volume_of_the_decimal_sum() -> None:
    """Sizes above 2**53 / 1e9 (~9M) still sum to float64 of the exact decimal sum."""
    from decimal import Decimal

    engine = BarEngine(["1s"], grace_ns=0, revise_window_ns=0)
    base = 1_700_000_000_000_000_000
    sizes = ["10000000.123456789", "12345678.987654321", "123456789", "0.5"]
    ticks = [Tick(base + i, base + i, i + 1, 10.0, float(s)) for i, s in enumerate(sizes)]
    engine.on_ticks("BIG", "replay", ticks, now_ns=0, clock_rate=0)
    (bar,) = engine.end_of_stream("BIG").bars
    assert bar.volume == float(sum(Decimal(s) for s in sizes))


def test_a_snapshot_after_a_revision_carries_the_revised_bar() -> None:
    # Closed bars are encoded once and reused by later snapshots: a late tick must renew that.
    eng = engine(("1s",), grace=0, window=60 * S)
    feed(eng, [tk(T0, 10.0), tk(T0 + 2 * S, 11.0)], now=T0 + 2 * S)
    first = eng.snapshot()
    assert eng.snapshot() == first  # nothing changed: the cached encodings, the same bytes
    revised = eng.on_ticks("AAPL", "p", [tk(T0 + 500 * MS, 15.0, 2.0)], T0 + 2 * S).bars
    assert [(b.start, b.rev, b.high, b.volume) for b in revised] == [(T0, 1, 15.0, 3.0)]
    second = eng.snapshot()
    assert second != first
    restored = BarEngine.restore(second)
    assert restored.snapshot() == second
    # One more late tick on each: both revise from the same state (rev 1, high 15, volume 3).
    again = [tk(T0 + 600 * MS, 12.0)]
    for e in (eng, restored):
        bars = e.on_ticks("AAPL", "p", again, T0 + 2 * S).bars
        assert [(b.start, b.rev, b.high, b.volume) for b in bars] == [(T0, 2, 15.0, 4.0)]
