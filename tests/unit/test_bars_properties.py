"""Property tests: whatever the delivery, the final bars equal the batch definition of the bars.

Ticks of a few symbols, with timestamps clustered on second and minute boundaries, duplicates
and equal timestamps, are delivered keeping each symbol's arrival order but interleaving symbols
arbitrarily, in random chunks, at random wall-clock times and clock rates (full speed, live,
slower and faster than real time), with some ticks displaced later (late, within a large revise
window), `advance()` calls and checkpoint round trips in between. The latest revision of every
bar must equal a direct, batch implementation of `shared/data/README.md` applied to the same
ticks in arrival order. With a small revise window some late ticks are dropped: then every tick
is accounted for exactly once per interval, either in the final bars or reported late, and the
final bars are the batch definition of the ticks that were not reported.
"""

from __future__ import annotations

import math
from collections import defaultdict
from decimal import Decimal
from typing import NamedTuple

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mdp.services.aggregator.bars import BarEngine
from mdp.shared.contract.messages import Bar, Tick, interval_ns

S = 1_000_000_000
T0 = 28_333_333 * 60 * S  # a whole minute
INTERVALS = ("1s", "1m")
SYMBOLS = ("AAA", "B.B", "C/D")
PRICES = ("9.99", "10", "10.01", "10.5", "11.25", "0.1", "0.3")
WINDOW = 10**13  # 10,000 s: every displaced tick stays within the revise window

# (symbol, ts, price string, size string); the strings give the exact decimal reference.
Raw = tuple[str, int, str, str]


class Feed(NamedTuple):
    """Deliver a chunk of one symbol's ticks `dt` ns after the previous step."""

    symbol: str
    chunk: list[Raw]
    dt: int
    rate: float


class Advance(NamedTuple):
    """Call `advance()` `dt` ns after the previous step."""

    dt: int


class Checkpoint(NamedTuple):
    """Replace the engine by `restore(snapshot())`."""


Step = Feed | Advance | Checkpoint

_offsets = st.sampled_from([0, 1, -1, 2, S // 2, S - 1, -(S // 2), 123_456_789])
_seconds = st.one_of(st.integers(0, 3), st.integers(58, 62), st.integers(0, 130))
_sizes = st.one_of(
    st.just("0"),
    st.integers(1, 5000).map(lambda n: str(Decimal(n) / 1000)),
    st.sampled_from(["0.1", "0.2", "0.002", "1", "100"]),
)


@st.composite
def tick_streams(draw: st.DrawFn) -> dict[str, list[Raw]]:
    """Per symbol, ticks in arrival order: mostly time-sorted, duplicated, some displaced."""
    streams: dict[str, list[Raw]] = {}
    for symbol in draw(st.lists(st.sampled_from(SYMBOLS), min_size=1, max_size=3, unique=True)):
        raw = draw(
            st.lists(
                st.tuples(_seconds, _offsets, st.sampled_from(PRICES), _sizes),
                min_size=1,
                max_size=40,
            )
        )
        ticks: list[Raw] = [
            (symbol, max(1, T0 + sec * S + off), price, size) for sec, off, price, size in raw
        ]
        # exact duplicates are separate real prints
        for i in draw(st.lists(st.integers(0, len(ticks) - 1), max_size=5)):
            ticks.append(ticks[i])
        ticks.sort(key=lambda t: t[1])  # stable: equal timestamps keep their order
        # displace some ticks later in arrival order: they arrive late
        for _ in range(draw(st.integers(0, 4))):
            src = draw(st.integers(0, len(ticks) - 1))
            dst = draw(st.integers(src, len(ticks) - 1))
            ticks.insert(dst, ticks.pop(src))
        streams[symbol] = ticks
    return streams


@st.composite
def deliveries(draw: st.DrawFn, streams: dict[str, list[Raw]]) -> list[Step]:
    """Interleave the symbols' chunks arbitrarily, with clock steps, advances and checkpoints."""
    left = {symbol: list(ticks) for symbol, ticks in streams.items()}
    steps: list[Step] = []
    while any(left.values()):
        symbol = draw(st.sampled_from(sorted(s for s, t in left.items() if t)))
        size = draw(st.integers(1, 12))
        chunk, left[symbol] = left[symbol][:size], left[symbol][size:]
        rate = draw(st.sampled_from([0.0, 0.0, 1.0, 0.5, 10.0, 1000.0]))
        steps.append(Feed(symbol, chunk, draw(st.integers(0, 3 * S)), rate))
        action = draw(st.sampled_from(["none", "none", "none", "advance", "checkpoint"]))
        if action == "advance":
            steps.append(Advance(draw(st.integers(0, 3 * S))))
        elif action == "checkpoint":
            steps.append(Checkpoint())
    return steps


def reference_bars(
    ticks_in_arrival_order: list[Raw], skip: frozenset[tuple[str, int]] = frozenset()
) -> dict[tuple[str, str, int], dict]:
    """The README definition, computed directly from all ticks with exact decimals.

    `skip` holds (interval, arrival index) of ticks to leave out of that interval's bars.
    """
    groups: dict[tuple[str, str, int], list[tuple[int, int, str, str]]] = defaultdict(list)
    for arrival, (symbol, ts, price, size) in enumerate(ticks_in_arrival_order):
        for interval in INTERVALS:
            if (interval, arrival) in skip:
                continue
            width = interval_ns(interval)
            groups[(symbol, interval, ts // width * width)].append((ts, arrival, price, size))
    out = {}
    for key, trades in groups.items():
        first = min(trades, key=lambda t: (t[0], t[1]))  # by event time, then arrival
        last = max(trades, key=lambda t: (t[0], t[1]))
        volume = sum((Decimal(t[3]) for t in trades), Decimal(0))
        notional = sum((Decimal(t[2]) * Decimal(t[3]) for t in trades), Decimal(0))
        out[key] = {
            "open": float(first[2]),
            "high": max(float(t[2]) for t in trades),
            "low": min(float(t[2]) for t in trades),
            "close": float(last[2]),
            "volume": float(volume),
            "trade_count": len(trades),
            "vwap": float(notional / volume) if volume else None,
        }
    return out


def to_tick(raw: Raw, seq: int) -> Tick:
    return Tick(ts=raw[1], recv=0, seq=seq, price=float(raw[2]), size=float(raw[3]))


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    data=st.data(),
    grace=st.sampled_from([0, 1, S // 3, 2 * S]),
    jump=st.sampled_from([0, 600 * S]),  # the outlier guard on (as deployed) or off
)
def test_final_bars_equal_the_batch_definition(data: st.DataObject, grace: int, jump: int) -> None:
    streams = data.draw(tick_streams())
    steps = data.draw(deliveries(streams))
    engine = BarEngine(INTERVALS, grace_ns=grace, revise_window_ns=WINDOW, max_jump_ns=jump)
    emitted: list[Bar] = []
    arrival: list[Raw] = []
    now = 10**15
    seq = 0
    for step in steps:
        if isinstance(step, Feed):
            now += step.dt
            ticks = []
            for raw in step.chunk:
                seq += 1
                ticks.append(to_tick(raw, seq))
            out = engine.on_ticks(step.symbol, "prop", ticks, now, clock_rate=step.rate)
            assert out.late == []  # everything is within the window
            emitted.extend(out.bars)
            arrival.extend(step.chunk)
        elif isinstance(step, Advance):
            now += step.dt
            emitted.extend(engine.advance(now).bars)
        else:
            engine = BarEngine.restore(engine.snapshot())
    for symbol in streams:
        emitted.extend(engine.end_of_stream(symbol).bars)
    assert engine.open_bars() == 0

    # every bar is first emitted at rev 0, then revised one rev at a time
    revs: dict[tuple[str, str, int], list[int]] = defaultdict(list)
    for bar in emitted:
        revs[(bar.symbol, bar.interval, bar.start)].append(bar.rev)
    for key, seen in revs.items():
        assert seen == list(range(len(seen))), (key, seen)

    event(f"revised bars: {any(b.rev for b in emitted)}")
    assert_final_bars(emitted, reference_bars(arrival))


def assert_final_bars(emitted: list[Bar], expected: dict[tuple[str, str, int], dict]) -> None:
    """The latest revision of every emitted bar equals the expected bar, and no bar is extra."""
    latest = {(b.symbol, b.interval, b.start): b for b in emitted}  # revs come in order
    assert latest.keys() == expected.keys()
    for key, want in expected.items():
        bar = latest[key]
        assert bar.end - bar.start == interval_ns(key[1])
        got = {f: getattr(bar, f) for f in want if f != "vwap"}
        assert got == {f: v for f, v in want.items() if f != "vwap"}, key
        if want["vwap"] is None:
            assert bar.vwap is None, key
        else:
            assert bar.vwap is not None and math.isclose(bar.vwap, want["vwap"], rel_tol=1e-9)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_chunking_does_not_change_the_final_bars_at_event_time(data: st.DataObject) -> None:
    streams = data.draw(tick_streams())
    results = []
    for _ in range(2):
        steps = data.draw(deliveries(streams))
        engine = BarEngine(INTERVALS, grace_ns=0, revise_window_ns=WINDOW)
        latest: dict[tuple[str, str, int], Bar] = {}
        seq = 0
        for step in steps:
            if not isinstance(step, Feed):
                continue
            ticks = [to_tick(raw, seq := seq + 1) for raw in step.chunk]
            for bar in engine.on_ticks(step.symbol, "prop", ticks, 0, clock_rate=0.0).bars:
                latest[(bar.symbol, bar.interval, bar.start)] = bar
        for symbol in streams:
            for bar in engine.end_of_stream(symbol).bars:
                latest[(bar.symbol, bar.interval, bar.start)] = bar
        # ignore rev: how many revisions a bar needed depends on the chunking
        results.append({k: (b.open, b.high, b.low, b.close, b.volume, b.trade_count, b.vwap)
                        for k, b in latest.items()})  # fmt: skip
    assert results[0] == results[1]


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    data=st.data(),
    grace=st.sampled_from([0, S // 3, 2 * S]),
    window=st.sampled_from([0, 1, S, 5 * S, 30 * S]),
)
def test_every_tick_is_in_the_bars_or_reported_late(
    data: st.DataObject, grace: int, window: int
) -> None:
    """A small window drops some late ticks: never silently, never leaving a wrong bar."""
    streams = data.draw(tick_streams())
    steps = data.draw(deliveries(streams))
    engine = BarEngine(INTERVALS, grace_ns=grace, revise_window_ns=window)
    emitted: list[Bar] = []
    arrival: list[Raw] = []
    dropped: set[tuple[str, int]] = set()
    max_seen: dict[str, int] = {}
    now = 10**15
    seq = 0
    for step in steps:
        if isinstance(step, Feed):
            now += step.dt
            ticks = []
            index: dict[int, int] = {}  # seq -> arrival index
            for raw in step.chunk:
                seq += 1
                index[seq] = len(arrival)
                arrival.append(raw)
                ticks.append(to_tick(raw, seq))
            out = engine.on_ticks(step.symbol, "prop", ticks, now, clock_rate=step.rate)
            emitted.extend(out.bars)
            before = max_seen.get(step.symbol)
            for late in out.late:
                # judged against the latest event time of the symbol before this batch
                assert before is not None
                assert late.lag_ns == before - late.tick.ts > window
                assert late.symbol == step.symbol and late.reason.startswith("beyond")
                key = (late.interval, index[late.tick.seq])
                assert key not in dropped  # each tick reported at most once per interval
                dropped.add(key)
            max_seen[step.symbol] = max(before or 0, *(raw[1] for raw in step.chunk))
        elif isinstance(step, Advance):
            now += step.dt
            emitted.extend(engine.advance(now).bars)
        else:
            engine = BarEngine.restore(engine.snapshot())
    for symbol in streams:
        emitted.extend(engine.end_of_stream(symbol).bars)
    event(f"dropped ticks: {min(len(dropped), 3)}")
    assert_final_bars(emitted, reference_bars(arrival, frozenset(dropped)))
