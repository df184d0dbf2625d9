"""The bar invariants the store checks (pure): every rule, and no false alarm on a sane bar."""

from __future__ import annotations

import math
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mdp.services.store.invariants import bar_violation, split_bars
from mdp.shared.contract.messages import Bar, interval_ns

T0 = 1_700_000_000_000_000_000
_prices = st.floats(-1e12, 1e12, allow_nan=False, allow_infinity=False)


@st.composite
def sane_bars(draw: st.DrawFn) -> Bar:
    """Any bar the aggregator could emit: prices inside [low, high], the interval's width."""
    low, high = sorted(draw(st.lists(_prices, min_size=2, max_size=2)))
    inside = st.floats(low, high, allow_nan=False)
    interval = draw(st.sampled_from(["1ms", "1s", "5s", "1m", "15m", "1h", "1d"]))
    width = interval_ns(interval)
    start = draw(st.integers(0, 2**62 // width)) * width
    return Bar(
        symbol=draw(st.sampled_from(["AAPL", "BTC/USD", "BRK.B"])),
        interval=interval,
        start=start,
        end=start + width,
        open=draw(inside),
        high=high,
        low=low,
        close=draw(inside),
        volume=draw(st.floats(0, 1e300)),
        trade_count=draw(st.integers(0, 2**40)),
        vwap=draw(st.none() | inside),
        provider="synthetic",
        rev=draw(st.integers(0, 100)),
    )


@given(sane_bars())
def test_a_sane_bar_keeps_every_invariant(bar: Bar) -> None:
    assert bar_violation(bar) is None


def replace(bar: Bar, **changes: Any) -> Bar:
    return msgspec.structs.replace(bar, **changes)


BASE = Bar("AAPL", "1s", T0, T0 + 10**9, 10.0, 11.0, 9.0, 10.5, 100.0, 5, 10.2, "synthetic")


@pytest.mark.parametrize(
    ("changes", "violation"),
    [
        ({"high": 8.0}, "high 8.0 < low 9.0"),
        ({"open": 11.5}, "open 11.5 outside [low 9.0, high 11.0]"),
        ({"open": 8.5}, "open 8.5 outside [low 9.0, high 11.0]"),
        ({"close": 12.0}, "close 12.0 outside [low 9.0, high 11.0]"),
        ({"volume": -0.5}, "volume -0.5 is negative"),
        ({"trade_count": -1}, "trade_count -1 is negative"),
        ({"end": T0}, f"end {T0} <= start {T0}"),
        ({"end": T0 - 1}, f"end {T0 - 1} <= start {T0}"),
        ({"end": T0 + 2 * 10**9}, "end - start = 2000000000 ns, but interval '1s' is 1000000000"),
        ({"interval": "1m"}, "end - start = 1000000000 ns, but interval '1m' is 60000000000 ns"),
        ({"interval": "soon"}, "interval 'soon' is not <positive integer><unit>"),
        ({"close": math.nan}, "prices and volume must be finite"),
        ({"high": math.inf}, "prices and volume must be finite"),
        ({"volume": -math.inf}, "prices and volume must be finite"),
        ({"vwap": math.nan}, "prices and volume must be finite"),
        ({"start": 2**63}, "an integer field is outside 64 bits"),
        ({"symbol": "A\x00"}, "text fields must not contain NUL"),
    ],
)
def test_each_broken_invariant_is_named_with_its_values(
    changes: dict[str, Any], violation: str
) -> None:
    problem = bar_violation(replace(BASE, **changes))
    assert problem is not None and problem.startswith(violation), problem


@given(
    st.lists(
        st.tuples(sane_bars(), st.sampled_from([{}, {}, {"high": -2e12}, {"volume": -1.0}])),
        max_size=12,
    )
)
def test_split_keeps_the_good_bars_in_order_and_names_each_bad_one(
    drawn: list[tuple[Bar, dict[str, Any]]],
) -> None:
    bars = [replace(bar, **changes) if changes else bar for bar, changes in drawn]
    good, bad = split_bars(bars)
    assert good == [bar for bar, (_, changes) in zip(bars, drawn, strict=True) if not changes]
    assert [index for index, _, _ in bad] == [i for i, (_, c) in enumerate(drawn) if c]
    for index, bar, reason in bad:
        assert bar is bars[index] and reason.startswith("invalid bar: ")
