"""The ibkr adapter with the real ib_async against the fake gateway, every fault of the issue.

The sink is an in-memory one (no NATS here: the pipeline tests, `test_ibkr_pipeline.py`, run
the real processes); it records ticks, refusals, failures, markers and the feed reports.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from mdp.services.provider.adapters.ibkr.adapter import IbkrAdapter
from mdp.services.provider.pacing import unlimited
from mdp.shared.contract.control import JobSpec
from mdp.shared.contract.messages import Tick
from mdp.shared.contract.records import FeedStatus
from tests.conftest import wait_for
from tests.fakes.ibgateway import FakeGateway

pytest.importorskip("ib_async")

FAST = {
    "market_hours": False,
    "reconnect_initial_s": 0.2,
    "reconnect_max_s": 1.0,
    "stale_min_s": 1.0,
    "stale_max_s": 3.0,
    "probe_timeout_s": 1.0,
    "connect_timeout_s": 3.0,
    "request_timeout_s": 3.0,
}


@dataclass
class MemoryStore:
    """A dict as the adapter's store."""

    data: dict[str, bytes] = field(default_factory=dict)

    async def get(self, key: str) -> bytes | None:
        return self.data.get(key)

    async def put(self, key: str, value: bytes) -> None:
        self.data[key] = value


@dataclass
class MemorySink:
    """Everything an adapter hands its sink, kept for assertions."""

    store: MemoryStore | None = field(default_factory=MemoryStore)
    ticks: dict[str, list[Tick]] = field(default_factory=dict)
    stream: list[tuple[str, str | Tick]] = field(default_factory=list)  # ticks and markers
    refused: list[tuple[str, int, str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    feed: FeedStatus | None = None
    market_data: dict[str, str] = field(default_factory=dict)
    pacer: Any = field(default_factory=unlimited)

    async def put(self, symbol: str, ticks: list[Tick]) -> None:
        self.ticks.setdefault(symbol, []).extend(ticks)
        self.stream.extend((symbol, t) for t in ticks)

    async def end_of_stream(self, symbols: Any, ticks_per_symbol: Mapping[str, int]) -> None:
        raise AssertionError("a live feed has no end")

    async def failure(self, kind: str) -> None:
        self.failures.append(kind)

    def report(self, feed: FeedStatus) -> None:
        self.feed = feed

    async def set_market_data(self, symbol: str, kind: str) -> None:
        self.market_data[symbol] = kind
        self.stream.append((symbol, kind))

    async def refuse(self, symbol: str, code: int, reason: str) -> None:
        self.refused.append((symbol, code, reason))

    def prices(self, symbol: str) -> list[float]:
        return [t.price for t in self.ticks.get(symbol, [])]


@dataclass
class Running:
    gw: FakeGateway
    sink: MemorySink
    task: asyncio.Task[None]
    symbols: list[str]

    def subs(self) -> int:
        return sum(len(s) for s in self.gw.subscriptions.values())

    async def subscribed(self, count: int | None = None, timeout: float = 10.0) -> None:
        want = len(self.symbols) if count is None else count
        await wait_for(lambda: self.subs() >= want, timeout, f"{want} subscriptions")

    async def trade(self, symbol: str, price: float, size: float = 100) -> int:
        return await self.gw.send_tick(symbol, price=price, size=size)

    async def resumes(self, keys: list[str], start: float, timeout: float = 15.0) -> float:
        """Trade every 50 ms until every key's new price reached the sink; seconds it took."""
        began = time.monotonic()
        price = start
        while True:
            price += 0.01
            for key in keys:
                await self.gw.send_tick(key, price=round(price, 2), size=1)
            if all(any(p > start for p in self.sink.prices(k)) for k in keys):
                return time.monotonic() - began
            if time.monotonic() - began > timeout:
                raise AssertionError(f"no resumption within {timeout} s: {self.sink.feed}")
            await asyncio.sleep(0.05)


@pytest.fixture
async def gw() -> AsyncIterator[FakeGateway]:
    async with FakeGateway() as gateway:
        yield gateway


@pytest.fixture
async def start(gw: FakeGateway) -> AsyncIterator[Callable[..., Any]]:
    tasks: list[asyncio.Task[None]] = []

    async def _start(
        symbols: list[str],
        sink: MemorySink | None = None,
        resume: dict[str, int] | None = None,
        **params: Any,
    ) -> Running:
        job = JobSpec(
            job="ib",
            run="r1",
            provider="ibkr",
            symbols=symbols,
            params={"port": gw.port, **FAST, **params},
        )
        sink = sink or MemorySink()
        task = asyncio.create_task(IbkrAdapter(job).run(sink, resume))
        tasks.append(task)
        return Running(gw, sink, task, symbols)

    yield _start
    for task in tasks:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def no_tick_twice(sink: MemorySink) -> None:
    for symbol, ticks in sink.ticks.items():
        seqs = [t.seq for t in ticks]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), (symbol, seqs)
        prices = [t.price for t in ticks]
        assert len(set(prices)) == len(prices), f"{symbol}: a trade twice: {prices}"


async def test_quotes_and_trades_of_every_kind_of_symbol(gw: FakeGateway, start: Any) -> None:
    run = await start(
        ["AAPL", "BRK.B", "EUR.USD", "ES 202412@CME", "IND:SPX@CBOE"], resume={"AAPL": 9}
    )
    await run.subscribed()
    await gw.send_tick("AAPL", bid=189.5, bid_size=300, ask=189.52, ask_size=200)
    await gw.send_tick("AAPL", price=189.51, size=100)
    await gw.send_tick("BRK B", price=450.0, size=10)
    await gw.send_tick("EUR.USD", bid=1.1, ask=1.1002, bid_size=1e6, ask_size=2e6)
    await gw.send_tick("ES", price=6000.25, size=2)
    await gw.send_tick("SPX", price=6001.0)
    await wait_for(lambda: len(run.sink.ticks) == 5, what="a tick of every symbol")
    [aapl] = run.sink.ticks["AAPL"]
    assert (aapl.seq, aapl.price, aapl.size, aapl.bid, aapl.ask) == (10, 189.51, 100, 189.5, 189.52)
    assert (aapl.bid_size, aapl.ask_size) == (300, 200)
    [fx] = run.sink.ticks["EUR.USD"]
    assert fx.price == pytest.approx(1.1001) and fx.size == 0  # FX: the quote is the tick
    assert run.sink.ticks["IND:SPX@CBOE"][0].price == 6001.0
    assert set(run.sink.market_data.values()) == {"live"}
    await wait_for(lambda: run.sink.feed is not None and run.sink.feed.symbols["AAPL"].ticks == 1)
    feed = run.sink.feed
    assert feed is not None
    assert (feed.connection, feed.server_version, feed.market_data_type) == (
        "connected",
        178,
        "live",
    )
    assert feed.symbols["AAPL"].state == "live" and feed.symbols["AAPL"].age_s is not None


async def test_error_200_refuses_that_symbol_alone(gw: FakeGateway, start: Any) -> None:
    gw.reject_symbol("MSFT")
    run = await start(["AAPL", "MSFT", "BAD!!"])
    await run.subscribed(1)
    await wait_for(lambda: len(run.sink.refused) == 2, what="two refusals")
    reasons = {s: (c, r) for s, c, r in run.sink.refused}
    assert reasons["MSFT"][0] == 200 and "no security definition" in reasons["MSFT"][1]
    assert reasons["BAD!!"][0] == 0 and "not a ticker" in reasons["BAD!!"][1]
    await run.trade("AAPL", 190.0)
    await wait_for(lambda: run.sink.prices("AAPL") == [190.0])
    await wait_for(lambda: run.sink.feed is not None and run.sink.feed.symbols["MSFT"].code == 200)
    assert run.sink.feed is not None and run.sink.feed.symbols["MSFT"].state == "refused"


async def test_contracts_are_qualified_once_then_read_from_the_store(
    gw: FakeGateway, start: Any
) -> None:
    sink = MemorySink()
    run = await start(["AAPL", "EUR.USD"], sink=sink)
    await run.subscribed()
    asked = len(gw.messages(9))
    assert asked == 2 and len(sink.store.data) == 2  # type: ignore[union-attr]
    run.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run.task
    again = await start(["AAPL", "EUR.USD"], sink=MemorySink(store=sink.store))
    await again.subscribed()
    assert len(gw.messages(9)) == asked  # no contract details asked the second time


async def test_dropped_connections_reconnect_resubscribe_and_report_the_gap(
    gw: FakeGateway, start: Any
) -> None:
    run = await start(["AAPL", "MSFT"])
    await run.subscribed()
    await run.trade("AAPL", 100.0)
    await run.trade("MSFT", 200.0)
    await wait_for(lambda: len(run.sink.stream) >= 4)
    gw.drop_connections()
    took = await run.resumes(["AAPL", "MSFT"], 300.0)
    no_tick_twice(run.sink)
    assert run.sink.feed is not None and run.sink.feed.reconnects == 1
    await wait_for(lambda: run.sink.feed is not None and run.sink.feed.symbols["AAPL"].gaps == 1)
    assert "connection" in run.sink.failures
    print(f"resumed {took:.2f} s after the drop")
    assert took < 5


async def test_refused_connections_are_retried_with_backoff(gw: FakeGateway, start: Any) -> None:
    gw.refuse_connections(seconds=1.5)
    run = await start(["AAPL"])
    await run.subscribed(timeout=10)
    assert run.sink.failures.count("connection") >= 2  # every failed attempt counts


async def test_326_moves_to_the_next_client_id(gw: FakeGateway, start: Any) -> None:
    gw.client_id_in_use(17)
    gw.client_id_in_use(18)
    run = await start(["AAPL"], connect_timeout_s=30)
    began = time.monotonic()
    await run.subscribed()
    assert gw.client_ids == [19]
    assert time.monotonic() - began < 5  # not after the connect timeout
    assert run.sink.feed is not None and run.sink.feed.client_id == 19


async def test_1101_resubscribes_everything(gw: FakeGateway, start: Any) -> None:
    run = await start(["AAPL", "MSFT"])
    await run.subscribed()
    await run.trade("AAPL", 100.0)
    await wait_for(lambda: run.sink.prices("AAPL") == [100.0])
    await gw.send_error(1100, "Connectivity between IB and Trader Workstation has been lost.")
    await wait_for(lambda: run.sink.feed is not None and run.sink.feed.connection == "degraded")
    await gw.send_error(1101, "Connectivity restored - data lost.")
    took = await run.resumes(["AAPL", "MSFT"], 300.0)
    await wait_for(lambda: run.sink.feed is not None and run.sink.feed.resubscriptions >= 2)
    assert run.sink.feed is not None and run.sink.feed.connection == "connected"
    no_tick_twice(run.sink)
    print(f"resumed {took:.2f} s after 1101")


async def test_10182_re_requests_that_subscription(gw: FakeGateway, start: Any) -> None:
    run = await start(["AAPL", "MSFT"])
    await run.subscribed()
    [aapl] = [s for s in gw.subscriptions[17] if s.key == "AAPL"]
    await gw.send_error(10182, "Failed to request live updates (disconnected).", req_id=aapl.req_id)
    took = await run.resumes(["AAPL"], 300.0)
    await wait_for(lambda: run.sink.feed is not None and run.sink.feed.resubscriptions == 1)
    feed = run.sink.feed
    assert feed is not None and feed.symbols["AAPL"].resubscriptions == 1
    assert feed.symbols["MSFT"].resubscriptions == 0
    print(f"resumed {took:.2f} s after 10182")


async def test_silent_data_loss_is_found_by_tick_age_and_resubscribed(
    gw: FakeGateway, start: Any
) -> None:
    run = await start(["AAPL", "MSFT"])
    await run.subscribed()
    for i in range(10):  # a pace to learn: 20 ticks/s
        await run.trade("AAPL", 100 + i / 100)
        await run.trade("MSFT", 200 + i / 100)
        await asyncio.sleep(0.05)
    gw.kill_streams("AAPL")  # AAPL's stream dies, the socket stays up
    took = await run.resumes(["AAPL", "MSFT"], 300.0)
    feed = run.sink.feed
    await wait_for(lambda: run.sink.feed is not None and run.sink.feed.symbols["AAPL"].gaps == 1)
    feed = run.sink.feed
    assert feed is not None and feed.data_stopped >= 1
    assert feed.symbols["AAPL"].resubscriptions >= 1
    no_tick_twice(run.sink)
    print(f"resumed {took:.2f} s after the stream died (stale_min_s 1)")


async def test_data_that_stays_stopped_counts_failures(gw: FakeGateway, start: Any) -> None:
    run = await start(["AAPL"])
    await run.subscribed()
    await run.trade("AAPL", 100.0)
    gw.stop_ticks()  # nothing flows, resubscribing does not help
    await wait_for(lambda: run.sink.failures.count("data_stopped") >= 2, 15, "failed probes")


async def test_delayed_data_is_marked_never_mixed(gw: FakeGateway, start: Any) -> None:
    run = await start(["AAPL"])
    await run.subscribed()
    await run.trade("AAPL", 100.0)
    await wait_for(lambda: run.sink.prices("AAPL") == [100.0])
    await gw.set_market_data_type(3)
    await wait_for(lambda: run.sink.market_data.get("AAPL") == "delayed")
    await run.trade("AAPL", 101.0)
    await wait_for(lambda: run.sink.prices("AAPL") == [100.0, 101.0])
    kinds = [item if isinstance(item, str) else item.price for _, item in run.sink.stream]
    assert kinds == ["live", 100.0, "delayed", 101.0]
    await wait_for(
        lambda: run.sink.feed is not None and run.sink.feed.symbols["AAPL"].market_data == "delayed"
    )


async def test_tick_by_tick_with_ib_time_and_the_fallback_on_10190(
    gw: FakeGateway, start: Any
) -> None:
    run = await start(["AAPL"], tick_by_tick=True)
    await run.subscribed(2)
    assert sorted(s.tick_type for s in gw.subscriptions[17]) == ["AllLast", "BidAsk"]
    await gw.send_quote_tbt("AAPL", 99.0, 99.1, 5, 6, epoch=1_700_000_000)
    await gw.send_trade_tbt("AAPL", 99.05, 3, epoch=1_700_000_001)
    await wait_for(lambda: run.sink.prices("AAPL") == [99.05])
    [tick] = run.sink.ticks["AAPL"]
    assert tick.ts == 1_700_000_001 * 1_000_000_000 and (tick.bid, tick.ask) == (99.0, 99.1)
    [last] = [s for s in gw.subscriptions[17] if s.tick_type == "AllLast"]
    await gw.send_error(10190, "Max number of tick-by-tick requests has been reached.", last.req_id)
    await wait_for(lambda: [s.kind for s in gw.subscriptions[17]] == ["mktdata"], what="fallback")
    await run.trade("AAPL", 99.2)
    await wait_for(lambda: run.sink.prices("AAPL") == [99.05, 99.2])


async def test_pacing_errors_cool_down_and_count(gw: FakeGateway, start: Any) -> None:
    run = await start(["AAPL"])
    await run.subscribed()
    await gw.send_error(100, "Max rate of messages per second has been exceeded")
    await wait_for(lambda: "pacing" in run.sink.failures)


async def test_1300_reconnects_on_the_new_port(start: Any) -> None:
    async with FakeGateway() as first, FakeGateway() as second:
        run = await start(["AAPL"], port=first.port)
        run.gw = first
        await run.subscribed()
        await first.send_error(1300, f"TWS socket port has been reset - new port {second.port}")
        await wait_for(
            lambda: second.subscriptions.get(17), what="the subscription on the new port"
        )


async def test_a_degraded_farm_pauses_the_watchdog_but_not_for_ever(
    gw: FakeGateway, start: Any
) -> None:
    run = await start(["AAPL"])
    await run.subscribed()
    for i in range(10):
        await run.trade("AAPL", 100 + i / 100)
        await asyncio.sleep(0.05)
    await gw.send_error(2103, "Market data farm connection is broken:usfarm")
    await wait_for(lambda: run.sink.feed is not None and run.sink.feed.connection == "degraded")
    assert run.sink.feed is not None and run.sink.feed.degraded[0].startswith("2103")
    gw.kill_streams("AAPL")
    began = time.monotonic()
    await run.resumes(["AAPL"], 300.0)
    waited = time.monotonic() - began
    assert waited >= FAST["stale_max_s"] - 0.5  # paused: the gateway said why data stops
    await gw.send_error(2104, "Market data farm connection is OK:usfarm")
    await wait_for(lambda: run.sink.feed is not None and run.sink.feed.connection == "connected")
