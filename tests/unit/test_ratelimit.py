"""Rate limits: bucket, sliding window, min interval, cooldown, budget, blocks, and their bounds."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mdp.services.provider.ratelimit import (
    Block,
    BlockGrant,
    BlockSizer,
    Budget,
    Cooldown,
    Grant,
    MinInterval,
    PacingConfig,
    SlidingWindowLimit,
    TokenBucket,
)
from mdp.shared.contract.records import RateRecord

S = 1_000_000_000
MS = 1_000_000


def test_bucket_starts_full_and_refills_continuously() -> None:
    b = TokenBucket(50, 10)
    assert b.try_take(10, 0)
    assert not b.try_take(1, 0)
    assert b.wait_ns(1, 0) == 20 * MS
    assert not b.try_take(1, 20 * MS - 1)
    assert b.try_take(1, 20 * MS)
    assert b.available(10 * S) == 10  # capped at the burst


def test_bucket_wait_rounds_up_and_rejects_more_than_burst() -> None:
    b = TokenBucket(3, 1)
    b.try_take(1, 0)
    assert b.wait_ns(1, 0) == 333_333_334
    with pytest.raises(ValueError, match="exceed the burst"):
        b.wait_ns(2, 0)
    with pytest.raises(ValueError):
        TokenBucket(0, 1)
    with pytest.raises(ValueError):
        TokenBucket(1, 0)


def test_sliding_window_is_exact() -> None:
    w = SlidingWindowLimit(2, 10 * S)
    assert w.try_take(1, 0)
    assert w.try_take(1, 5 * S)
    assert not w.try_take(1, 9 * S)
    assert w.wait_ns(1, 9 * S) == 1 * S
    assert w.try_take(1, 10 * S)  # the grant at 0 has left the window
    assert not w.try_take(1, 14 * S)
    assert w.wait_ns(2, 14 * S) == 6 * S


def test_min_interval_per_key() -> None:
    m = MinInterval(15 * S)
    assert m.wait_ns("AAPL:1d", 0) == 0
    m.commit("AAPL:1d", 0)
    assert m.wait_ns("AAPL:1d", 14 * S) == 1 * S
    assert m.wait_ns("MSFT:1d", 14 * S) == 0
    assert m.wait_ns("AAPL:1d", 15 * S) == 0


def test_cooldown_only_extends() -> None:
    c = Cooldown()
    assert c.wait_ns(0) == 0
    c.trip(10)
    c.trip(5)
    assert c.wait_ns(3) == 7
    assert c.wait_ns(10) == 0


def test_pacing_defaults_are_ib_and_validated() -> None:
    cfg = PacingConfig()
    assert (cfg.messages_per_s, cfg.historical_requests, cfg.historical_window_s) == (40, 60, 600)
    assert (cfg.identical_interval_s, cfg.per_contract_requests, cfg.per_contract_window_s) == (
        15,
        6,
        2,
    )
    with pytest.raises(ValueError, match="message_burst"):
        PacingConfig(message_burst=0)


def test_budget_combines_limits_and_refusal_consumes_nothing() -> None:
    b = Budget(PacingConfig(message_burst=100))
    assert b.acquire(1, 0, key="req", historical=True) == Grant(True, 0)
    refused = b.acquire(1, 1, key="req", historical=True)
    assert refused == Grant(False, 15 * S - 1)
    assert b.historical.wait_ns(60 - 1, 1) == 0  # the refused request was not counted
    for i in range(6):
        assert b.acquire(1, 2 + i, contract="ES").granted
    assert b.acquire(1, 10, contract="ES") == Grant(False, 2 * S + 2 - 10)
    assert b.acquire(1, 10, contract="NQ").granted


def test_budget_historical_window() -> None:
    b = Budget(PacingConfig(message_burst=100, messages_per_s=1000))
    for i in range(60):
        assert b.acquire(1, i, historical=True).granted
    g = b.acquire(1, 60, historical=True)
    assert not g.granted and g.retry_after_ns == 600 * S - 60


def test_budget_cooldown_blocks_everything() -> None:
    b = Budget()
    b.pacing_error(0, 5 * S)
    assert b.acquire(1, 1 * S) == Grant(False, 4 * S)
    assert b.grant_block(5, 1 * S) == 0
    assert b.acquire(1, 5 * S).granted


def test_grant_block_grants_what_is_there() -> None:
    b = Budget(PacingConfig(messages_per_s=50, message_burst=10))
    assert b.grant_block(4, 0) == 4
    assert b.grant_block(100, 0) == 6
    assert b.grant_block(1, 0) == 0
    assert b.grant_block(100, 100 * MS) == 5


def test_blocks_expire_and_are_accounted() -> None:
    b = Budget(PacingConfig(messages_per_s=50, message_burst=10))
    assert b.lease_block(3, 0) == Block(3, 1 * S)
    assert b.lease_block(2, 10) == Block(2, 1 * S + 10)
    assert b.outstanding(0) == 5
    assert b.outstanding(1 * S) == 2
    assert b.outstanding(2 * S) == 0
    assert b.lease_block(0, 2 * S) is None


def _max_in_window(grants: list[tuple[int, int]], length: int, closed: bool) -> int:
    """The most tokens granted in any window of `length` (closed or half-open) over `grants`."""
    best = 0
    for start, _ in grants:
        total = sum(
            n
            for t, n in grants
            if start <= t and (t <= start + length if closed else t < start + length)
        )
        best = max(best, total)
    return best


# Mostly busy, sometimes idle for seconds (so an uncapped bucket would show), large requests.
_gaps = st.lists(
    st.tuples(st.one_of(st.integers(0, 200 * MS), st.integers(1 * S, 5 * S)), st.integers(1, 100)),
    min_size=1,
    max_size=120,
)
# Small integer times make exact window boundaries (t + W - 1, t + W) likely.
_small_gaps = st.lists(st.tuples(st.integers(0, 25), st.integers(1, 10)), min_size=1, max_size=80)


@settings(max_examples=200, deadline=None)
@given(steps=_gaps, burst=st.integers(1, 30))
def test_property_bucket_any_1s_window_at_most_rate_plus_burst(
    steps: list[tuple[int, int]], burst: int
) -> None:
    bucket = TokenBucket(50, burst)
    now, grants = 0, []
    for gap, n in steps:
        now += gap
        got = bucket.take_up_to(n, now)
        if got:
            grants.append((now, got))
    assert _max_in_window(grants, 1 * S, closed=True) <= 50 + burst


@settings(max_examples=200, deadline=None)
@given(steps=_small_gaps, m=st.integers(1, 10), window=st.integers(1, 20))
def test_property_sliding_window_never_exceeds_max(
    steps: list[tuple[int, int]], m: int, window: int
) -> None:
    limit = SlidingWindowLimit(m, window)
    now, grants = 0, []
    for gap, n in steps:
        now += gap
        n = min(n, m)
        if limit.try_take(n, now):
            grants.append((now, n))
        else:
            assert limit.wait_ns(n, now) > 0
    assert _max_in_window(grants, window, closed=False) <= m


@settings(max_examples=200, deadline=None)
@given(times=st.lists(st.integers(0, 10 * S), max_size=50), until=st.integers(0, 10 * S))
def test_property_cooldown_grants_nothing_before_its_end(times: list[int], until: int) -> None:
    b = Budget(PacingConfig(message_burst=1000, messages_per_s=1_000_000))
    b.pacing_error(0, until)
    for t in sorted(times):
        if t < until:
            assert not b.acquire(1, t).granted
            assert b.grant_block(1, t) == 0


@settings(max_examples=200, deadline=None)
@given(
    draws=st.lists(
        st.tuples(st.integers(0, 100 * MS), st.integers(0, 1), st.integers(1, 15)),
        min_size=1,
        max_size=150,
    ),
    burst=st.integers(1, 20),
)
def test_property_two_processes_drawing_blocks_stay_within_budget(
    draws: list[tuple[int, int, int]], burst: int
) -> None:
    ttl = 1 * S
    budget = Budget(PacingConfig(message_burst=burst, block_ttl_s=1))
    now = 0
    granted: list[tuple[int, int]] = []  # by grant time, both processes together
    spent: list[tuple[int, int]] = []  # by spend time: each spends its block just before expiry
    per_process = {0: 0, 1: 0}
    for gap, process, requested in draws:
        now += gap
        block = budget.lease_block(requested, now)
        if block is not None:
            per_process[process] += block.tokens
            granted.append((now, block.tokens))
            spent.append((block.expires_ns - 1, block.tokens))
    assert sum(per_process.values()) == sum(n for _, n in granted)
    assert _max_in_window(granted, 1 * S, closed=True) <= 50 + burst
    # spending late widens the window by the ttl: B + r * (T + ttl)
    assert _max_in_window(sorted(spent), 1 * S, closed=True) <= burst + 50 * (1 * S + ttl) // S


# -- the shared record: snapshot and restore ----------------------------------------------------


def through_json(budget: Budget, now_ns: int, config: PacingConfig | None = None) -> Budget:
    """The budget as another process sees it: to the KV record's bytes and back."""
    wire = msgspec.json.encode(budget.to_record("ibkr", now_ns))
    record = msgspec.json.decode(wire, type=RateRecord)
    return Budget.from_record(config or budget.config, record)


def test_record_holds_the_exact_level_and_prunes_what_left_its_window() -> None:
    b = Budget(PacingConfig(messages_per_s=3, message_burst=2))
    assert b.acquire(1, 0, key="AAPL:1d", contract="AAPL", historical=True).granted
    assert b.acquire(1, 1 * S, key="MSFT:1d", contract="MSFT").granted
    b.pacing_error(1 * S, 30 * S)
    record = b.to_record("ibkr", 3 * S + 1)
    # 2 - 1 - 1 + 3/s * (3 s + 1 ns) exactly, capped at the burst: 2
    assert (record.level_num, record.level_den, record.stamp_ns) == (2, 1, 3 * S + 1)
    assert record.cooldown_until_ns == 31 * S
    assert record.historical == [(0, 1)]
    assert record.identical == {"AAPL:1d": 0, "MSFT:1d": 1 * S}
    assert record.per_contract == {}  # both contracts' 2 s windows have passed
    later = b.to_record("ibkr", 16 * S)
    assert later.identical == {}  # both identical intervals (15 s) have passed
    assert b.to_record("ibkr", 40 * S).cooldown_until_ns == 0
    # A fractional level survives as numerator/denominator.
    c = Budget(PacingConfig(messages_per_s=3, message_burst=2))
    c.grant_block(2, 0)
    r = c.to_record("ibkr", 100 * MS)
    assert (r.level_num, r.level_den) == (3, 10)


def test_restore_under_another_config_keeps_what_applies() -> None:
    b = Budget(PacingConfig(message_burst=10))
    b.grant_block(2, 0)
    smaller = through_json(b, 0, PacingConfig(message_burst=4))
    assert smaller.messages.available(0) == 4  # capped at the new burst, never above
    with pytest.raises(ValueError, match="denominator"):
        Budget.from_record(PacingConfig(), RateRecord("ibkr", 1, 0, 0))
    with pytest.raises(ValueError, match="negative"):
        Budget.from_record(PacingConfig(), RateRecord("ibkr", -1, 1, 0))


def test_take_block_is_all_or_nothing_and_hints_when_it_will_be_there() -> None:
    b = Budget(PacingConfig(messages_per_s=10, message_burst=4))  # 100 ms a token
    assert b.take_block(3, 0) == BlockGrant(3, 0)
    assert b.take_block(2, 0) == BlockGrant(0, 100 * MS)  # one there: nothing taken
    assert b.take_block(1, 0) == BlockGrant(1, 0)
    assert b.take_block(3, 0) == BlockGrant(0, 300 * MS)
    assert b.take_block(4, 400 * MS) == BlockGrant(4, 0)
    b.pacing_error(400 * MS, 1 * S)
    assert b.take_block(1, 1 * S) == BlockGrant(0, 400 * MS)  # tokens there, cooling down
    assert b.take_block(1, 1400 * MS) == BlockGrant(1, 0)
    with pytest.raises(ValueError, match="burst"):
        b.take_block(5, 10 * S)
    with pytest.raises(ValueError, match="burst"):
        b.take_block(0, 10 * S)


def test_block_sizer_follows_demand() -> None:
    sizer = BlockSizer(5)
    assert sizer.want == 1
    for expected in (2, 4, 5, 5):
        sizer.exhausted()
        assert sizer.want == expected
    sizer.expired(used=2)
    assert sizer.want == 2
    sizer.expired(used=0)
    assert sizer.want == 1
    assert PacingConfig(message_burst=10).max_block == 5
    assert PacingConfig(message_burst=1).max_block == 1


_ops = st.lists(
    st.tuples(
        st.integers(0, 300 * MS),  # time step
        st.sampled_from(["acquire", "block", "request", "error"]),
        st.integers(1, 4),  # tokens
        st.sampled_from(["A", "B", "C"]),  # key / contract
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(ops=_ops)
def test_property_a_budget_restored_from_its_record_behaves_as_if_never_stored(
    ops: list[tuple[int, str, int, str]],
) -> None:
    # Every process restores the budget from the record before each grant and stores it after:
    # that must give exactly the answers of one budget kept in memory throughout.
    cfg = PacingConfig(
        messages_per_s=7,
        message_burst=4,
        historical_requests=3,
        historical_window_s=1,
        identical_interval_s=0.5,
        per_contract_requests=2,
        per_contract_window_s=0.4,
    )
    memory = Budget(cfg)
    stored = memory.to_record("p", 0)
    now = 0
    for gap, op, n, name in ops:
        now += gap
        shared = Budget.from_record(
            cfg, msgspec.json.decode(msgspec.json.encode(stored), type=RateRecord)
        )
        answers = []
        for budget in (memory, shared):
            if op == "acquire":
                answers.append(budget.acquire(n, now))
            elif op == "block":
                answers.append(budget.take_block(n, now))
            elif op == "request":
                answers.append(budget.acquire(1, now, key=name, contract=name, historical=True))
            else:
                budget.pacing_error(now, n * 100 * MS)
                answers.append(None)
        assert answers[0] == answers[1], (op, now)
        stored = shared.to_record("p", now)
        assert stored == memory.to_record("p", now)
