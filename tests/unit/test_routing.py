"""Source selection: first available provider in the configured order."""

from __future__ import annotations

from services.router.routing import SourceSelector

S = 1_000_000_000


def test_first_source_seen_is_chosen_and_announced() -> None:
    sel = SourceSelector(["ibkr", "synthetic"], 5 * S)
    assert sel.observe("AAPL", "synthetic", 0) == (True, "synthetic")
    assert sel.observe("AAPL", "synthetic", 1 * S) == (True, None)
    assert sel.chosen("AAPL") == "synthetic"


def test_better_ranked_source_takes_over_and_worse_is_dropped() -> None:
    sel = SourceSelector(["ibkr", "synthetic"], 5 * S)
    sel.observe("AAPL", "synthetic", 0)
    assert sel.observe("AAPL", "ibkr", 1 * S) == (True, "ibkr")
    assert sel.observe("AAPL", "synthetic", 2 * S) == (False, None)


def test_fails_over_when_the_chosen_source_goes_stale() -> None:
    sel = SourceSelector(["ibkr", "synthetic"], 5 * S)
    sel.observe("AAPL", "ibkr", 0)
    assert sel.observe("AAPL", "synthetic", 4 * S) == (False, None)
    assert sel.observe("AAPL", "synthetic", 6 * S) == (True, "synthetic")


def test_symbols_are_independent_and_unlisted_providers_rank_last() -> None:
    sel = SourceSelector(["ibkr"], 5 * S)
    assert sel.observe("AAPL", "zeta", 0) == (True, "zeta")
    assert sel.observe("MSFT", "alpha", 0) == (True, "alpha")
    assert sel.observe("AAPL", "alpha", 1) == (True, "alpha")
    assert sel.observe("AAPL", "zeta", 2) == (False, None)
    assert sel.observe("AAPL", "ibkr", 3) == (True, "ibkr")
