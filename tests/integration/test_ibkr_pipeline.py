"""The ibkr adapter through the whole pipeline: a real provider process (`--adapters ibkr`),
router, aggregator, store and control, against the fake gateway in this test's event loop.

- quotes of several stocks become bars equal to those computed from what the fake sent;
- after a dropped connection, 1101, 10182 and a stream that died silently, every subscription
  resumes within the documented time (measured, three times each), no tick twice, the gap in
  `status`;
- 200 on one symbol: refused with its reason (status, event), the others unaffected;
- 200 symbols subscribe without the fake ever seeing more than 50 messages in a second;
- data that stays stopped opens the breaker and the router fails over to synthetic.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

from mdp.services.provider.ratelimit import max_in_window
from mdp.services.store.writers import read_bars
from mdp.shared.contract import names
from mdp.shared.contract.events import Failover, decode_event
from mdp.shared.contract.messages import TickBatch
from mdp.shared.natsserver import EmbeddedNats
from tests.batch_bars import RawTick, batch_bars
from tests.conftest import wait_for
from tests.conftest_control import System, module_nats_fixture, start_system, stop_system
from tests.fakes.ibgateway import FakeContract, FakeGateway
from tests.reference import compare_bars

__all__ = ["module_nats_fixture"]

pytest.importorskip("ib_async")
pytestmark = pytest.mark.integration

STALE_MIN_S = 1.0
PROVIDERS = """
ibkr:
  enabled: true
  symbols: [AAPL, MSFT, BRK.B]
  params:
    host: 127.0.0.1
    port: %d
    market_hours: false
    stale_min_s: %s
    stale_max_s: 3.0
    probe_timeout_s: 1.0
    reconnect_initial_s: 0.2
    reconnect_max_s: 1.0
    connect_timeout_s: 5.0
synthetic:
  enabled: true
  symbols: [AMD]
  params: {rate: 20}
fallback:
  default: [ibkr, synthetic]
  detect_seconds: 30     # long: only the breaker can explain a fast switch
  hysteresis_seconds: 2
"""


class Seen(msgspec.Struct):
    """A tick as a subject carried it, with the batch's headers."""

    arrived: float
    provider: str
    seq: int
    ts: int
    price: float
    size: float
    market_data: str | None


class Tap:
    """Every tick on one subject pattern, by symbol."""

    def __init__(self) -> None:
        self.ticks: dict[str, list[Seen]] = defaultdict(list)

    async def on(self, msg: Any) -> None:
        if not msg.data:
            return
        batch = msgspec.json.decode(msg.data, type=TickBatch)
        now = time.monotonic()
        kind = (msg.headers or {}).get(names.MARKET_DATA)
        for t in batch.ticks:
            self.ticks[batch.symbol].append(
                Seen(now, batch.provider, t.seq, t.ts, t.price, t.size, kind)
            )


@pytest.fixture(scope="module")
async def gw() -> AsyncIterator[FakeGateway]:
    async with FakeGateway() as gateway:
        yield gateway


@pytest.fixture(scope="module", name="system")
async def system_fixture(
    module_nats: EmbeddedNats, gw: FakeGateway, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[System]:
    tmp = tmp_path_factory.mktemp("ibkr")
    system = await start_system(
        module_nats,
        tmp,
        ("provider", "router", "aggregator", "store", "control"),
        env={
            "MDP_PROVIDER__ADAPTERS": "ibkr,synthetic",
            "MDP_PROVIDER__DATA_STOPPED_AFTER_S": "0",  # the adapter's watchdog is under test
            "MDP_POLICY__CIRCUIT__RECOVERY_SECONDS": "60",
        },
        configs={"data_providers.yaml": PROVIDERS % (gw.port, STALE_MIN_S)},
    )
    yield system
    await stop_system(system)


async def feed(system: System, job: str) -> dict[str, Any]:
    """The job's feed report in `status` ({} before the first)."""
    status = await system.ok("status")
    [view] = [v for v in status["jobs"] if v["job"] == job]
    return dict(view["provider_state"].get("feed") or {})


async def subscribed(gw: FakeGateway, keys: set[str], timeout: float = 30) -> None:
    await wait_for(
        lambda: keys <= {s.key for subs in gw.subscriptions.values() for s in subs},
        timeout,
        f"subscriptions of {sorted(keys)} at the fake",
    )


async def stop(system: System, job: str) -> None:
    await system.ok("stop", {"job": job})


async def test_quotes_become_bars_equal_to_what_the_fake_sent(
    system: System, gw: FakeGateway
) -> None:
    quotes = Tap()
    await system.nc.subscribe("md.quotes.*", cb=quotes.on)
    await system.ok("start", {"provider": "ibkr", "job": "bars"})
    keys = {"AAPL": "AAPL", "MSFT": "MSFT", "BRK.B": "BRK B"}
    try:
        await subscribed(gw, set(keys.values()))
        sent: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for i in range(60):  # three seconds: several 1 s bars per symbol
            for n, (symbol, key) in enumerate(keys.items()):
                price, size = round(100 * (n + 1) + (i % 7) * 0.01, 2), 100 + (i % 5)
                await gw.send_tick(key, bid=price - 0.01, ask=price + 0.01, bid_size=5, ask_size=7)
                await gw.send_tick(key, price=price, size=size)
                sent[symbol].append((price, size))
            await asyncio.sleep(0.05)
        await wait_for(
            lambda: all(len(quotes.ticks[s]) >= 60 for s in keys), 20, "every quote routed"
        )
        rows: list[RawTick] = []
        for symbol in keys:
            seen = quotes.ticks[symbol]
            assert [(q.price, q.size) for q in seen] == sent[symbol]  # as sent, none twice
            assert {q.market_data for q in seen} == {"live"}
            rows += [RawTick(symbol, q.ts, repr(q.price), repr(q.size), q.ts, q.seq) for q in seen]
        expected = batch_bars(rows, ["1s"])
        store_url = system.sup.store_url

        async def stored() -> bool:
            bars = [b for b in await read_bars(store_url) if b.symbol in keys]
            return not compare_bars(bars, expected, "1s")

        await wait_for(stored, 30, "the 1 s bars of every symbol in the store")
        status = await feed(system, "bars")
        assert status["connection"] == "connected" and status["server_version"] == 178
        assert status["market_data_type"] == "live"
        assert {s["state"] for s in status["symbols"].values()} == {"live"}
    finally:
        await stop(system, "bars")


async def test_every_fault_resumes_within_the_documented_time(
    system: System, gw: FakeGateway
) -> None:
    raw = Tap()
    await system.nc.subscribe("md.raw.ibkr.*", cb=raw.on)
    symbols = {"AAPL": "AAPL", "MSFT": "MSFT"}
    await system.ok("start", {"provider": "ibkr", "job": "faults", "symbols": list(symbols)})
    price = 100.0
    running = True

    async def trade_forever() -> None:  # 20 trades/s per symbol, each a new price
        nonlocal price
        while running:
            price = round(price + 0.01, 2)
            for key in symbols.values():
                await gw.send_tick(key, price=price, size=1)
            await asyncio.sleep(0.05)

    trader = asyncio.create_task(trade_forever())
    took: dict[str, list[float]] = defaultdict(list)
    try:
        await subscribed(gw, set(symbols.values()))
        await wait_for(lambda: all(len(raw.ticks[s]) > 20 for s in symbols), 20, "ticks")

        async def fault(name: str) -> None:
            if name == "drop":
                gw.drop_connections()
            elif name == "1101":
                await gw.send_error(1101, "Connectivity between IB and TWS has been restored")
            elif name == "10182":
                for sub in [s for subs in gw.subscriptions.values() for s in subs]:
                    await gw.send_error(10182, "Failed to request live updates", sub.req_id)
            else:
                gw.kill_streams()  # both streams die, the socket stays up

        for _ in range(3):
            for name in ("drop", "1101", "10182", "silent"):
                before = {s: len(raw.ticks[s]) for s in symbols}
                at = time.monotonic()
                mark = price
                await fault(name)

                def resumed(
                    at: float = at, mark: float = mark, before: dict[str, int] = before
                ) -> bool:
                    return all(
                        any(q.arrived > at and q.price > mark for q in raw.ticks[s][before[s] :])
                        for s in symbols
                    )

                await wait_for(resumed, 20, f"every symbol to resume after {name}")
                resumed_at = min(
                    max(
                        q.arrived
                        for q in raw.ticks[s][before[s] :]
                        if q.arrived > at and q.price > mark
                    )
                    for s in symbols
                )
                firsts = [
                    min(q.arrived for q in raw.ticks[s][before[s] :] if q.price > mark)
                    for s in symbols
                ]
                took[name].append(max(firsts) - at)
                assert resumed_at >= at
                await asyncio.sleep(0.3)  # a few ticks between faults
        summary = {name: (min(v), statistics.median(v), max(v)) for name, v in sorted(took.items())}
        print(
            "ibkr resume after fault (min / median / max s): "
            + "; ".join(f"{n} {a:.2f}/{m:.2f}/{b:.2f}" for n, (a, m, b) in summary.items())
        )
        for symbol in symbols:
            seen = raw.ticks[symbol]
            seqs = [q.seq for q in seen]
            assert seqs == sorted(set(seqs)), f"{symbol}: a seq twice or out of order"
            prices = [q.price for q in seen]
            assert len(set(prices)) == len(prices), f"{symbol}: a trade twice"

        async def reported() -> bool:  # status is refreshed every second or so
            status = await feed(system, "faults")
            return status["reconnects"] == 3 and all(
                status["symbols"][s]["resubscriptions"] >= 9 for s in symbols
            )

        await wait_for(reported, 10, "the faults in status")
        status = await feed(system, "faults")
        for symbol in symbols:
            report = status["symbols"][symbol]
            assert report["gaps"] >= 6 and report["last_gap_s"] > 0, report  # drops, silences
        assert status["data_stopped"] >= 3
        assert await system.metric("provider", "mdp_ibkr_reconnects_total", job="faults") == 3
        for name, (_, _, worst) in summary.items():
            limit = STALE_MIN_S + 2.0 if name == "silent" else 2.0
            assert worst < limit, f"{name}: resumed after {worst:.2f} s (limit {limit} s)"
    finally:
        running = False
        await trader
        await stop(system, "faults")
        await system.ok("reset", {"provider": "ibkr"})


async def test_200_refuses_one_symbol_with_its_reason_and_the_others_run(
    system: System, gw: FakeGateway
) -> None:
    refused: list[dict[str, Any]] = []

    async def on_refused(msg: Any) -> None:
        refused.append(msgspec.json.decode(msg.data))

    sub = await system.nc.subscribe(names.event("refused"), cb=on_refused)
    raw = Tap()
    await system.nc.subscribe("md.raw.ibkr.*", cb=raw.on)
    gw.reject_symbol("MSFT")
    await system.ok("start", {"provider": "ibkr", "job": "refuse", "symbols": ["AAPL", "MSFT"]})
    try:
        await subscribed(gw, {"AAPL"})
        await wait_for(lambda: refused, 20, "the refused event")
        [event] = refused
        assert (event["job"], event["symbol"], event["code"]) == ("refuse", "MSFT", 200)
        assert "no security definition" in event["reason"]
        for i in range(5):
            await gw.send_tick("AAPL", price=300 + i, size=1)
        await wait_for(lambda: len(raw.ticks["AAPL"]) >= 5, 10, "AAPL ticks")

        async def shown() -> bool:
            symbols = (await feed(system, "refuse")).get("symbols", {})
            return symbols.get("MSFT", {}).get("state") == "refused"

        await wait_for(shown, 10, "MSFT refused in status")
        symbols = (await feed(system, "refuse"))["symbols"]
        assert (
            symbols["MSFT"]["code"] == 200 and "no security definition" in symbols["MSFT"]["reason"]
        )
        assert symbols["AAPL"]["state"] == "live"
        view = next(v for v in (await system.ok("status"))["jobs"] if v["job"] == "refuse")
        assert view["state"] == "running"
    finally:
        gw.accept_symbol("MSFT")
        await sub.unsubscribe()
        await stop(system, "refuse")


async def test_200_symbols_subscribe_within_50_messages_a_second(
    system: System, gw: FakeGateway
) -> None:
    symbols = [f"P{i:03d}" for i in range(200)]
    for i, symbol in enumerate(symbols):
        gw.add_contract(FakeContract(symbol, "STK", "SMART", "USD", 900_000 + i, "NYSE"))
    timings = []
    try:
        for run in range(2):  # the second start reads every contract from the KV cache
            began = time.monotonic()
            first_message = len(gw.received)
            job = f"wide{run}"
            await system.ok("start", {"provider": "ibkr", "job": job, "symbols": symbols})
            await subscribed(gw, set(symbols), 60)
            took = time.monotonic() - began
            messages = gw.received[first_message:]
            # The busiest closed 1 s window of the messages the fake received (any start).
            busiest = max_in_window([int(m.time * 1e9) for m in messages], 1_000_000_000)
            details = sum(1 for m in messages if m.msg_id == 9)
            timings.append((took, len(messages), busiest, details))
            assert busiest <= 50, f"{busiest} messages in one second"
            assert not [e for e in gw.errors_sent if e[2] == 100]
            await stop(system, job)
            await wait_for(lambda: not any(gw.subscriptions.values()), 20, "unsubscribed")
        (t1, n1, b1, d1), (t2, n2, b2, d2) = timings
        assert d1 == 200 and d2 == 0  # qualified once, then from the cache
        print(
            f"200 symbols: first start {t1:.1f} s, {n1} messages, busiest second {b1}; "
            f"cached start {t2:.1f} s, {n2} messages, busiest second {b2}"
        )
    finally:
        for i in range(200):
            gw.contracts.pop(900_000 + i, None)


async def test_stopped_data_opens_the_breaker_and_the_router_fails_over(
    system: System, gw: FakeGateway
) -> None:
    gw.add_contract(FakeContract("AMD", "STK", "SMART", "USD", 4391, "NASDAQ"))
    switches: list[Failover] = []

    async def on_failover(msg: Any) -> None:
        event = decode_event(msg.subject, msg.data)
        if isinstance(event, Failover) and event.symbol == "AMD":
            switches.append(event)

    circuits: list[dict[str, Any]] = []

    async def on_circuit(msg: Any) -> None:
        circuits.append(msgspec.json.decode(msg.data))

    await system.nc.subscribe(names.event("failover"), cb=on_failover)
    await system.nc.subscribe(names.event("circuit"), cb=on_circuit)
    await system.ok("reset", {"provider": "ibkr"})
    await system.ok("start", {"provider": "ibkr", "job": "primary", "symbols": ["AMD"]})
    await system.ok("start", {"provider": "synthetic", "job": "backup", "symbols": ["AMD"]})
    running = True

    async def trade_forever() -> None:
        i = 0
        while running:
            i += 1
            await gw.send_tick("AMD", price=round(150 + i * 0.01, 2), size=1)
            await asyncio.sleep(0.05)

    trader = asyncio.create_task(trade_forever())
    try:
        await wait_for(
            lambda: switches and switches[-1].to_provider == "ibkr", 30, "the router on ibkr"
        )
        gw.stop_ticks()
        stopped_at = time.monotonic()
        await wait_for(lambda: switches[-1].to_provider == "synthetic", 30, "failover to synthetic")
        failover_s = time.monotonic() - stopped_at
        assert switches[-1].reason == "provider_down", switches[-1]
        opened = [c for c in circuits if c["provider"] == "ibkr" and c["to_state"] == "open"]
        assert opened, circuits
        status = await feed(system, "primary")
        assert status["data_stopped"] >= 1
        print(f"ibkr data stopped -> breaker open -> failover in {failover_s:.2f} s (detect 30 s)")
        assert failover_s < 15
    finally:
        running = False
        await trader
        gw.resume_ticks()
        await stop(system, "primary")
        await stop(system, "backup")
        await system.ok("reset", {"provider": "ibkr"})
