"""The provider's per-symbol tick batcher: full batches at once, partial ones after max_delay."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mdp.services.provider.batching import TickBatcher
from mdp.shared.contract.messages import Tick
from mdp.shared.settings import ProviderSettings

MS = 1_000_000


def ticks(first: int, count: int) -> list[Tick]:
    """`count` ticks numbered from `first` (seq identifies each tick)."""
    return [Tick(1 + seq, 1 + seq, seq, 100.0, 1.0) for seq in range(first, first + count)]


def seqs(batch: list[Tick]) -> list[int]:
    return [tick.seq for tick in batch]


def test_a_small_add_is_buffered_with_a_deadline() -> None:
    batcher = TickBatcher(max_ticks=10, max_delay_ns=50 * MS)
    assert batcher.next_deadline_ns is None
    assert batcher.add("A", ticks(1, 3), now_ns=1_000) == []
    assert batcher.pending == len(batcher) == 3
    assert batcher.next_deadline_ns == 1_000 + 50 * MS
    assert batcher.add("A", [], now_ns=2_000) == []
    assert batcher.pending == 3


def test_full_batches_are_returned_at_once_and_the_rest_waits() -> None:
    batcher = TickBatcher(max_ticks=4, max_delay_ns=50 * MS)
    assert batcher.add("A", ticks(1, 3), now_ns=0) == []
    out = batcher.add("A", ticks(4, 11), now_ns=10 * MS)  # 3 + 11 = 14: three full, two left
    assert [(sym, seqs(batch)) for sym, batch in out] == [
        ("A", [1, 2, 3, 4]),
        ("A", [5, 6, 7, 8]),
        ("A", [9, 10, 11, 12]),
    ]
    assert batcher.pending == 2
    # The two left over arrived with the second add: their wait starts then, not at 0.
    assert batcher.next_deadline_ns == 60 * MS
    assert batcher.due(59 * MS) == []
    assert [(sym, seqs(batch)) for sym, batch in batcher.due(60 * MS)] == [("A", [13, 14])]
    assert batcher.pending == 0
    assert batcher.next_deadline_ns is None


def test_filling_a_buffer_exactly_keeps_nothing() -> None:
    batcher = TickBatcher(max_ticks=5, max_delay_ns=MS)
    batcher.add("A", ticks(1, 2), now_ns=0)
    out = batcher.add("A", ticks(3, 3), now_ns=1)
    assert [seqs(batch) for _, batch in out] == [[1, 2, 3, 4, 5]]
    assert batcher.pending == 0
    assert batcher.next_deadline_ns is None
    assert batcher.flush() == []


def test_a_huge_input_is_split_into_full_batches() -> None:
    batcher = TickBatcher(max_ticks=1000, max_delay_ns=MS)
    out = batcher.add("A", ticks(1, 10_500), now_ns=0)
    assert [len(batch) for _, batch in out] == [1000] * 10
    assert [seqs(batch)[0] for _, batch in out] == list(range(1, 10_001, 1000))
    assert seqs(batcher.flush()[0][1]) == list(range(10_001, 10_501))


def test_a_partial_wait_is_not_restarted_by_later_adds() -> None:
    batcher = TickBatcher(max_ticks=100, max_delay_ns=50 * MS)
    batcher.add("A", ticks(1, 1), now_ns=0)
    batcher.add("A", ticks(2, 1), now_ns=40 * MS)
    assert batcher.next_deadline_ns == 50 * MS
    assert [seqs(batch) for _, batch in batcher.due(50 * MS)] == [[1, 2]]


def test_due_returns_oldest_first_and_only_what_waited_long_enough() -> None:
    batcher = TickBatcher(max_ticks=100, max_delay_ns=50 * MS)
    batcher.add("B", ticks(1, 1), now_ns=0)
    batcher.add("A", ticks(1, 2), now_ns=10 * MS)
    batcher.add("C", ticks(1, 3), now_ns=30 * MS)
    assert batcher.next_deadline_ns == 50 * MS
    assert [sym for sym, _ in batcher.due(60 * MS)] == ["B", "A"]
    assert batcher.next_deadline_ns == 80 * MS
    assert batcher.pending == 3
    assert [(sym, len(batch)) for sym, batch in batcher.flush()] == [("C", 3)]


def test_a_symbol_refilled_after_a_full_batch_moves_to_the_back() -> None:
    batcher = TickBatcher(max_ticks=3, max_delay_ns=50 * MS)
    batcher.add("A", ticks(1, 1), now_ns=0)
    batcher.add("B", ticks(1, 1), now_ns=10 * MS)
    batcher.add("A", ticks(2, 3), now_ns=20 * MS)  # A: [1,2,3] out, [4] waits from 20 ms
    assert batcher.next_deadline_ns == 60 * MS  # B is now the oldest
    assert [sym for sym, _ in batcher.due(70 * MS)] == ["B", "A"]


def test_pop_takes_one_symbol() -> None:
    batcher = TickBatcher(max_ticks=10, max_delay_ns=MS)
    batcher.add("A", ticks(1, 2), now_ns=0)
    batcher.add("B", ticks(1, 3), now_ns=0)
    assert seqs(batcher.pop("A")) == [1, 2]
    assert batcher.pop("A") == []
    assert batcher.pop("Z") == []
    assert batcher.pending == 3
    assert [sym for sym, _ in batcher.flush()] == ["B"]


def test_outputs_do_not_alias_the_input_list() -> None:
    batcher = TickBatcher(max_ticks=2, max_delay_ns=MS)
    data = ticks(1, 3)
    out = batcher.add("A", data, now_ns=0)
    data.clear()
    assert seqs(out[0][1]) == [1, 2]
    assert seqs(batcher.flush()[0][1]) == [3]


def test_from_settings_and_argument_checks() -> None:
    batcher = TickBatcher.from_settings(
        ProviderSettings(batch_max_ticks=7, batch_max_delay_ms=20, max_in_flight=1)
    )
    assert (batcher.max_ticks, batcher.max_delay_ns) == (7, 20 * MS)
    assert batcher.delay_ns == 20 * MS  # nothing waits: nothing to stretch
    with pytest.raises(ValueError, match="max_ticks"):
        TickBatcher(0, MS)
    with pytest.raises(ValueError, match="max_delay_ns"):
        TickBatcher(1, -1)
    with pytest.raises(ValueError, match="messages_per_s"):
        TickBatcher(1, MS, messages_per_s=-1)


def test_a_message_budget_stretches_the_delay_with_the_symbols_waiting() -> None:
    # 100 batches/s for the job: 5 symbols waiting wait 50 ms, 20 wait 200 ms, 40 the cap.
    batcher = TickBatcher(10, 20 * MS, messages_per_s=100, stretch_max_ns=300 * MS)
    batcher.add("S0", ticks(1, 1), now_ns=0)
    assert batcher.delay_ns == 20 * MS  # one symbol: the floor
    for i in range(1, 5):
        batcher.add(f"S{i}", ticks(1, 1), now_ns=0)
    assert batcher.delay_ns == 50 * MS
    assert batcher.next_deadline_ns == 50 * MS
    assert batcher.due(49 * MS) == []
    assert len(batcher.due(50 * MS)) == 5
    for i in range(40):
        batcher.add(f"S{i}", ticks(2, 1), now_ns=60 * MS)
    assert batcher.delay_ns == 300 * MS  # 400 ms stretched, capped
    assert batcher.due(359 * MS) == [] and len(batcher.due(360 * MS)) == 40


def test_the_stretch_never_goes_below_the_floor() -> None:
    batcher = TickBatcher(10, 100 * MS, messages_per_s=1e9, stretch_max_ns=MS)
    batcher.add("A", ticks(1, 1), now_ns=0)
    assert batcher.delay_ns == 100 * MS


# Operations: add `count` ticks of a symbol, or ask for due buffers, or pop a symbol; each after
# `advance` ns of a monotonic clock.
_ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("add"),
            st.sampled_from("ABC"),
            st.integers(0, 25),
            st.integers(0, 30 * MS),
        ),
        st.tuples(st.just("due"), st.just(""), st.just(0), st.integers(0, 60 * MS)),
        st.tuples(st.just("pop"), st.sampled_from("ABC"), st.just(0), st.integers(0, MS)),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(
    ops=_ops,
    max_ticks=st.integers(1, 12),
    delay_ms=st.integers(0, 40),
    budget=st.sampled_from([0, 40, 150]),
)
def test_no_tick_is_lost_duplicated_or_reordered(
    ops: list[tuple[str, str, int, int]], max_ticks: int, delay_ms: int, budget: int
) -> None:
    floor, cap = delay_ms * MS, 60 * MS
    batcher = TickBatcher(max_ticks, floor, messages_per_s=budget, stretch_max_ns=cap)
    sent: dict[str, list[int]] = {sym: [] for sym in "ABC"}
    received: dict[str, list[int]] = {sym: [] for sym in "ABC"}
    # A model of what must be buffered: per symbol the ticks and when the oldest arrived.
    model: dict[str, tuple[list[int], int]] = {}

    def delay_now() -> int:  # the floor, or the symbols waiting over the budget, up to the cap
        if not budget:
            return floor
        return min(max(cap, floor), max(floor, int(len(model) * 1e9 / budget)))

    now = 0
    for op, sym, count, advance in ops:
        now += advance
        if op == "add":
            first = len(sent[sym]) + 1
            data = ticks(first, count)
            sent[sym].extend(seqs(data))
            out = batcher.add(sym, data, now)
            assert all(s == sym and len(batch) == max_ticks for s, batch in out)
            for _, batch in out:
                received[sym].extend(seqs(batch))
            buffered, since = model.get(sym, ([], now))
            buffered = buffered + seqs(data)
            if out:
                since = now  # the old buffer left in a full batch; the rest arrived now
            buffered = buffered[len(out) * max_ticks :]
            if buffered:
                model[sym] = (buffered, since)
            else:
                model.pop(sym, None)
        elif op == "due":
            delay = delay_now()
            for s, batch in batcher.due(now):
                expected, since = model.pop(s)
                assert now - since >= delay
                assert 0 < len(batch) < max_ticks
                assert seqs(batch) == expected
                received[s].extend(seqs(batch))
            assert all(now - since < delay for _, since in model.values())
        else:
            batch = batcher.pop(sym)
            assert seqs(batch) == model.pop(sym, ([], 0))[0]
            received[sym].extend(seqs(batch))
        assert batcher.pending == sum(len(buffered) for buffered, _ in model.values())
        deadline = min((since + delay_now() for _, since in model.values()), default=None)
        assert batcher.next_deadline_ns == deadline
    for sym, batch in batcher.flush():
        assert 0 < len(batch) < max_ticks
        received[sym].extend(seqs(batch))
    assert received == sent
    assert batcher.pending == 0 and batcher.next_deadline_ns is None
