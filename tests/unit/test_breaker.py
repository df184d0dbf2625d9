"""Circuit breaker: every transition, the sliding window, probes, reset, records, properties."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mdp.shared.breaker import (
    BreakerConfig,
    CircuitBreaker,
    Transition,
    failure_kind,
    same_state,
)
from mdp.shared.contract.records import CircuitRecord

S = 1_000_000_000
CFG = BreakerConfig(failure_threshold=3, window_s=10, recovery_s=5)


def _open(b: CircuitBreaker, at: int = 0) -> None:
    for i in range(3):
        b.record_failure("connection", at + i)


def test_config_defaults_and_validation() -> None:
    cfg = BreakerConfig()
    assert (cfg.failure_threshold, cfg.window_ns, cfg.recovery_ns) == (3, 60 * S, 15 * S)
    assert cfg.half_open_max_probes == 1
    for bad in (
        {"failure_threshold": 0},
        {"window_s": 0},
        {"recovery_s": -1},
        {"half_open_max_probes": 0},
    ):
        with pytest.raises(ValueError, match="must be positive"):
            BreakerConfig(**bad)
    with pytest.raises(ValueError, match="integer"):
        BreakerConfig(failure_threshold=1.5)  # type: ignore[arg-type]


def test_closed_to_open_at_threshold() -> None:
    b = CircuitBreaker("ibkr", CFG)
    assert b.record_failure("connection", 0) is None
    assert b.record_failure("pacing", 1 * S) is None
    t = b.record_failure("data_stopped", 2 * S)
    assert t == Transition("ibkr", "closed", "open", "failure_threshold", 2 * S)
    assert b.state(2 * S) == "open"
    assert not b.allow(2 * S)


def test_failures_older_than_the_window_do_not_count() -> None:
    b = CircuitBreaker("ibkr", CFG)
    b.record_failure("connection", 0)
    b.record_failure("adapter_exception", 5 * S)
    # the first failure is exactly window old: outside (now - window, now]
    assert b.record_failure("connection", 10 * S) is None
    assert b.failures_in_window(10 * S) == 2
    assert b.state(10 * S) == "closed"
    assert b.record_failure("connection", 11 * S) is not None


def test_open_to_half_open_after_recovery() -> None:
    b = CircuitBreaker("ibkr", CFG)
    _open(b)
    b.take_transitions()
    assert b.state(2 + 5 * S - 1) == "open"
    assert b.state(2 + 5 * S) == "half_open"
    assert b.take_transitions() == [
        Transition("ibkr", "open", "half_open", "recovery_elapsed", 2 + 5 * S)
    ]


def test_half_open_grants_one_probe_at_a_time() -> None:
    b = CircuitBreaker("ibkr", CFG)
    _open(b)
    now = 10 * S
    assert b.allow(now)
    assert not b.allow(now)
    assert not b.allow(now + 1)


def test_a_lost_probe_frees_its_slot_after_recovery() -> None:
    b = CircuitBreaker("ibkr", CFG)
    _open(b)
    assert b.allow(10 * S)
    assert not b.allow(15 * S - 1)
    assert b.allow(15 * S)  # no outcome for recovery_ns: presumed lost (its caller crashed)


def test_more_probes_when_configured() -> None:
    b = CircuitBreaker(
        "ibkr", BreakerConfig(failure_threshold=1, recovery_s=1, half_open_max_probes=2)
    )
    b.record_failure("connection", 0)
    assert [b.allow(S), b.allow(S), b.allow(S)] == [True, True, False]


def test_probe_success_closes_and_clears_failures() -> None:
    b = CircuitBreaker("ibkr", CFG)
    _open(b)
    assert b.allow(10 * S)
    t = b.record_success(10 * S)
    assert t == Transition("ibkr", "half_open", "closed", "probe_succeeded", 10 * S)
    assert b.failures_in_window(10 * S) == 0
    assert b.allow(10 * S)
    assert b.record_failure("connection", 10 * S + 1) is None  # count starts afresh


def test_probe_failure_reopens_and_restarts_recovery() -> None:
    b = CircuitBreaker("ibkr", CFG)
    _open(b)
    assert b.allow(10 * S)
    t = b.record_failure("adapter_exception", 11 * S)
    assert t == Transition("ibkr", "half_open", "open", "probe_failed", 11 * S)
    assert b.state(15 * S) == "open"  # 5 s after the first opening, but only 4 after the reopening
    assert b.state(16 * S) == "half_open"


def test_failure_while_open_is_ignored() -> None:
    b = CircuitBreaker("ibkr", CFG)
    _open(b)
    assert b.record_failure("connection", 4 * S) is None
    assert b.state(5 * S + 2) == "half_open"  # the timer was not extended


def test_success_while_closed_or_open_changes_nothing() -> None:
    b = CircuitBreaker("ibkr", CFG)
    assert b.record_success(0) is None
    _open(b, 1)
    assert b.record_success(2 * S) is None
    assert b.state(2 * S) == "open"


def test_manual_reset_from_open_and_half_open() -> None:
    b = CircuitBreaker("ibkr", CFG)
    _open(b)
    assert b.reset(1 * S) == Transition("ibkr", "open", "closed", "manual_reset", 1 * S)
    assert b.allow(1 * S)
    _open(b, 2 * S)
    assert b.state(10 * S) == "half_open"
    assert b.reset(10 * S) == Transition("ibkr", "half_open", "closed", "manual_reset", 10 * S)
    assert b.reset(11 * S) is None


def test_take_transitions_drains_in_order() -> None:
    b = CircuitBreaker("ibkr", CFG)
    _open(b)
    b.allow(10 * S)
    b.record_success(10 * S)
    assert [(t.from_state, t.to_state) for t in b.take_transitions()] == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ]
    assert b.take_transitions() == []


def test_record_round_trip_through_json() -> None:
    b = CircuitBreaker("ibkr", CFG)
    b.record_failure("connection", 1)
    b.record_failure("connection", 2)
    record = b.snapshot(7)
    assert record == CircuitRecord("ibkr", "closed", [1, 2], None, [], 7)
    raw = msgspec.json.encode(record)
    restored = CircuitBreaker.restore(msgspec.json.decode(raw, type=CircuitRecord), CFG)
    assert restored.snapshot(7) == record
    assert restored.record_failure("pacing", 3) is not None  # the two failures carried over

    _open(b, 10 * S)
    b.allow(20 * S)
    restored = CircuitBreaker.restore(b.snapshot(20 * S), CFG)
    assert restored.state(20 * S) == "half_open"
    assert not restored.allow(20 * S)  # the probe in flight carried over


def test_an_open_record_past_its_recovery_reads_half_open() -> None:
    b = CircuitBreaker("ibkr", CFG)
    _open(b, 1 * S)
    record = b.snapshot(1 * S + 2)
    assert record.state == "open" and record.opened_at_ns == 1 * S + 2
    reader = CircuitBreaker.restore(record, CFG)
    assert reader.state(6 * S + 1) == "open"  # 1 ns before its recovery has elapsed
    assert reader.state(6 * S + 2) == "half_open"
    assert reader.take_transitions() == [
        Transition("ibkr", "open", "half_open", "recovery_elapsed", 6 * S + 2)
    ]
    # Reading is not writing: the record itself still says open until someone stores a change.
    assert record.state == "open"
    # A longer recovery in the current policy applies to a stored record.
    longer = CircuitBreaker.restore(record, BreakerConfig(failure_threshold=3, recovery_s=30))
    assert longer.state(6 * S + 2) == "open"


def test_same_state_ignores_only_the_timestamp() -> None:
    a = CircuitRecord("ibkr", "open", [1, 2, 3], 3, [], 10)
    assert same_state(a, CircuitRecord("ibkr", "open", [1, 2, 3], 3, [], 99))
    assert not same_state(a, CircuitRecord("ibkr", "open", [1, 2, 3], 4, [], 10))
    assert not same_state(a, CircuitRecord("ibkr", "half_open", [1, 2, 3], 3, [5], 10))
    assert not same_state(a, CircuitRecord("ibkr", "open", [2, 3], 3, [], 10))


def test_next_allowed_is_the_half_open_time_or_the_lost_probe_time() -> None:
    b = CircuitBreaker("ibkr", CFG)
    assert b.next_allowed_ns(4) == 4  # closed: now
    _open(b)  # opened at 2
    assert b.opened_at_ns == 2
    assert b.next_allowed_ns(1 * S) == 2 + 5 * S
    assert not b.allow(1 * S)
    assert b.next_allowed_ns(10 * S) == 10 * S  # half open now, a probe slot free
    assert b.allow(10 * S)
    assert b.next_allowed_ns(11 * S) == 15 * S  # the probe in flight is presumed lost then
    assert b.allow(15 * S)
    b.record_success(15 * S)
    assert b.next_allowed_ns(15 * S) == 15 * S and b.opened_at_ns is None


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (ConnectionRefusedError(), "connection"),
        (ConnectionResetError(), "connection"),
        (TimeoutError(), "connection"),
        (OSError("no route"), "connection"),
        (RuntimeError("feed dropped"), "adapter_exception"),
        (ValueError("bad row"), "adapter_exception"),
    ],
)
def test_failure_kind(exc: BaseException, kind: str) -> None:
    assert failure_kind(exc) == kind


_events = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=4 * S),
        st.sampled_from(["failure", "success", "allow", "reset", "state"]),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(
    steps=_events,
    threshold=st.integers(min_value=1, max_value=5),
    window_s=st.integers(min_value=1, max_value=8),
    recovery_s=st.integers(min_value=1, max_value=8),
)
def test_property_opens_only_at_threshold_and_never_allows_while_open(
    steps: list[tuple[int, str]], threshold: int, window_s: int, recovery_s: int
) -> None:
    cfg = BreakerConfig(failure_threshold=threshold, window_s=window_s, recovery_s=recovery_s)
    b = CircuitBreaker("p", cfg)
    now = 0
    failures: list[int] = []  # reference model: every failure recorded while closed
    for gap, action in steps:
        now += gap
        before = b.state(now)
        if action == "failure":
            if before == "closed":
                failures.append(now)
            t = b.record_failure("connection", now)
            if t is not None and t.reason == "failure_threshold":
                inside = [f for f in failures if now - cfg.window_ns < f <= now]
                assert len(inside) >= threshold
        elif action == "allow":
            granted = b.allow(now)
            if before == "open":
                assert not granted
        elif action == "success":
            b.record_success(now)
        elif action == "reset":
            b.reset(now)
        else:
            b.state(now)
        if b.state(now) == "closed" and before != "closed":
            failures.clear()  # closing clears the count
        if b.state(now) == "open":
            assert not b.allow(now)
