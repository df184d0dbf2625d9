"""The router's whole-batch check says "all sane" exactly when no single tick has a problem."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mdp.services.router.service import screen, tick_problem
from mdp.shared.contract.messages import Tick, TickBatch

NOW = 1_796_000_000_000_000_000
S = 1_000_000_000

SANE_VALUES = st.floats(min_value=0, max_value=1e6)
ODD_VALUES = st.sampled_from([0.0, 1e308, 1.7e308, float("nan"), float("inf"), -1.0, -0.0])
ODD_TIMES = st.sampled_from([0, 1_381_239_000, NOW + 90 * S, NOW + 400 * S])


@st.composite
def value(draw: st.DrawFn) -> float:
    """Mostly sane, so that one odd value in an otherwise sane batch is common."""
    return draw(ODD_VALUES if draw(st.integers(0, 7)) == 0 else SANE_VALUES)


values = value()


@st.composite
def ticks(draw: st.DrawFn) -> Tick:
    odd = draw(st.integers(0, 9)) == 0
    recv = draw(ODD_TIMES) if odd else draw(st.integers(NOW - 3600 * S, NOW + 30 * S))
    ts = draw(ODD_TIMES) if draw(st.integers(0, 9)) == 0 else recv - draw(st.integers(0, S))
    return Tick(
        ts=ts,
        recv=recv,
        seq=draw(st.integers(1, 10**6)),
        price=draw(values),
        size=draw(values),
        bid_size=draw(st.one_of(st.none(), values)),
        ask_size=draw(st.one_of(st.none(), values)),
    )


@settings(max_examples=400, deadline=None)
@given(st.lists(ticks(), max_size=8))
def test_the_fast_path_rejects_exactly_what_the_per_tick_rules_reject(batch: list[Tick]) -> None:
    good, bad = screen(TickBatch("X", "p", batch), NOW)
    assert good == [t for t in batch if tick_problem(t, NOW) is None]
    assert [t for t, _, _ in bad] == [t for t in batch if tick_problem(t, NOW) is not None]
