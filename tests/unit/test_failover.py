"""Failover selector: order, strategies, staleness by timer, down/up, failback, handover buffer."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mdp.services.router.failover import Decision, FailoverSelector

S = 1_000_000_000


def _sel(**kw: object) -> FailoverSelector:
    return FailoverSelector(["ibkr", "synthetic"], **kw)  # type: ignore[arg-type]


def _obs(sel: FailoverSelector, provider: str, t: int, sym: str = "AAPL") -> Decision:
    return sel.observe(sym, provider, f"{provider}:{t}", t, t, t, t)


def test_first_source_is_chosen_and_forwarded() -> None:
    sel = _sel()
    d = _obs(sel, "synthetic", 0)
    assert d.forward == ["synthetic:0"]
    assert d.switch is not None and d.switch.reason == "first_source"
    assert d.switch.from_provider is None and d.switch.to_provider == "synthetic"
    assert _obs(sel, "synthetic", 1 * S) == Decision(["synthetic:1000000000"], None)


def test_backup_is_buffered_not_forwarded() -> None:
    sel = _sel()
    _obs(sel, "ibkr", 0)
    assert _obs(sel, "synthetic", 1 * S) == Decision([], None)
    assert sel.chosen("AAPL") == "ibkr"


def test_timer_detects_stale_source_and_hands_over_the_buffer() -> None:
    sel = _sel()
    _obs(sel, "ibkr", 0)
    _obs(sel, "synthetic", 0)  # same event time as ibkr's forwarded batch: never forwarded
    _obs(sel, "synthetic", 1 * S)
    _obs(sel, "synthetic", 2 * S)
    assert sel.tick(3 * S - 1) == []
    [switch] = sel.tick(3 * S)
    assert (switch.from_provider, switch.to_provider, switch.reason) == (
        "ibkr",
        "synthetic",
        "stale",
    )
    assert switch.forward == ("synthetic:1000000000", "synthetic:2000000000")
    assert _obs(sel, "synthetic", 3 * S).forward == ["synthetic:3000000000"]


def test_buffer_is_bounded_by_age_and_count() -> None:
    sel = _sel(buffer_max=2)
    _obs(sel, "ibkr", 0)
    for t in (1, 2, 3):
        _obs(sel, "synthetic", t)
    [switch] = sel.tick(3 * S)
    assert switch.forward == ("synthetic:2", "synthetic:3")  # count bound kept the newest two
    sel = _sel()
    _obs(sel, "ibkr", 0)
    _obs(sel, "synthetic", 1)  # 3 s old at the switch: outside the detection window
    _obs(sel, "synthetic", 2 * S)
    [switch] = sel.tick(3 * S + 1)
    assert switch.forward == ("synthetic:2000000000",)


def test_mark_down_fails_over_at_once_and_mark_up_needs_fresh_health() -> None:
    sel = _sel()
    _obs(sel, "ibkr", 0)
    _obs(sel, "synthetic", 1)
    [switch] = sel.mark_down("ibkr", "circuit_open", 2)
    assert (switch.to_provider, switch.reason, switch.forward) == (
        "synthetic",
        "provider_down",
        ("synthetic:1",),
    )
    assert _obs(sel, "ibkr", 3).forward == []  # deliveries while down are ignored
    sel.mark_up("ibkr")
    assert not sel.healthy("AAPL", "ibkr", 4)
    _obs(sel, "ibkr", 5)
    assert sel.healthy("AAPL", "ibkr", 5)


def test_failback_waits_for_hysteresis_of_continuous_health() -> None:
    sel = _sel(detect_ns=3 * S, hysteresis_ns=10 * S)
    _obs(sel, "synthetic", 0)
    for t in range(1, 25):
        _obs(sel, "synthetic", t * S)
    # ibkr returns at 2 s, pauses for 3 s (a silence that restarts its run), returns at 8 s
    for t in (2, 3, 4):
        _obs(sel, "ibkr", t * S)
    switches = []
    for t in range(8, 19):
        d = _obs(sel, "ibkr", t * S)
        switches += sel.tick(t * S)
        if d.switch is not None:
            switches.append(d.switch)
    [switch] = switches
    assert (switch.reason, switch.to_provider, switch.at_ns) == ("failback", "ibkr", 18 * S)
    assert switch.forward == ()  # ibkr's buffered batches are all covered by synthetic


def test_no_healthy_source_keeps_the_choice_and_it_resumes() -> None:
    sel = _sel()
    _obs(sel, "ibkr", 0)
    assert sel.tick(10 * S) == []
    assert _obs(sel, "ibkr", 11 * S) == Decision(["ibkr:11000000000"], None)


def test_a_batch_id_is_never_forwarded_twice() -> None:
    sel = _sel()
    sel.observe("AAPL", "ibkr", "m1", 0, 0, 0, 0)
    assert sel.observe("AAPL", "ibkr", "m1", 0, 0, 0, 1).forward == []
    assert sel.observe("AAPL", "ibkr", "m2", 0, 0, 0, 2).forward == ["m2"]  # a late tick: its own


def test_order_overrides_and_unlisted_rank_alphabetically() -> None:
    fresh = FailoverSelector(["ibkr"], {"ES": ["replay", "ibkr"]}, hysteresis_ns=0)
    for p in ("zeta", "alpha", "ibkr", "replay"):
        fresh.observe("ES", p, p, 0, 0, 0, 0)
        fresh.observe("AAPL", p, p, 0, 0, 0, 0)
    assert fresh.chosen("ES") == "replay"
    assert fresh.chosen("AAPL") == "ibkr"
    fresh.set_order(["alpha"], {})
    fresh.tick(1)
    assert fresh.chosen("ES") == "alpha" and fresh.chosen("AAPL") == "alpha"
    fresh.mark_down("alpha", "job_failed", 2)
    assert fresh.chosen("AAPL") == "ibkr"  # unlisted now: ibkr before replay before zeta


def test_round_robin_spreads_symbols_deterministically() -> None:
    def chosen() -> dict[str, str | None]:
        sel = FailoverSelector(["a", "b"], strategy="round_robin", hysteresis_ns=0)
        for i in range(40):
            for p in ("a", "b"):
                sel.observe(f"S{i}", p, p, 0, 0, 0, 0)
        return {f"S{i}": sel.chosen(f"S{i}") for i in range(40)}

    first = chosen()
    assert first == chosen()
    counts = {p: list(first.values()).count(p) for p in ("a", "b")}
    assert min(counts.values()) >= 10


def test_lowest_latency_prefers_the_fastest_ewma() -> None:
    sel = FailoverSelector(["slow", "fast"], strategy="lowest_latency", hysteresis_ns=0)
    sel.observe("AAPL", "slow", "s1", 0, 0, 50, 100)
    d = sel.observe("AAPL", "fast", "f1", 0, 0, 5, 100)
    assert d.switch is not None and d.switch.reason == "failback"
    assert sel.chosen("AAPL") == "fast"
    assert sel.latency_ns("fast") == 5.0
    sel.observe("AAPL", "fast", "f2", 10, 10, 110, 110)
    assert sel.latency_ns("fast") == 5.0 + 0.2 * (100 - 5.0)


DETECT, HYST = 3, 10


@settings(max_examples=600, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.booleans(),  # A delivers
            st.booleans(),  # B delivers
            st.sampled_from(["none", "none", "none", "down", "up", "redeliver"]),
            st.booleans(),  # B before A within the step
        ),
        min_size=1,
        max_size=80,
    )
)
def test_property_no_duplicates_no_gaps_and_hysteresis(
    steps: list[tuple[bool, bool, str, bool]],
) -> None:
    sel = FailoverSelector(["A", "B"], detect_ns=DETECT, hysteresis_ns=HYST)
    forwarded: list[str] = []
    ts_of: dict[str, int] = {}
    fresh_up: list[int] = []  # arrival times of fresh batches from providers not marked down
    deliveries: dict[str, list[int]] = {"A": [], "B": []}  # while up
    downs: dict[str, list[int]] = {"A": [], "B": []}
    failbacks = []
    down: set[str] = set()
    for t, (a, b, event, b_first) in enumerate(steps):
        if event == "down":
            down.add("A")
            downs["A"].append(t)
            for sw in sel.mark_down("A", "circuit_open", t):
                forwarded += sw.forward
        elif event == "up":
            down.discard("A")
            sel.mark_up("A")
        order = [("B", b), ("A", a)] if b_first else [("A", a), ("B", b)]
        for p, delivers in order:
            if not delivers:
                continue
            bid = f"{p}{t}"
            ts_of[bid] = t
            d = sel.observe("X", p, bid, t, t, t, t)
            forwarded += d.forward
            if d.switch is not None and d.switch.reason == "failback":
                failbacks.append(d.switch)
            if p not in down:
                fresh_up.append(t)
                deliveries[p].append(t)
        if event == "redeliver" and t >= 2:
            old = f"A{t - 2}"
            if old in ts_of:
                forwarded += sel.observe("X", "A", old, t - 2, t - 2, t, t).forward
        for sw in sel.tick(t):
            forwarded += sw.forward
            if sw.reason == "failback":
                failbacks.append(sw)

    assert len(forwarded) == len(set(forwarded)), "a batch id was forwarded twice"
    times = sorted(ts_of[f] for f in forwarded)
    for u in fresh_up:
        assert any(u - DETECT <= f <= u for f in times), f"gap around {u}: {times}"
    for sw in failbacks:
        at, to = sw.at_ns, sw.to_provider
        run = [d for d in deliveries[to] if d <= at]
        assert run and not any(at - HYST <= x <= at for x in downs[to])
        # walk back from `at`: continuous (gaps < DETECT) deliveries reaching HYST back
        start = run[-1]
        assert at - start < DETECT
        for earlier in reversed(run[:-1]):
            if start - earlier >= DETECT:
                break
            start = earlier
        assert at - start >= HYST, f"failback at {at} after only {at - start}"


def test_a_redelivery_is_no_sign_of_health() -> None:
    sel = _sel()
    _obs(sel, "ibkr", 0)
    sel.observe("AAPL", "ibkr", "ibkr:0", 0, 0, 0, 2 * S)  # redelivered: old event time
    _obs(sel, "synthetic", 2 * S)
    [switch] = sel.tick(3 * S)
    assert (switch.reason, switch.forward) == ("stale", ("synthetic:2000000000",))


def test_source_health_from_circuits_and_job_states() -> None:
    from mdp.services.router.service import SourceHealth

    health = SourceHealth()
    assert health.down_reason("ibkr") is None  # nothing known: up
    health.circuits["ibkr"] = "open"
    assert health.down_reason("ibkr") == "circuit_open"
    health.circuits["ibkr"] = "half_open"  # a probe runs: not yet trusted
    assert health.down_reason("ibkr") == "circuit_half_open"
    health.circuits["ibkr"] = "closed"
    health.jobs["provider.a"] = ("ibkr", "retrying")
    assert health.down_reason("ibkr") == "job_retrying"
    health.jobs["provider.b"] = ("ibkr", "running")  # another job of it still delivers
    assert health.down_reason("ibkr") is None
    health.jobs["provider.b"] = ("ibkr", "stopped")
    health.jobs["provider.a"] = ("ibkr", "failed")
    assert health.down_reason("ibkr") == "job_failed"
    health.jobs["provider.a"] = ("ibkr", "completed")  # a replay that ended is not down
    assert health.down_reason("ibkr") is None
    assert health.down_reason("synthetic") is None
