"""The real ib_async client, end to end against the fake IB gateway over loopback."""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from tests.fakes.ibgateway import SERVER_VERSION, FakeGateway

ib_async = pytest.importorskip("ib_async")
from ib_async import IB, Contract, Forex, Future, Index, Stock, Ticker  # noqa: E402

ErrorLog = list[tuple[int, int, str, Any]]
Connect = Callable[..., Awaitable[IB]]


async def until(condition: Callable[[], object], timeout: float = 5.0, what: str = "") -> None:
    """Wait until ``condition()`` is truthy, failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}")
        await asyncio.sleep(0.01)


def record_errors(ib: IB) -> ErrorLog:
    """Collect (reqId, code, message, contract) of every errorEvent of ``ib``."""
    errors: ErrorLog = []
    ib.errorEvent += lambda req_id, code, msg, contract: errors.append(
        (req_id, code, msg, contract)
    )
    return errors


async def qualified(ib: IB, *contracts: Contract) -> list[Contract]:
    """Qualify contracts that the fake knows, failing on any that does not qualify."""
    result = await ib.qualifyContractsAsync(*contracts)
    assert all(isinstance(c, Contract) for c in result), result
    return [c for c in result if isinstance(c, Contract)]


@pytest.fixture(autouse=True)
def no_decoding_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fail a test in which ib_async could not decode a message or the fake one request.

    A wrong field layout does not fail a request: ib_async only logs it and the caller hangs.
    """
    caplog.set_level(logging.INFO)
    yield
    bad = [
        r
        for r in caplog.records
        if r.name == "ib_async.Decoder" or (r.name == "tests.fakes.ibgateway" and r.exc_info)
    ]
    assert not bad, [r.getMessage() for r in bad]


@pytest.fixture
async def gw() -> AsyncIterator[FakeGateway]:
    """A fake gateway on a free loopback port."""
    async with FakeGateway() as gateway:
        yield gateway


@pytest.fixture
async def connect(gw: FakeGateway) -> AsyncIterator[Connect]:
    """Connect real ib_async clients to the fake; all are disconnected at the end."""
    clients: list[IB] = []

    async def _connect(client_id: int = 1, timeout: float = 5.0) -> IB:
        ib = IB()
        ib.RequestTimeout = 5
        clients.append(ib)
        await ib.connectAsync("127.0.0.1", gw.port, clientId=client_id, timeout=timeout)
        return ib

    yield _connect
    for ib in clients:
        ib.disconnect()


async def subscribed(gw: FakeGateway, client_id: int, count: int = 1) -> None:
    """Wait until the fake holds ``count`` subscriptions of that client."""
    await until(lambda: len(gw.subscriptions.get(client_id, [])) >= count, what="subscription")


async def test_connect_handshake_and_startup(gw: FakeGateway, connect: Connect) -> None:
    ib = await connect(client_id=3)
    assert ib.isConnected()
    assert ib.client.serverVersion() == SERVER_VERSION
    assert ib.managedAccounts() == ["DU1234567"]
    assert gw.client_ids == [3]
    startup = {m.msg_id for m in gw.messages(client_id=3)}
    # positions, open orders, completed orders, account updates, multi-account, executions
    assert {61, 5, 99, 6, 76, 7} <= startup


async def test_qualify_stock_fx_future_index(connect: Connect) -> None:
    ib = await connect()
    aapl, brk = Stock("AAPL", "SMART", "USD"), Stock("BRK B", "SMART", "USD")
    eurusd, es, spx = Forex("EURUSD"), Future("ES", "202412", "CME"), Index("SPX", "CBOE")
    result = await ib.qualifyContractsAsync(aapl, brk, eurusd, es, spx)
    assert result == [aapl, brk, eurusd, es, spx]
    assert (aapl.conId, aapl.exchange, aapl.primaryExchange) == (265598, "SMART", "NASDAQ")
    assert (brk.conId, brk.localSymbol) == (72063691, "BRK B")
    assert (eurusd.conId, eurusd.secType, eurusd.localSymbol) == (12087792, "CASH", "EUR.USD")
    assert (es.conId, es.multiplier, es.localSymbol) == (495512563, "50", "ESZ4")
    assert es.lastTradeDateOrContractMonth == "20241220"  # the month is replaced by the day
    assert (spx.conId, spx.secType, spx.exchange) == (416904, "IND", "CBOE")
    details = await ib.reqContractDetailsAsync(Future("ES", "202412", "CME"))
    assert [d.contractMonth for d in details] == ["202412"]
    assert details[0].minTick == 0.25


async def test_unknown_symbol_is_error_200_and_the_others_qualify(
    gw: FakeGateway, connect: Connect
) -> None:
    ib = await connect()
    errors = record_errors(ib)
    nope, msft, aapl = Stock("NOPE", "SMART", "USD"), Stock("MSFT", "SMART", "USD"), Stock("AAPL")
    gw.reject_symbol("AAPL")
    assert await ib.qualifyContractsAsync(nope, msft, aapl) == [None, msft, None]
    assert msft.conId == 272093
    req_ids = {m.fields[4]: int(m.fields[2]) for m in gw.messages(msg_id=9)}
    got = {(req_id, code) for req_id, code, _msg, _c in errors}
    assert {(req_ids["NOPE"], 200), (req_ids["AAPL"], 200)} <= got
    assert all("No security definition" in msg for _r, code, msg, _c in errors if code == 200)
    gw.accept_symbol("AAPL")
    assert await ib.qualifyContractsAsync(aapl) == [aapl]


async def test_market_data_ticks_fill_the_ticker(gw: FakeGateway, connect: Connect) -> None:
    ib = await connect()
    (aapl,) = await qualified(ib, Stock("AAPL", "SMART", "USD"))
    ticker = ib.reqMktData(aapl)
    await subscribed(gw, 1)
    await until(lambda: ticker.marketDataType == 1, what="marketDataType")
    assert await gw.send_tick("AAPL", bid=189.5, bid_size=300, ask=189.52, ask_size=200) == 1
    assert await gw.send_tick("AAPL", price=189.51, size=50, volume=12345) == 1
    await until(lambda: ticker.last == 189.51, what="last")
    assert (ticker.bid, ticker.bidSize, ticker.ask, ticker.askSize) == (189.5, 300, 189.52, 200)
    assert (ticker.lastSize, ticker.volume) == (50, 12345)
    await gw.send_tick("AAPL", bid_size=400)  # a size alone is a tickSize
    await until(lambda: ticker.bidSize == 400, what="bid size")
    assert ticker.bid == 189.5

    (sub,) = gw.subscriptions[1]
    assert (sub.kind, sub.key, sub.con_id) == ("mktdata", "AAPL", 265598)
    ib.cancelMktData(aapl)
    await until(lambda: gw.subscriptions[1] == [], what="cancel")
    assert gw.cancelled == [(1, sub)]
    assert await gw.send_tick("AAPL", price=190.0) == 0


async def test_fx_future_and_index_ticks(gw: FakeGateway, connect: Connect) -> None:
    ib = await connect()
    contracts = await qualified(
        ib, Forex("EURUSD"), Future("ES", "202412", "CME"), Index("SPX", "CBOE")
    )
    fx, es, spx = (ib.reqMktData(c) for c in contracts)
    await subscribed(gw, 1, 3)
    await gw.send_tick("EUR.USD", bid=1.08515, ask=1.0852, bid_size=1e6, ask_size=2e6)
    await gw.send_tick("ES", price=6010.25, size=3)
    await gw.send_tick("SPX", price=6000.5)  # an index has a last with size 0
    await until(lambda: fx.ask == 1.0852 and es.last == 6010.25 and spx.last == 6000.5)
    assert (fx.bid, fx.bidSize, fx.askSize) == (1.08515, 1e6, 2e6)
    assert es.lastSize == 3


async def test_tick_by_tick_all_last_and_bid_ask(gw: FakeGateway, connect: Connect) -> None:
    ib = await connect()
    aapl, msft = await qualified(ib, Stock("AAPL", "SMART", "USD"), Stock("MSFT"))
    trades, quotes = ib.reqTickByTickData(aapl, "AllLast"), ib.reqTickByTickData(msft, "BidAsk")
    seen: list[Any] = []
    for ticker in (trades, quotes):
        ticker.updateEvent += lambda t: seen.extend(t.tickByTicks)
    await subscribed(gw, 1, 2)
    assert {(s.key, s.tick_type) for s in gw.subscriptions[1]} == {
        ("AAPL", "AllLast"),
        ("MSFT", "BidAsk"),
    }
    epoch = 1_733_150_000
    assert await gw.send_trade_tbt("AAPL", 189.51, 25, exchange="NASDAQ", epoch=epoch) == 1
    assert await gw.send_quote_tbt("MSFT", 420.1, 420.2, 100, 300, epoch=epoch) == 1
    await until(lambda: len(seen) >= 2, what="tick-by-tick")
    trade = next(t for t in seen if hasattr(t, "exchange"))
    quote = next(t for t in seen if hasattr(t, "bidPrice"))
    assert (trade.tickType, trade.price, trade.size, trade.exchange) == (2, 189.51, 25, "NASDAQ")
    assert (quote.bidPrice, quote.askPrice) == (420.1, 420.2)
    assert (quote.bidSize, quote.askSize) == (100, 300)
    assert (trades.last, trades.lastSize) == (189.51, 25)
    assert (quotes.bid, quotes.ask) == (420.1, 420.2)
    ib.cancelTickByTickData(aapl, "AllLast")
    await until(lambda: len(gw.subscriptions[1]) == 1, what="tbt cancel")
    assert await gw.send_trade_tbt("AAPL", 189.6, 1) == 0


async def test_drop_connections_then_reconnect(gw: FakeGateway, connect: Connect) -> None:
    ib = await connect(client_id=5)
    (aapl,) = await qualified(ib, Stock("AAPL", "SMART", "USD"))
    old = ib.reqMktData(aapl)
    await subscribed(gw, 5)
    dropped = asyncio.Event()
    ib.disconnectedEvent += dropped.set
    assert gw.drop_connections() == 1
    await asyncio.wait_for(dropped.wait(), 5)
    assert not ib.isConnected()
    assert ib.tickers() == []  # ib_async forgets every Ticker on a disconnect
    with pytest.raises(ConnectionError):
        ib.reqMktData(aapl)  # no reqId without a connection
    await ib.connectAsync("127.0.0.1", gw.port, clientId=5, timeout=5)
    assert ib.isConnected() and gw.client_ids == [5]
    # ib_async does not resubscribe after a reconnect: the adapter must
    await asyncio.sleep(0.1)
    assert gw.subscriptions == {5: []}
    ticker = ib.reqMktData(aapl)
    await subscribed(gw, 5)
    await gw.send_tick("AAPL", price=191.0, size=1)
    await until(lambda: ticker.last == 191.0, what="tick after reconnect")
    assert ticker is not old and old.last != 191.0  # a new Ticker object


async def test_pending_request_fails_on_drop(gw: FakeGateway, connect: Connect) -> None:
    ib = await connect()
    gw.leave_unanswered(9)
    ib.RequestTimeout = 0.2
    pending = asyncio.ensure_future(ib.qualifyContractsAsync(Stock("AAPL", "SMART", "USD")))
    await until(lambda: gw.messages(msg_id=9), what="the request")
    # RequestTimeout bounds only the blocking methods; an *Async call waits forever
    done, _ = await asyncio.wait([pending], timeout=0.5)
    assert not done
    gw.drop_connections()
    with pytest.raises(ConnectionError, match="Socket disconnect"):
        await asyncio.wait_for(pending, 5)
    gw.answer_again()
    await ib.connectAsync("127.0.0.1", gw.port, clientId=1, timeout=5)
    assert await ib.qualifyContractsAsync(Stock("AAPL", "SMART", "USD")) != [None]


async def test_client_id_in_use_fails_connect_while_another_id_connects(
    gw: FakeGateway, connect: Connect
) -> None:
    gw.client_id_in_use(7)
    ib = IB()
    errors = record_errors(ib)
    api_errors: list[str] = []
    ib.client.apiError += api_errors.append
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await ib.connectAsync("127.0.0.1", gw.port, clientId=7, timeout=1)
    assert time.monotonic() - started >= 0.9  # only the timeout ends it
    # the 326 and the closed socket are seen at once, but connect() waits for its timeout
    # (with timeout=None it never returns): an adapter should watch errorEvent for 326
    assert (-1, 326) in {(r, c) for r, c, _m, _ct in errors}
    assert "Peer closed connection. clientId 7 already in use?" in api_errors
    assert not ib.isConnected()
    other = await connect(client_id=8)
    assert other.isConnected() and gw.client_ids == [8]
    # a live connection's id is in use too, as on the real gateway
    with pytest.raises(TimeoutError):
        await IB().connectAsync("127.0.0.1", gw.port, clientId=8, timeout=1)
    assert other.isConnected()


async def test_10182_arrives_with_the_subscription_req_id(
    gw: FakeGateway, connect: Connect
) -> None:
    ib = await connect()
    errors = record_errors(ib)
    (aapl,) = await qualified(ib, Stock("AAPL", "SMART", "USD"))
    ticker = ib.reqMktData(aapl)
    await subscribed(gw, 1)
    (sub,) = gw.subscriptions[1]
    text = "Failed to request live updates (disconnected)."
    assert await gw.send_error(10182, text, req_id=sub.req_id) == 1
    await until(lambda: any(code == 10182 for _r, code, _m, _c in errors), what="10182")
    ((req_id, _code, msg, contract),) = [e for e in errors if e[1] == 10182]
    assert (req_id, msg) == (sub.req_id, text)
    assert contract == aapl
    assert ib.wrapper.reqId2Ticker[req_id] is ticker  # ib_async keeps the dead ticker
    # the stream is dead while the socket is up: no more ticks until re-requested
    assert gw.subscriptions[1] == [] and ib.isConnected()
    assert await gw.send_tick("AAPL", price=1.0) == 0


async def test_other_error_codes_reach_error_event(gw: FakeGateway, connect: Connect) -> None:
    ib = await connect()
    errors = record_errors(ib)
    codes = [1100, 1102, 2103, 2104, 1300, 162, 420, 100, 10189, 10190, 10197]
    for code in codes:
        await gw.send_error(code, f"message {code}", req_id=-1 if code > 1000 else 42)
    await until(lambda: len(errors) >= len(codes), what="errors")
    assert [c for _r, c, _m, _ct in errors] == codes
    assert errors[5][:3] == (42, 162, "message 162")


async def test_1100_stops_data_and_1101_drops_subscriptions(
    gw: FakeGateway, connect: Connect
) -> None:
    ib = await connect()
    (aapl,) = await qualified(ib, Stock("AAPL", "SMART", "USD"))
    ticker = ib.reqMktData(aapl)
    await subscribed(gw, 1)
    await gw.send_error(1100, "Connectivity between IB and Trader Workstation has been lost.")
    assert await gw.send_tick("AAPL", price=1.0) == 0
    await gw.send_error(1102, "Connectivity restored - data maintained.")
    assert await gw.send_tick("AAPL", price=2.0, size=1) == 1
    await until(lambda: ticker.last == 2.0)
    await gw.send_error(1101, "Connectivity restored - data lost.")
    assert gw.subscriptions == {1: []} and ib.isConnected()


async def test_silence_and_stop_ticks_keep_the_socket_up(gw: FakeGateway, connect: Connect) -> None:
    ib = await connect()
    aapl, msft = await qualified(ib, Stock("AAPL", "SMART", "USD"), Stock("MSFT"))
    ta, tm = ib.reqMktData(aapl), ib.reqMktData(msft)
    await subscribed(gw, 1, 2)
    gw.silence("AAPL")
    assert await gw.send_tick("AAPL", price=1.0, size=1) == 0
    assert await gw.send_tick("MSFT", price=2.0, size=1) == 1
    await until(lambda: tm.last == 2.0)
    assert ta.last != 1.0 and ib.isConnected()
    gw.stop_ticks()
    assert await gw.send_tick("MSFT", price=3.0, size=1) == 0
    gw.resume_ticks()
    gw.unsilence("AAPL")
    assert await gw.send_tick("AAPL", price=4.0, size=1) == 1
    await until(lambda: ta.last == 4.0)
    assert len(gw.subscriptions[1]) == 2


async def test_delayed_market_data(gw: FakeGateway, connect: Connect) -> None:
    ib = await connect()
    errors = record_errors(ib)
    aapl, msft = await qualified(ib, Stock("AAPL", "SMART", "USD"), Stock("MSFT"))
    live = ib.reqMktData(msft)
    await subscribed(gw, 1)
    await until(lambda: live.marketDataType == 1)
    ib.reqMarketDataType(3)
    await gw.set_market_data_type(3)
    # an open subscription is told of the downgrade
    await until(lambda: live.marketDataType == 3, what="downgrade of the open subscription")
    delayed = ib.reqMktData(aapl)
    await subscribed(gw, 1, 2)
    await until(lambda: delayed.marketDataType == 3, what="delayed marketDataType")
    await until(lambda: len([e for e in errors if e[1] == 10167]) >= 2, what="10167")
    assert gw.messages(msg_id=59)[-1].fields == ("59", "1", "3")
    await gw.send_tick("AAPL", bid=1.5, bid_size=10, ask=1.6, ask_size=20, price=1.55, size=5)
    # delayed tick types 66-71 land in the same Ticker fields as the live ones
    await until(lambda: delayed.last == 1.55, what="delayed last")
    assert (delayed.bid, delayed.bidSize, delayed.ask, delayed.askSize) == (1.5, 10, 1.6, 20)
    assert {t.tickType for t in delayed.ticks} <= {66, 67, 68}
    assert delayed.ticks  # the last network read carried the delayed ticks
    sent_codes = [code for _cid, _req, code, _msg in gw.errors_sent]
    assert sent_codes.count(10167) == 2


async def test_message_log_timestamps_and_rate(gw: FakeGateway, connect: Connect) -> None:
    ib = await connect(client_id=4)
    before = len(gw.received)
    for _ in range(60):
        ib.reqMarketDataType(1)
    await until(lambda: len(gw.messages(msg_id=59, client_id=4)) == 60, what="60 messages")
    sent = gw.messages(msg_id=59, client_id=4)
    times = [m.time for m in gw.received]
    assert times == sorted(times) and len(gw.received) >= before + 60
    # ib_async throttles itself to bursts of 45 requests per second (IB allows 50): 45 go out
    # at once and the next only a full second after the first. A receiver's sliding window of
    # exactly 1 s can still hold more than 45 (up to 90) because of arrival jitter.
    # (the startup requests of connect() count against the same budget)
    assert sent[-1].time - sent[0].time >= 0.9
    assert 38 <= gw.max_rate(0.9, client_id=4) <= 45


async def test_pacing_limit_answers_error_100() -> None:
    async with FakeGateway(pacing_limit=50) as gateway:
        ib = IB()
        errors = record_errors(ib)
        await ib.connectAsync("127.0.0.1", gateway.port, clientId=1, timeout=5)
        try:
            ib.client.MaxRequests = 0  # no client-side throttle
            for _ in range(60):
                ib.reqMarketDataType(1)
            await until(lambda: any(code == 100 for _r, code, _m, _c in errors), what="100")
            assert gateway.max_rate(1.0, client_id=1) > 50
        finally:
            ib.disconnect()


async def test_refuse_connections(gw: FakeGateway) -> None:
    ib = IB()
    gw.refuse_connections()
    with pytest.raises(ConnectionRefusedError):
        await ib.connectAsync("127.0.0.1", gw.port, clientId=1, timeout=2)
    await gw.accept_connections()
    gw.refuse_connections(mode="close")  # accept, then close at once
    with pytest.raises(TimeoutError):
        await ib.connectAsync("127.0.0.1", gw.port, clientId=1, timeout=0.5)
    gw.refuse_connections(seconds=0.3)
    assert not gw.listening
    await until(lambda: gw.listening, what="listening again")
    await ib.connectAsync("127.0.0.1", gw.port, clientId=1, timeout=5)
    assert ib.isConnected()
    ib.disconnect()


async def test_survives_broken_clients(gw: FakeGateway, connect: Connect) -> None:
    def frame(*fields: str) -> bytes:
        payload = "".join(f + "\0" for f in fields).encode()
        return struct.pack(">I", len(payload)) + payload

    # a client that closes mid-message
    _, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"API\0" + frame("v157..178")[:-3])
    await writer.drain()
    writer.close()
    # a client that sends unknown requests and a garbage message, then a valid one
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"API\0" + frame("v157..178"))
    length = struct.unpack(">I", await reader.readexactly(4))[0]
    version = (await reader.readexactly(length)).split(b"\0")[0]
    assert version == str(SERVER_VERSION).encode()
    writer.write(frame("71", "2", "99", "") + frame("999", "1") + frame("x") + frame("49", "1"))
    await writer.drain()
    await until(lambda: any(m.msg_id == 49 for m in gw.received), what="reqCurrentTime")
    writer.close()
    # the gateway still serves a real client
    ib = await connect(client_id=2)
    assert await ib.reqCurrentTimeAsync() is not None


async def test_ticker_is_keyed_by_contract(gw: FakeGateway, connect: Connect) -> None:
    ib = await connect()
    (aapl,) = await qualified(ib, Stock("AAPL", "SMART", "USD"))
    ticker = ib.reqMktData(aapl)
    assert isinstance(ticker, Ticker)
    await subscribed(gw, 1)
    await gw.send_tick("AAPL", bid=10.0, bid_size=1)
    # a second subscriber gets the last known state at once, as a gateway does
    ib2 = await connect(client_id=2)
    t2 = ib2.reqMktData(aapl)
    await until(lambda: t2.bid == 10.0, what="state replayed to the new subscriber")
    assert ticker.bid == 10.0


async def test_snapshot_gets_the_last_values_and_ends(gw: FakeGateway, connect: Connect) -> None:
    ib = await connect()
    (msft,) = await qualified(ib, Stock("MSFT", "SMART", "USD"))
    await gw.send_tick("MSFT", bid=420.1, bid_size=5, ask=420.2, ask_size=6, price=420.15, size=1)
    (ticker,) = await asyncio.wait_for(ib.reqTickersAsync(msft), 5)
    assert (ticker.bid, ticker.ask, ticker.last) == (420.1, 420.2, 420.15)
    assert gw.subscriptions == {1: []}  # a snapshot is no subscription


async def test_subscription_caps() -> None:
    async with FakeGateway(max_tickers=1, max_tick_by_tick=1) as gateway:
        ib = IB()
        errors = record_errors(ib)
        await ib.connectAsync("127.0.0.1", gateway.port, clientId=1, timeout=5)
        try:
            aapl, msft = await qualified(ib, Stock("AAPL", "SMART", "USD"), Stock("MSFT"))
            ib.reqMktData(aapl)
            ib.reqMktData(msft)
            ib.reqTickByTickData(aapl, "AllLast")
            ib.reqTickByTickData(msft, "BidAsk")
            await until(lambda: {101, 10190} <= {code for _r, code, _m, _c in errors})
            assert {(s.kind, s.key) for s in gateway.subscriptions[1]} == {
                ("mktdata", "AAPL"),
                ("tbt", "AAPL"),
            }
        finally:
            ib.disconnect()
