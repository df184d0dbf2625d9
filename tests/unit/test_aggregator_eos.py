"""End-of-stream markers wait for their run's last ticks; de-duplication of resent ticks."""

from __future__ import annotations

import msgspec
import pytest

from mdp.services.aggregator.dedup import SeenSeqs, fresh_ticks
from mdp.services.aggregator.eos import BadMarker, EndOfStreamTracker
from mdp.shared.contract.messages import EndOfStream, Tick

MARKER = EndOfStream(run="r1", symbol="AAPL", symbols_total=1, ticks=3)
HEADER = msgspec.json.encode(MARKER).decode()


def ticks(*seqs: int) -> list[Tick]:
    return [
        Tick(ts=1_700_000_000_000_000_000 + s, recv=0, seq=s, price=1.0, size=1.0) for s in seqs
    ]


def test_a_marker_waits_until_every_tick_of_its_run_was_folded() -> None:
    sources: dict[str, SeenSeqs] = {}
    tracker = EndOfStreamTracker()
    fresh_ticks(sources, "AAPL", "r1", ticks(1, 3))
    tracker.note("AAPL", HEADER)
    assert tracker.take_complete("AAPL", sources) is None
    assert tracker.waiting == {"AAPL": HEADER}
    tracker.note("AAPL", None)  # a later batch without a marker keeps it waiting
    fresh_ticks(sources, "AAPL", "r1", ticks(2))
    assert tracker.take_complete("AAPL", sources) == (MARKER, HEADER)
    assert tracker.waiting == {}
    assert tracker.take_complete("AAPL", sources) is None


def test_a_marker_of_another_run_or_without_record_completes_at_once() -> None:
    tracker = EndOfStreamTracker({"AAPL": HEADER})
    assert tracker.take_complete("AAPL", {"AAPL": SeenSeqs("r0", floor=0)}) == (MARKER, HEADER)
    tracker.note("AAPL", HEADER)
    assert tracker.take_complete("AAPL", {}) == (MARKER, HEADER)


def test_a_bad_marker_is_forgotten() -> None:
    tracker = EndOfStreamTracker()
    tracker.note("AAPL", "{not json")
    with pytest.raises(BadMarker):
        tracker.take_complete("AAPL", {})
    assert tracker.waiting == {}


def test_fresh_ticks_drops_resent_ticks_of_the_same_run() -> None:
    sources: dict[str, SeenSeqs] = {}
    assert fresh_ticks(sources, "AAPL", "r1", ticks(1, 2)) == (ticks(1, 2), 0)
    assert fresh_ticks(sources, "AAPL", "r1", ticks(2, 3)) == (ticks(3), 1)
    assert fresh_ticks(sources, "AAPL", "r2", ticks(1)) == (ticks(1), 0)  # a new run: afresh
    assert sources["AAPL"].run == "r2"
    assert fresh_ticks(sources, "MSFT", "", ticks(1, 1)) == (ticks(1, 1), 0)  # no run: all fresh
    assert "MSFT" not in sources
