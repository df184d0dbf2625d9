"""The gap detector: subscribed symbols that go silent open a gap; their next tick closes it."""

from __future__ import annotations

import msgspec
import pytest

from mdp.services.aggregator.gaps import GapDetector
from mdp.shared.contract.events import Gap

S = 1_000_000_000
MS = 1_000_000
T = 1_700_000_000 * S  # an arbitrary wall clock


def detector(interval: str = "1s", missing: int = 5) -> GapDetector:
    return GapDetector(interval, missing)


def test_silence_of_n_intervals_opens_a_gap_once() -> None:
    det = detector()
    det.subscribe("AAPL", T)
    det.on_ticks("AAPL", T + 100 * MS)
    assert det.next_check_ns() == T + 5_100 * MS
    assert det.check(T + 5_099 * MS) == []  # 4.999 s of silence
    (event,) = det.check(T + 5_100 * MS)  # exactly 5 intervals: opened
    assert event == Gap(
        symbol="AAPL",
        state="opened",
        interval="1s",
        since_ns=T + 100 * MS,
        missing_intervals=5,
        at_ns=T + 5_100 * MS,
    )
    assert det.check(T + 60 * S) == []  # reported once, not on every check
    assert det.open_gaps() == ["AAPL"]
    assert det.next_check_ns() is None


def test_ticks_returning_close_the_gap_with_its_extent() -> None:
    det = detector()
    det.subscribe("AAPL", T)
    det.on_ticks("AAPL", T + 1 * S)
    det.check(T + 7 * S)
    (closed,) = det.on_ticks("AAPL", T + 13_500 * MS)
    assert closed == Gap(
        symbol="AAPL",
        state="closed",
        interval="1s",
        since_ns=T + 1 * S,
        missing_intervals=12,  # 12.5 s without a tick: 12 whole intervals
        at_ns=T + 13_500 * MS,
        until_ns=T + 13_500 * MS,
        duration_ns=12_500 * MS,
        reason="ticks",
    )
    assert det.open_gaps() == []
    assert det.on_ticks("AAPL", T + 14 * S) == []  # nothing open: nothing to close
    # the silence counts afresh from the last tick
    assert det.check(T + 18_999 * MS) == []
    assert [e.since_ns for e in det.check(T + 19 * S)] == [T + 14 * S]


def test_a_symbol_that_never_ticks_opens_a_gap_from_its_subscription() -> None:
    det = detector("1m", 2)
    det.subscribe("IBM", T)
    assert det.check(T + 119 * S) == []
    (event,) = det.check(T + 120 * S)
    assert (event.symbol, event.since_ns, event.missing_intervals, event.interval) == (
        "IBM",
        T,
        2,
        "1m",
    )


def test_ticks_keep_a_symbol_out_of_a_gap_and_other_symbols_are_independent() -> None:
    det = detector(missing=3)
    det.subscribe("A", T)
    det.subscribe("B", T)
    for i in range(1, 20):
        det.on_ticks("A", T + i * S)  # A ticks every second
        opened = det.check(T + i * S)
        assert [e.symbol for e in opened] == (["B"] if i == 3 else [])
    assert det.open_gaps() == ["B"]


def test_unsubscribed_symbols_are_ignored_and_unsubscribing_closes_an_open_gap() -> None:
    det = detector(missing=2)
    assert det.on_ticks("NOPE", T) == []
    assert det.check(T + 3600 * S) == []
    det.subscribe("A", T)
    det.subscribe("B", T)
    assert [e.symbol for e in det.check(T + 2 * S)] == ["A", "B"]
    (event,) = det.unsubscribe("A", T + 5 * S)
    assert (event.state, event.reason, event.duration_ns) == ("closed", "unsubscribed", 5 * S)
    assert det.unsubscribe("B") == []  # without a time: quietly
    assert det.unsubscribe("B", T) == []  # not subscribed any more
    assert det.symbols == []
    assert det.on_ticks("A", T + 6 * S) == []


def test_subscribing_again_keeps_the_state() -> None:
    det = detector(missing=2)
    det.subscribe("A", T)
    det.subscribe("A", T + 10 * S)  # a re-delivered job entry: the silence still counts from T
    assert [e.since_ns for e in det.check(T + 2 * S)] == [T]


def test_sync_makes_the_subscriptions_exactly_the_given_symbols() -> None:
    det = detector(missing=1)
    assert det.sync(["B", "A"], T) == []
    assert det.symbols == ["A", "B"]
    assert len(det.check(T + S)) == 2
    events = det.sync(["B", "C"], T + 3 * S)
    assert [(e.symbol, e.state, e.reason) for e in events] == [("A", "closed", "unsubscribed")]
    assert det.symbols == ["B", "C"]
    assert det.open_gaps() == ["B"]  # B's gap is still open
    assert [e.symbol for e in det.check(T + 4 * S)] == ["C"]


def test_a_clock_stepping_back_never_gives_a_negative_gap() -> None:
    det = detector(missing=1)
    det.subscribe("A", T)
    det.on_ticks("A", T + 10 * S)
    det.on_ticks("A", T + 5 * S)  # an earlier clock reading does not move the last tick back
    assert det.check(T + 10_999 * MS) == []
    det.check(T + 11 * S)
    (closed,) = det.on_ticks("A", T + 9 * S)
    assert (closed.until_ns, closed.duration_ns, closed.missing_intervals) == (T + 10 * S, 0, 0)


def test_no_flat_bars_only_events_and_deterministic() -> None:
    """The same calls give the same events; the detector never produces anything but events."""

    def run() -> list[Gap]:
        det = detector(missing=2)
        events: list[Gap] = []
        det.subscribe("X", T)
        det.subscribe("Y", T)
        for i in range(50):
            now = T + i * 700 * MS
            if i % 7 < 3:
                events += det.on_ticks("X", now)
            if i % 11 == 0:
                events += det.on_ticks("Y", now)
            events += det.check(now)
        return events

    first = run()
    assert first == run()
    assert all(isinstance(e, Gap) for e in first)
    states = [(e.symbol, e.state) for e in first]
    for symbol in ("X", "Y"):
        mine = [s for sym, s in states if sym == symbol]
        # at least one gap each, strictly alternating, starting with "opened"
        assert mine and mine == [("opened", "closed")[i % 2] for i in range(len(mine))]


def test_event_json_and_ids() -> None:
    det = detector(missing=1)
    det.subscribe("BRK.B", T)
    (opened,) = det.check(T + S)
    (closed,) = det.on_ticks("BRK.B", T + 3 * S)
    assert msgspec.json.decode(msgspec.json.encode(opened)) == {
        "symbol": "BRK.B",
        "state": "opened",
        "interval": "1s",
        "since_ns": T,
        "missing_intervals": 1,
        "at_ns": T + S,
    }
    body = msgspec.json.decode(msgspec.json.encode(closed))
    assert (body["until_ns"], body["duration_ns"], body["reason"]) == (T + 3 * S, 3 * S, "ticks")
    assert opened.event_id == f"gap:BRK.B:{T}:opened"
    assert closed.event_id == f"gap:BRK.B:{T}:closed"


def test_snapshot_restore_keeps_open_gaps_and_silences() -> None:
    det = detector(missing=2)
    det.subscribe("A", T)
    det.subscribe("B", T)
    det.on_ticks("B", T + 1500 * MS)
    det.check(T + 2 * S)  # A's gap opens
    restored = GapDetector.restore(det.snapshot())
    assert restored.snapshot() == det.snapshot()
    assert (restored.interval, restored.threshold_ns) == ("1s", 2 * S)
    assert restored.check(T + 3 * S) == []  # A already reported, B silent 1.5 s only
    assert [e.symbol for e in restored.check(T + 3_500 * MS)] == ["B"]
    assert [e.state for e in restored.on_ticks("A", T + 4 * S)] == ["closed"]
    changed = GapDetector.restore(det.snapshot(), interval="1m", missing_intervals=1)
    assert changed.threshold_ns == 60 * S
    with pytest.raises(ValueError, match="snapshot"):
        GapDetector.restore(b"\x00junk")


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        GapDetector("1s", 0)
    with pytest.raises(ValueError):
        GapDetector("fast", 3)
