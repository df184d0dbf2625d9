"""The invariants of a bar (pure): what the store checks of each bar before it writes it.

A bar that breaks one is dead-lettered on its own (`md.dlq.store`, reason `invalid bar: ...`)
and the good bars of its batch are stored; the ingest API refuses such a batch (400
`invalid_bar`). The rules, checked in this order, the first broken one answering:

- every number is storable: open, high, low, close, volume and vwap finite, the integers
  within 64 bits, no NUL in the text fields (`writers.storage_problem`);
- `low <= high`, and open and close within `[low, high]`;
- `volume >= 0` and `trade_count >= 0`;
- `end > start`, and `end - start` is exactly the width of `interval` (which must parse).
"""

from __future__ import annotations

from collections.abc import Iterable

from mdp.services.store.writers import storage_problem
from mdp.shared.contract.messages import Bar, interval_ns


def bar_violation(bar: Bar) -> str | None:
    """The first invariant `bar` breaks, said with its values; None when it may be stored."""
    problem = storage_problem(bar)
    if problem is not None:
        return problem
    low, high = bar.low, bar.high
    if high < low:
        return f"high {high!r} < low {low!r}"
    for name, price in (("open", bar.open), ("close", bar.close)):
        if not low <= price <= high:
            return f"{name} {price!r} outside [low {low!r}, high {high!r}]"
    if bar.volume < 0:
        return f"volume {bar.volume!r} is negative"
    if bar.trade_count < 0:
        return f"trade_count {bar.trade_count} is negative"
    if bar.end <= bar.start:
        return f"end {bar.end} <= start {bar.start}"
    try:
        width = interval_ns(bar.interval)
    except ValueError as exc:
        return str(exc)
    if bar.end - bar.start != width:
        return (
            f"end - start = {bar.end - bar.start} ns, but interval {bar.interval!r} is {width} ns"
        )
    return None


def split_bars(bars: Iterable[Bar]) -> tuple[list[Bar], list[tuple[int, Bar, str]]]:
    """The bars that may be stored, and `(index, bar, reason)` for each that may not."""
    good: list[Bar] = []
    bad: list[tuple[int, Bar, str]] = []
    for index, bar in enumerate(bars):
        problem = bar_violation(bar)
        if problem is None:
            good.append(bar)
        else:
            bad.append((index, bar, f"invalid bar: {problem}"))
    return good, bad
