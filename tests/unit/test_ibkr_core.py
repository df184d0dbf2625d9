"""The ibkr adapter's pure core: tick conversion, the recovery table, the watchdog, params."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mdp.services.provider.adapters.base import AdapterError, check_params
from mdp.services.provider.adapters.ibkr.adapter import IbkrAdapter
from mdp.services.provider.adapters.ibkr.feed import SymbolTicks
from mdp.services.provider.adapters.ibkr.params import IbkrParams
from mdp.services.provider.adapters.ibkr.recovery import (
    POLICIES,
    Action,
    new_port,
    policy,
    recovery_table,
)
from mdp.services.provider.adapters.ibkr.watchdog import (
    VerdictKind,
    WatchConfig,
    Watchdog,
    is_open,
)
from mdp.shared.contract.control import JobSpec

NS = 1_000_000_000

# -- feed ------------------------------------------------------------------------------------


def test_trades_carry_the_quote_and_number_from_the_resume_point() -> None:
    feed = SymbolTicks(seq=41)
    assert feed.price(1, 99.5, 300, 1 * NS) is None  # a quote alone makes no tick
    assert feed.price(2, 100.5, 200, 2 * NS) is None
    tick = feed.price(4, 100.0, 50, 3 * NS)
    assert tick is not None
    assert (tick.seq, tick.price, tick.size, tick.bid, tick.ask) == (42, 100.0, 50, 99.5, 100.5)
    assert (tick.bid_size, tick.ask_size, tick.ts, tick.recv) == (300, 200, 3 * NS, 3 * NS)
    assert feed.size(0, 400, 4 * NS) is None and feed.bid_size == 400
    assert feed.size(5, 50, 4 * NS) is None  # the size that follows its trade: no second trade


def test_the_replay_after_a_resubscription_is_not_a_second_trade() -> None:
    feed = SymbolTicks()
    assert feed.price(4, 10.0, 5, NS) is not None
    feed.resubscribed()
    assert feed.price(4, 10.0, 5, 2 * NS) is None  # the gateway's current value, seen already
    assert feed.price(4, 10.0, 5, 3 * NS) is not None  # the same print again later is a trade
    feed.resubscribed()
    missed = feed.price(4, 11.0, 7, 4 * NS)  # a trade made while we were away
    assert missed is not None and missed.seq == 3


def test_quote_ticks_at_the_mid_and_event_time_never_goes_back() -> None:
    feed = SymbolTicks(quote_ticks=True)
    assert feed.price(1, 1.1000, 1e6, 5 * NS) is None  # one side: no mid yet
    tick = feed.price(2, 1.1002, 2e6, 6 * NS)
    assert tick is not None and tick.price == pytest.approx(1.1001) and tick.size == 0
    assert feed.price(2, 1.1002, 2e6, 7 * NS) is None  # unchanged: nothing new
    earlier = feed.trade(3 * NS, 1.2, 1, 8 * NS)  # tick-by-tick time behind the last tick
    assert earlier is not None and earlier.ts == 6 * NS and earlier.recv == 8 * NS


def test_tick_by_tick_uses_ib_time_and_empty_sides_are_none() -> None:
    feed = SymbolTicks()
    assert feed.quote(-1, 101.0, 0, 5, 10 * NS, 11 * NS) is None
    assert (feed.bid, feed.ask, feed.bid_size, feed.ask_size) == (None, 101.0, None, 5)
    tick = feed.trade(10 * NS, 100.5, 3, 11 * NS)
    assert tick is not None and tick.ts == 10 * NS and tick.recv == 11 * NS
    assert feed.trade(12 * NS, -1, 0, 13 * NS) is None  # IB's "no trade"


def test_delayed_tick_types_are_noticed() -> None:
    feed = SymbolTicks()
    assert feed.price(68, 10.0, 1, NS) is not None  # delayed last lands like a live one
    assert feed.delayed_seen


@given(st.lists(st.tuples(st.sampled_from([1, 2, 4, 66, 67, 68]), st.floats(0.01, 1e4))))
def test_seq_is_gapless_and_ts_monotonic(messages: list[tuple[int, float]]) -> None:
    feed = SymbolTicks(seq=7, quote_ticks=True)
    ticks = [
        t for i, (kind, price) in enumerate(messages) if (t := feed.price(kind, price, 1, i + 1))
    ]
    assert [t.seq for t in ticks] == list(range(8, 8 + len(ticks)))
    assert [t.ts for t in ticks] == sorted(t.ts for t in ticks)


# -- recovery ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "action"),
    [
        (1100, Action.DEGRADE),
        (2110, Action.DEGRADE),
        (2103, Action.DEGRADE),
        (1101, Action.RESUBSCRIBE_ALL),
        (1102, Action.VERIFY),
        (2104, Action.VERIFY),
        (10182, Action.RESUBSCRIBE),
        (1300, Action.RECONNECT),
        (100, Action.COOLDOWN),
        (420, Action.COOLDOWN),
        (200, Action.REFUSE),
        (354, Action.REFUSE),
        (10167, Action.DELAYED),
        (10189, Action.FALLBACK),
        (10190, Action.FALLBACK),
        (10197, Action.FAIL_OVER),
        (2107, Action.IGNORE),
        (2150, Action.IGNORE),  # an unlisted informational notice
        (9999, Action.WARN),  # an unknown code is shown, not acted on
    ],
)
def test_the_table_drives_every_code_of_the_issue(code: int, action: Action) -> None:
    assert policy(code).action is action


def test_162_is_a_cooldown_only_when_it_says_pacing() -> None:
    assert policy(162, "Historical Market Data Service error message:pacing violation").action == (
        Action.COOLDOWN
    )
    assert policy(162, "HMDS query returned no data").action is Action.WARN
    assert policy(100).cooldown_s > 0 and policy(100).failure == "pacing"


def test_restorations_clear_their_degradations_and_ports_are_read() -> None:
    assert 1100 in policy(1101).clears and 1100 in policy(1102).clears
    assert 2103 in policy(2104).clears
    assert new_port("The TWS socket port has been reset ... on the new port - 7498") == 7498
    assert new_port("reset, reconnect") is None


def test_the_readme_table_lists_every_row() -> None:
    table = recovery_table()
    for code in POLICIES:
        assert f"| {code} |" in table


# -- watchdog ------------------------------------------------------------------------------

CFG = WatchConfig(stale_factor=10, stale_min_s=1.0, stale_max_s=8.0, probe_timeout_s=2.0)


def always(_: str) -> bool:
    return True


def test_a_symbol_is_stale_past_its_own_pace_then_probed_longer_each_time() -> None:
    dog = Watchdog(CFG)
    dog.subscribed("A", 0.0)
    for i in range(10):
        assert dog.tick("A", i * 0.05) is None  # 20 ticks/s: threshold 10 x 0.05 -> 1 s
    assert dog.threshold_s("A") == pytest.approx(1.0)
    assert dog.check(1.3, always) == []
    [stale] = dog.check(1.5, always)
    assert stale.kind is VerdictKind.STALE and stale.silent_s == pytest.approx(1.05)
    dog.probe("A", 1.5)
    assert dog.check(3.0, always) == []  # probing: 2 s
    [failed] = dog.check(3.6, always)
    assert failed.kind is VerdictKind.PROBE_FAILED and failed.resubscribed
    dog.probe("A", 3.6)
    assert dog.watches["A"].probe_s == 4.0  # twice as long
    gap = dog.tick("A", 5.0)
    assert gap == pytest.approx(5.0 - 0.45)  # the silence, from the last tick
    assert dog.check(5.5, always) == []


def test_no_tick_yet_waits_the_maximum_and_closed_markets_are_not_stale() -> None:
    dog = Watchdog(CFG)
    dog.subscribed("A", 0.0)
    assert dog.check(7.9, always) == []
    assert [v.kind for v in dog.check(8.0, always)] == [VerdictKind.STALE]
    dog.subscribed("B", 0.0)
    assert dog.check(100.0, lambda s: s != "B")[0].symbol == "A"
    # B's market is seen open at 101: its silence counts from then, not from its subscription.
    assert [v.symbol for v in dog.check(101.0, always)] == ["A"]
    assert [v.symbol for v in dog.check(108.5, always) if v.symbol == "B"] == []
    assert [v.symbol for v in dog.check(109.0, always) if v.symbol == "B"] == ["B"]


def test_paused_and_verify() -> None:
    dog = Watchdog(CFG)
    dog.subscribed("A", 0.0)
    dog.tick("A", 0.0)
    dog.paused = True
    assert dog.check(100.0, always) == []
    dog.paused = False
    dog.verify(100.0)
    assert dog.check(101.0, always) == []
    [v] = dog.check(102.5, always)
    assert v.kind is VerdictKind.PROBE_FAILED and not v.resubscribed  # a verification


@pytest.mark.parametrize(
    ("exchange", "sec_type", "utc", "expected"),
    [
        ("NASDAQ", "STK", "2024-12-02T15:00", True),  # Monday 10:00 New York
        ("NASDAQ", "STK", "2024-12-02T08:30", False),  # 03:30 New York: before pre-market
        ("SMART", "STK", "2024-12-07T15:00", False),  # Saturday
        ("CBOE", "IND", "2024-12-02T21:20", False),  # 16:20 New York
        ("CME", "FUT", "2024-12-02T22:30", False),  # 16:30 Chicago: the daily halt
        ("CME", "FUT", "2024-12-08T23:30", True),  # Sunday 17:30 Chicago
        ("CME", "FUT", "2024-12-06T22:30", False),  # Friday 16:30 Chicago: closed
        ("IDEALPRO", "CASH", "2024-12-08T22:30", True),  # Sunday 17:30 New York
        ("IDEALPRO", "CASH", "2024-12-08T22:00", False),  # Sunday 17:00 New York
        ("XETRA", "STK", "2024-12-07T15:00", True),  # not in the calendar: always open
    ],
)
def test_market_hours(exchange: str, sec_type: str, utc: str, expected: bool) -> None:
    when = datetime.fromisoformat(utc).replace(tzinfo=UTC)
    assert is_open(exchange, sec_type, when) is expected


# -- params ----------------------------------------------------------------------------------


def test_params_defaults_names_and_client_id_range() -> None:
    params = check_params("ibkr", IbkrParams, {})
    assert (params.port, params.client_id, params.market_data_code) == (7497, 17, 1)
    assert list(params.client_ids) == list(range(17, 27))
    delayed = check_params("ibkr", IbkrParams, {"market_data_type": 3, "client_id_max": 18})
    assert delayed.market_data_name == "delayed" and list(delayed.client_ids) == [17, 18]


@pytest.mark.parametrize(
    ("params", "problem"),
    [
        ({"port": 0}, "params.port: Input should be greater than or equal to 1"),
        ({"port": "4002"}, "params.port: Input should be a valid integer"),
        ({"market_data_type": "live-ish"}, "params.market_data_type"),
        ({"client_id": 5, "client_id_max": 4}, "client_id_max (4) is below client_id (5)"),
        ({"stale_min_s": 10, "stale_max_s": 5}, "stale_min_s (10.0) is above stale_max_s"),
        ({"host": "http://gw"}, "params.host: Value error, must be a host name"),
        ({"hots": "x"}, "params.hots: unknown parameter"),
    ],
)
def test_params_errors_are_precise(params: dict[str, object], problem: str) -> None:
    with pytest.raises(AdapterError, match=r"^ibkr: ") as info:
        check_params("ibkr", IbkrParams, params)
    assert problem in str(info.value)


def test_a_job_whose_symbols_all_fail_the_grammar_is_refused_whole() -> None:
    job = JobSpec(job="j", run="r", provider="ibkr", symbols=["BAD!!"])
    with pytest.raises(AdapterError, match="no symbol of the job is valid"):
        IbkrAdapter(job)
    ok = IbkrAdapter(JobSpec(job="j", run="r", provider="ibkr", symbols=["BAD!!", "AAPL"]))
    assert ok.live and ok.clock_rate == 1.0
