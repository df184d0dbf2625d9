"""The hybrid batcher: cuts by rows, bytes and age; deterministic batch ids."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mdp.services.aggregator.batcher import BarBatcher, batch_id
from mdp.shared.contract.messages import Bar, BarBatch

MS = 1_000_000
NOW = 1_000_000 * MS


def bar(i: int, rev: int = 0, symbol: str = "AAPL") -> Bar:
    start = 1_700_000_000_000_000_000 + i * 1_000_000_000
    return Bar(
        symbol=symbol,
        interval="1s",
        start=start,
        end=start + 1_000_000_000,
        open=1.0,
        high=2.0,
        low=0.5,
        close=1.5,
        volume=10.0,
        trade_count=3,
        vwap=1.2,
        provider="test",
        rev=rev,
    )


def starts(batches: list[BarBatch]) -> list[list[int]]:
    return [[(b.start // 1_000_000_000) % 1000 for b in batch.bars] for batch in batches]


def test_cut_by_rows() -> None:
    batcher = BarBatcher(max_rows=3, max_bytes=10**9, max_delay_ns=10**12)
    assert batcher.add(bar(0), 100, NOW) == []
    assert batcher.add(bar(1), 100, NOW) == []
    assert batcher.pending_rows == 2
    assert batcher.pending_bytes == 200
    (full,) = batcher.add(bar(2), 100, NOW)
    assert [b.start for b in full.bars] == [bar(i).start for i in range(3)]
    assert full.batch_id == batch_id(full.bars)
    assert batcher.pending_rows == 0
    assert batcher.pending_bytes == 0
    assert batcher.next_deadline_ns is None
    assert batcher.flush() == []


def test_cut_by_bytes_before_the_bar_that_would_overflow() -> None:
    batcher = BarBatcher(max_rows=100, max_bytes=1000, max_delay_ns=10**12)
    assert batcher.add(bar(0), 400, NOW) == []
    assert batcher.add(bar(1), 400, NOW) == []
    # 1200 > 1000: the pending 800 bytes go out, the new bar starts the next batch
    out = batcher.add(bar(2), 400, NOW)
    assert starts(out) == [[0, 1]]
    assert (batcher.pending_rows, batcher.pending_bytes) == (1, 400)
    # exactly max_bytes is full
    out = batcher.add(bar(3), 600, NOW)
    assert starts(out) == [[2, 3]]
    assert batcher.pending_rows == 0


def test_a_bar_bigger_than_max_bytes_goes_out_alone() -> None:
    batcher = BarBatcher(max_rows=100, max_bytes=1000, max_delay_ns=10**12)
    batcher.add(bar(0), 10, NOW)
    out = batcher.add(bar(1), 5000, NOW)
    assert starts(out) == [[0], [1]]
    assert batcher.pending_rows == 0
    assert starts(batcher.add(bar(2), 5000, NOW)) == [[2]]


def test_due_after_max_delay_of_the_oldest_bar() -> None:
    batcher = BarBatcher(max_rows=100, max_bytes=10**9, max_delay_ns=200 * MS)
    assert batcher.due(NOW) == []  # nothing pending
    batcher.add(bar(0), 10, NOW)
    batcher.add(bar(1), 10, NOW + 150 * MS)  # a younger bar does not reset the clock
    assert batcher.next_deadline_ns == NOW + 200 * MS
    assert batcher.due(NOW + 199 * MS) == []
    out = batcher.due(NOW + 200 * MS)
    assert starts(out) == [[0, 1]]
    assert batcher.next_deadline_ns is None
    assert batcher.due(NOW + 10**12) == []
    # the next batch's clock starts with its own first bar
    batcher.add(bar(2), 10, NOW + 300 * MS)
    assert batcher.next_deadline_ns == NOW + 500 * MS


def test_flush_returns_whatever_is_pending() -> None:
    batcher = BarBatcher(max_rows=100, max_bytes=10**9, max_delay_ns=10**12)
    batcher.add(bar(0), 10, NOW)
    batcher.add(bar(1, rev=1), 10, NOW)
    (batch,) = batcher.flush()
    assert [b.bar_id for b in batch.bars] == [bar(0).bar_id, bar(1, rev=1).bar_id]
    assert batcher.flush() == []


def test_batch_id_is_deterministic_and_content_addressed() -> None:
    bars = [bar(0), bar(1), bar(2, rev=3)]
    ident = batch_id(bars)
    assert re.fullmatch(r"[0-9a-f]{16}", ident)
    assert batch_id([bar(0), bar(1), bar(2, rev=3)]) == ident
    assert batch_id([bar(1), bar(0), bar(2, rev=3)]) != ident  # order matters
    assert batch_id([bar(0), bar(1), bar(2, rev=4)]) != ident  # a revision is other content
    assert batch_id([bar(0), bar(1)]) != ident
    assert batch_id([bar(0, symbol="A"), bar(0, symbol="B")]) != batch_id([bar(0, symbol="AB")])
    # identical bars at other times and through other cuts give the same batch
    a = BarBatcher(max_rows=3, max_bytes=10**9, max_delay_ns=1)
    b = BarBatcher(max_rows=3, max_bytes=10**9, max_delay_ns=1)
    out_a = [x for i in range(3) for x in a.add(bars[i], 10, NOW + i)]
    out_b = [x for i in range(3) for x in b.add(bars[i], 99, 7 + i)]
    assert out_a == out_b == [BarBatch(batch_id=ident, bars=bars)]


def test_invalid_limits_are_refused() -> None:
    with pytest.raises(ValueError):
        BarBatcher(max_rows=0, max_bytes=1, max_delay_ns=1)
    with pytest.raises(ValueError):
        BarBatcher(max_rows=1, max_bytes=0, max_delay_ns=1)


@settings(max_examples=200, deadline=None)
@given(
    max_rows=st.integers(1, 6),
    max_bytes=st.integers(1, 500),
    max_delay=st.integers(0, 50),
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("add"), st.integers(1, 300), st.integers(0, 30)),
            st.tuples(st.just("due"), st.just(0), st.integers(0, 30)),
        ),
        max_size=40,
    ),
)
def test_every_bar_goes_out_once_in_order_within_limits(
    max_rows: int, max_bytes: int, max_delay: int, ops: list[tuple[str, int, int]]
) -> None:
    batcher = BarBatcher(max_rows=max_rows, max_bytes=max_bytes, max_delay_ns=max_delay)
    sizes: dict[str, int] = {}
    added: list[Bar] = []
    batches: list[BarBatch] = []
    now = 0
    for op, size, dt in ops:
        now += dt
        if op == "add":
            item = bar(len(added))
            sizes[item.bar_id] = size
            added.append(item)
            batches += batcher.add(item, size, now)
        else:
            deadline = batcher.next_deadline_ns
            out = batcher.due(now)
            assert bool(out) == (deadline is not None and now >= deadline)
            batches += out
        assert batcher.pending_rows < max_rows
        assert batcher.pending_rows == 0 or batcher.pending_bytes < max_bytes
    batches += batcher.flush()
    assert [b for batch in batches for b in batch.bars] == added
    for batch in batches:
        assert batch.bars
        assert len(batch.bars) <= max_rows
        total = sum(sizes[b.bar_id] for b in batch.bars)
        assert total <= max_bytes or len(batch.bars) == 1
        assert batch.batch_id == batch_id(batch.bars)
