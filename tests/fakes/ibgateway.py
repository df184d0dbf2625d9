"""A fake Interactive Brokers gateway speaking the TWS API socket protocol, for tests only.

It answers as a gateway of server version ``SERVER_VERSION`` (178, the highest that ib_async
2.x asks for), so the real ib_async client can be driven end to end over loopback. See
``tests/fakes/README.md`` for what it speaks and how a test uses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Literal, Self

log = logging.getLogger("tests.fakes.ibgateway")

SERVER_VERSION = 178
MIN_CLIENT_VERSION = 157
ACCOUNT = "DU1234567"
MAX_MESSAGE = 16 * 1024 * 1024

# incoming message ids (client -> gateway)
REQ_MKT_DATA = 1
CANCEL_MKT_DATA = 2
REQ_OPEN_ORDERS = 5
REQ_ACCOUNT_UPDATES = 6
REQ_EXECUTIONS = 7
REQ_IDS = 8
REQ_CONTRACT_DETAILS = 9
REQ_AUTO_OPEN_ORDERS = 15
REQ_CURRENT_TIME = 49
REQ_MARKET_DATA_TYPE = 59
REQ_POSITIONS = 61
CANCEL_POSITIONS = 64
START_API = 71
REQ_ACCOUNT_UPDATES_MULTI = 76
CANCEL_ACCOUNT_UPDATES_MULTI = 77
REQ_TICK_BY_TICK = 97
CANCEL_TICK_BY_TICK = 98
REQ_COMPLETED_ORDERS = 99

# outgoing message ids (gateway -> client)
TICK_PRICE = 1
TICK_SIZE = 2
ERR_MSG = 4
UPDATE_ACCOUNT_VALUE = 6
NEXT_VALID_ID = 9
CONTRACT_DATA = 10
MANAGED_ACCOUNTS = 15
CURRENT_TIME = 49
CONTRACT_DATA_END = 52
OPEN_ORDER_END = 53
ACCOUNT_DOWNLOAD_END = 54
EXECUTION_DATA_END = 55
TICK_SNAPSHOT_END = 57
MARKET_DATA_TYPE = 58
POSITION_END = 62
ACCOUNT_UPDATE_MULTI_END = 74
TICK_BY_TICK = 99
COMPLETED_ORDERS_END = 102

# tick types: live and delayed (reqMktData), and tick-by-tick kinds (reqTickByTickData)
LIVE_TICKS = {"bid": 1, "ask": 2, "last": 4, "high": 6, "low": 7, "close": 9, "open": 14}
LIVE_SIZES = {"bid_size": 0, "ask_size": 3, "size": 5, "volume": 8}
DELAYED_TICKS = {"bid": 66, "ask": 67, "last": 68, "high": 72, "low": 73, "close": 75, "open": 76}
DELAYED_SIZES = {"bid_size": 69, "ask_size": 70, "size": 71, "volume": 74}
TBT_TYPES = {"Last": 1, "AllLast": 2, "BidAsk": 3, "MidPoint": 4}
MARKET_DATA_TYPES = {1: "live", 2: "frozen", 3: "delayed", 4: "delayed frozen"}

# errors after which the gateway no longer serves that subscription
TERMINAL_CODES = frozenset({200, 354, 10182, 10189, 10190})

MSG_NO_SECDEF = "No security definition has been found for the request"
MSG_CLIENT_ID_IN_USE = (
    "Unable to connect as the client id is already in use. Retry with a unique client id."
)
MSG_DELAYED = "Requested market data is not subscribed. Displaying delayed market data."
MSG_MAX_TICKERS = "Max number of tickers has been reached"
MSG_TBT_CAP = "Max number of tick-by-tick requests has been reached."
MSG_PACING = "Max rate of messages per second has been exceeded:max=50 rec=%d (3)"

Field = str | int | float | bool | None
SubKind = Literal["mktdata", "tbt"]


@dataclass(frozen=True)
class FakeContract:
    """One instrument the fake knows, with the fields contractDetails carries."""

    symbol: str
    sec_type: str
    exchange: str
    currency: str
    con_id: int
    primary_exchange: str = ""
    local_symbol: str = ""
    trading_class: str = ""
    last_trade_date: str = ""
    contract_month: str = ""
    multiplier: str = ""
    long_name: str = ""
    min_tick: float = 0.01
    time_zone: str = "US/Eastern"

    @property
    def key(self) -> str:
        """The name tests use for it: the local symbol for FX (EUR.USD), else the symbol."""
        return self.local_symbol if self.sec_type == "CASH" else self.symbol


def default_contracts() -> list[FakeContract]:
    """The registry a FakeGateway starts with: three stocks, an FX pair, a future, an index."""
    return [
        FakeContract(
            "AAPL", "STK", "SMART", "USD", 265598, "NASDAQ", "AAPL", "NMS", long_name="APPLE INC"
        ),
        FakeContract(
            "MSFT", "STK", "SMART", "USD", 272093, "NASDAQ", "MSFT", "NMS", long_name="MICROSOFT"
        ),
        FakeContract(
            "BRK B",
            "STK",
            "SMART",
            "USD",
            72063691,
            "NYSE",
            "BRK B",
            "BRK B",
            long_name="BERKSHIRE HATHAWAY INC-CL B",
        ),
        FakeContract(
            "EUR",
            "CASH",
            "IDEALPRO",
            "USD",
            12087792,
            "",
            "EUR.USD",
            "EUR.USD",
            long_name="European Monetary Union Euro",
            min_tick=0.00005,
            time_zone="US/Eastern",
        ),
        FakeContract(
            "ES",
            "FUT",
            "CME",
            "USD",
            495512563,
            "",
            "ESZ4",
            "ES",
            last_trade_date="20241220",
            contract_month="202412",
            multiplier="50",
            long_name="E-mini S&P 500",
            min_tick=0.25,
            time_zone="US/Central",
        ),
        FakeContract(
            "SPX", "IND", "CBOE", "USD", 416904, "", "SPX", "SPX", long_name="S&P 500 Stock Index"
        ),
    ]


@dataclass(frozen=True)
class Received:
    """One message a client sent, with the gateway's monotonic receive time."""

    time: float
    conn_id: int
    client_id: int | None
    fields: tuple[str, ...]

    @property
    def msg_id(self) -> int | None:
        """The message id (first field), or None for the handshake's version string."""
        first = self.fields[0] if self.fields else ""
        return int(first) if first.isdigit() else None


@dataclass(frozen=True)
class Subscription:
    """A live market-data (reqMktData) or tick-by-tick subscription of one connection."""

    kind: SubKind
    req_id: int
    con_id: int
    key: str
    tick_type: str = ""  # tick-by-tick: Last, AllLast, BidAsk, MidPoint
    generic_ticks: str = ""


@dataclass
class _Conn:
    """The state of one client socket."""

    conn_id: int
    writer: asyncio.StreamWriter
    server_version: int = 0
    client_id: int | None = None
    ready: bool = False
    requested_market_data_type: int = 1
    subs: dict[tuple[SubKind, int], Subscription] = field(default_factory=dict)
    recent: list[float] = field(default_factory=list)

    def send(self, *fields: Field) -> None:
        """Frame and write one message; a closed socket is ignored."""
        self.send_many([fields])

    def send_many(self, messages: Iterable[Sequence[Field]]) -> None:
        """Frame several messages and write them at once (one network read for the client)."""
        data = b"".join(_frame(msg) for msg in messages)
        if data and not self.writer.is_closing():
            self.writer.write(data)


def _text(value: Field) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def _frame(fields: Sequence[Field]) -> bytes:
    payload = "".join(_text(f) + "\0" for f in fields).encode()
    return struct.pack(">I", len(payload)) + payload


def _parse_versions(text: str) -> tuple[int, int]:
    """Parse the client's ``v157..178`` (optionally followed by connect options)."""
    spec = text.split(" ", 1)[0].lstrip("v")
    low, _, high = spec.partition("..")
    return int(low), int(high or low)


class FakeGateway:
    """An asyncio TCP server on 127.0.0.1 that answers like IB Gateway, with fault injection."""

    def __init__(
        self,
        contracts: Iterable[FakeContract] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        account: str = ACCOUNT,
        server_version: int = SERVER_VERSION,
        farm_messages: bool = True,
        replay_on_subscribe: bool = True,
        max_tickers: int | None = None,
        max_tick_by_tick: int | None = None,
        pacing_limit: int | None = None,
    ) -> None:
        """Configure the fake; nothing listens until ``start()`` (or ``async with``)."""
        self.host = host
        self.port = port
        self.account = account
        self.server_version = server_version
        self.farm_messages = farm_messages
        self.replay_on_subscribe = replay_on_subscribe
        self.max_tickers = max_tickers
        self.max_tick_by_tick = max_tick_by_tick
        self.pacing_limit = pacing_limit
        self.contracts: dict[int, FakeContract] = {}
        for contract in default_contracts() if contracts is None else contracts:
            self.add_contract(contract)
        self.received: list[Received] = []
        self.cancelled: list[tuple[int | None, Subscription]] = []
        self.errors_sent: list[tuple[int | None, int, int, str]] = []
        self.connections_accepted = 0
        self.market_data_type = 1
        self._server: asyncio.Server | None = None
        self._conns: dict[int, _Conn] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._next_conn_id = 0
        self._next_order_id = 1
        self._rejected: set[str] = set()
        self._silenced: set[str] = set()
        self._ticks_stopped = False
        self._refuse_mode: Literal["close", "unlisten"] | None = None
        self._reopen: asyncio.TimerHandle | None = None
        self._ids_in_use: set[int] = set()
        self._state: dict[int, dict[str, float]] = {}
        self._unanswered: set[int] = set()
        self._dead: set[tuple[int, SubKind, int]] = set()  # (conn, kind, reqId): streams that died

    # lifecycle

    async def start(self) -> Self:
        """Listen on host:port (port 0 picks a free one, then ``self.port`` holds it)."""
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Stop listening and close every client socket."""
        if self._reopen:
            self._reopen.cancel()
            self._reopen = None
        if self._server:
            self._server.close()
            self._server = None
        self.drop_connections()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> Self:
        """Start the gateway."""
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the gateway."""
        await self.stop()

    # registry

    def add_contract(self, contract: FakeContract) -> None:
        """Teach the gateway an instrument (replaces one with the same conId)."""
        self.contracts[contract.con_id] = contract

    def contract(self, key: str | int) -> FakeContract:
        """The known contract for a key (EUR.USD, AAPL, ES), a symbol or a conId."""
        for c in self.contracts.values():
            if key in (c.con_id, c.key):
                return c
        matches = [c for c in self.contracts.values() if key in (c.symbol, c.local_symbol)]
        if len(matches) != 1:
            raise KeyError(f"no single contract for {key!r}: {matches}")
        return matches[0]

    def _match(self, fields: Sequence[str]) -> list[FakeContract]:
        """Contracts matching the 12 contract fields a client sends (conId first)."""
        con_id, symbol, sec_type, expiry, _strike, _right, _mult, exchange = fields[:8]
        primary, currency, local_symbol = fields[8:11]
        if con_id and int(con_id) > 0:
            known = self.contracts.get(int(con_id))
            return [known] if known else []
        found = []
        for c in self.contracts.values():
            if symbol and symbol.upper() != c.symbol.upper():
                continue
            if local_symbol and local_symbol.upper() != c.local_symbol.upper():
                continue
            if not symbol and not local_symbol:
                continue
            if sec_type and sec_type != c.sec_type:
                continue
            if currency and currency != c.currency:
                continue
            if exchange and exchange not in (c.exchange, c.primary_exchange):
                continue
            if primary and primary != c.primary_exchange:
                continue
            if expiry and not (c.last_trade_date.startswith(expiry) or c.contract_month == expiry):
                continue
            found.append(c)
        return found

    # views for tests

    @property
    def subscriptions(self) -> dict[int | None, list[Subscription]]:
        """What each live connection (by client id) is subscribed to right now."""
        return {
            conn.client_id: list(conn.subs.values()) for conn in self._conns.values() if conn.ready
        }

    @property
    def client_ids(self) -> list[int]:
        """Client ids of the connections that completed startApi and are still open."""
        return [c.client_id for c in self._conns.values() if c.ready and c.client_id is not None]

    def messages(self, msg_id: int | None = None, client_id: int | None = None) -> list[Received]:
        """Received messages, optionally only of one message id and/or one client id."""
        return [
            m
            for m in self.received
            if (msg_id is None or m.msg_id == msg_id)
            and (client_id is None or m.client_id == client_id)
        ]

    def max_rate(self, window: float = 1.0, client_id: int | None = None) -> int:
        """The most messages received from a client (or all) within any ``window`` seconds."""
        times = [m.time for m in self.messages(client_id=client_id)]
        best, start = 0, 0
        for end, t in enumerate(times):
            while t - times[start] >= window:
                start += 1
            best = max(best, end - start + 1)
        return best

    # fault injection

    def drop_connections(self) -> int:
        """Close every client socket (as a gateway restart would); returns how many."""
        conns = list(self._conns.values())
        for conn in conns:
            self._close(conn)
        return len(conns)

    def refuse_connections(
        self, seconds: float | None = None, mode: Literal["close", "unlisten"] = "unlisten"
    ) -> None:
        """Refuse new clients: stop listening (``unlisten``) or accept and close (``close``)."""
        self._refuse_mode = mode
        if mode == "unlisten" and self._server:
            self._server.close()
            self._server = None
        if self._reopen:
            self._reopen.cancel()
            self._reopen = None
        if seconds is not None:
            loop = asyncio.get_running_loop()
            self._reopen = loop.call_later(seconds, lambda: self._spawn(self.accept_connections()))

    async def accept_connections(self) -> None:
        """Undo ``refuse_connections``: listen again on the same port."""
        self._refuse_mode = None
        self._reopen = None
        if self._server is None:
            self._server = await asyncio.start_server(self._handle, self.host, self.port)

    @property
    def listening(self) -> bool:
        """Whether the gateway listens for new clients (see ``refuse_connections``)."""
        return self._server is not None and self._refuse_mode is None

    def leave_unanswered(self, *msg_ids: int) -> None:
        """Record but never answer requests of these message ids (e.g. 9, contract details)."""
        self._unanswered.update(msg_ids)

    def answer_again(self, *msg_ids: int) -> None:
        """Undo ``leave_unanswered`` for these message ids (all of them when none are given)."""
        if msg_ids:
            self._unanswered.difference_update(msg_ids)
        else:
            self._unanswered.clear()

    def client_id_in_use(self, client_id: int) -> None:
        """Answer startApi for this client id with error 326 and close, as the gateway does."""
        self._ids_in_use.add(client_id)

    def release_client_id(self, client_id: int) -> None:
        """Undo ``client_id_in_use``."""
        self._ids_in_use.discard(client_id)

    def reject_symbol(self, key: str) -> None:
        """Answer contract details and market data for this symbol with error 200."""
        self._rejected.add(key.upper())

    def accept_symbol(self, key: str) -> None:
        """Undo ``reject_symbol``."""
        self._rejected.discard(key.upper())

    def silence(self, key: str) -> None:
        """Stop ticks for one contract; the socket and the subscription stay up."""
        self._silenced.add(self.contract(key).key)

    def unsilence(self, key: str) -> None:
        """Undo ``silence``."""
        self._silenced.discard(self.contract(key).key)

    def kill_streams(self, key: str | None = None) -> int:
        """The open subscriptions (of one contract, or all) die silently: no ticks, no error.

        The socket and the subscriptions stay up, as after a farm flap; a new request for the
        same contract (a resubscription) is served again. Returns how many died.
        """
        con_id = None if key is None else self.contract(key).con_id
        killed = 0
        for conn in self._ready(None):
            for sub in conn.subs.values():
                if con_id is None or sub.con_id == con_id:
                    self._dead.add((conn.conn_id, sub.kind, sub.req_id))
                    killed += 1
        return killed

    def stop_ticks(self) -> None:
        """Stop all ticks (``send_tick`` and friends deliver nothing); sockets stay up."""
        self._ticks_stopped = True

    def resume_ticks(self) -> None:
        """Undo ``stop_ticks`` (silenced symbols stay silent)."""
        self._ticks_stopped = False

    async def send_error(
        self,
        code: int,
        message: str = "",
        req_id: int = -1,
        client_id: int | None = None,
        *,
        effects: bool = True,
    ) -> int:
        """Send error ``code`` to every ready client (or one); returns how many got it.

        With ``effects`` the gateway also acts on it: a code in TERMINAL_CODES ends the
        subscription with that reqId, 1100 stops ticks, 1102 resumes them, and 1101 resumes
        them with every subscription gone (the data was lost; clients must resubscribe).
        """
        sent = 0
        for conn in self._ready(client_id):
            self._send_error(conn, req_id, code, message or f"fake error {code}")
            if effects and code in TERMINAL_CODES:
                conn.subs.pop(("mktdata", req_id), None)
                conn.subs.pop(("tbt", req_id), None)
            if effects and code == 1101:
                conn.subs.clear()
            sent += 1
        if effects and code == 1100:
            self._ticks_stopped = True
        if effects and code in (1101, 1102):
            self._ticks_stopped = False
        await self._drain()
        return sent

    async def set_market_data_type(self, market_data_type: int) -> None:
        """Serve this market data type (1 live, 2 frozen, 3 delayed, 4 delayed frozen).

        Open subscriptions are told (10167 for a delayed type, then marketDataType), and ticks
        then use the delayed tick types 66-76 for types 3 and 4, as a real gateway does.
        """
        if market_data_type not in MARKET_DATA_TYPES:
            raise ValueError(f"market data type must be 1-4, not {market_data_type}")
        self.market_data_type = market_data_type
        for conn in self._ready(None):
            for sub in conn.subs.values():
                if sub.kind == "mktdata":
                    self._announce_type(conn, sub.req_id)
        await self._drain()

    # data

    async def send_tick(
        self,
        key: str | int,
        *,
        price: float | None = None,
        size: float | None = None,
        bid: float | None = None,
        ask: float | None = None,
        bid_size: float | None = None,
        ask_size: float | None = None,
        volume: float | None = None,
        high: float | None = None,
        low: float | None = None,
        close: float | None = None,
        open_: float | None = None,
    ) -> int:
        """Push tickPrice/tickSize to every reqMktData subscriber of a contract.

        A price goes out as tickPrice carrying its size (bid with bid_size, ask with ask_size,
        last with size); a price sent without its size reuses the last size sent for it (else
        1 for bid/ask, since ib_async shows a bid or ask of size 0 as an empty side, and 0 for
        last). A size alone goes out as tickSize. Returns how many subscriptions got it (0 when
        ticks are stopped or the contract is silenced).
        """
        contract = self.contract(key)
        values = {
            "last": price,
            "size": size,
            "bid": bid,
            "ask": ask,
            "bid_size": bid_size,
            "ask_size": ask_size,
            "volume": volume,
            "high": high,
            "low": low,
            "close": close,
            "open": open_,
        }
        update = {name: v for name, v in values.items() if v is not None}
        self._state.setdefault(contract.con_id, {}).update(update)
        if not self._flowing(contract):
            return 0
        delivered = 0
        state = self._state[contract.con_id]
        for conn, sub in self._subscribers(contract, "mktdata"):
            conn.send_many(self._tick_messages(sub.req_id, update, state))
            delivered += 1
        await self._drain()
        return delivered

    async def send_trade_tbt(
        self,
        key: str | int,
        price: float,
        size: float,
        *,
        exchange: str = "",
        special_conditions: str = "",
        epoch: int | None = None,
        past_limit: bool = False,
        unreported: bool = False,
    ) -> int:
        """Push a tick-by-tick trade to every Last/AllLast subscriber; returns how many."""
        contract = self.contract(key)
        if not self._flowing(contract):
            return 0
        mask = int(past_limit) | int(unreported) << 1
        when = int(time.time()) if epoch is None else epoch
        delivered = 0
        for conn, sub in self._subscribers(contract, "tbt"):
            if sub.tick_type in ("Last", "AllLast"):
                tick_type = TBT_TYPES[sub.tick_type]
                fields = (price, size, mask, exchange, special_conditions)
                conn.send(TICK_BY_TICK, sub.req_id, tick_type, when, *fields)
                delivered += 1
        await self._drain()
        return delivered

    async def send_quote_tbt(
        self,
        key: str | int,
        bid: float,
        ask: float,
        bid_size: float,
        ask_size: float,
        *,
        epoch: int | None = None,
        bid_past_low: bool = False,
        ask_past_high: bool = False,
    ) -> int:
        """Push a tick-by-tick bid/ask to every BidAsk subscriber; returns how many."""
        contract = self.contract(key)
        if not self._flowing(contract):
            return 0
        mask = int(bid_past_low) | int(ask_past_high) << 1
        when = int(time.time()) if epoch is None else epoch
        delivered = 0
        for conn, sub in self._subscribers(contract, "tbt"):
            if sub.tick_type == "BidAsk":
                fields = (bid, ask, bid_size, ask_size, mask)
                conn.send(TICK_BY_TICK, sub.req_id, 3, when, *fields)
                delivered += 1
        await self._drain()
        return delivered

    async def send_midpoint_tbt(self, key: str | int, midpoint: float) -> int:
        """Push a tick-by-tick midpoint to every MidPoint subscriber; returns how many."""
        contract = self.contract(key)
        if not self._flowing(contract):
            return 0
        delivered = 0
        for conn, sub in self._subscribers(contract, "tbt"):
            if sub.tick_type == "MidPoint":
                conn.send(TICK_BY_TICK, sub.req_id, 4, int(time.time()), midpoint)
                delivered += 1
        await self._drain()
        return delivered

    # internals: connections

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _ready(self, client_id: int | None) -> list[_Conn]:
        return [
            c
            for c in self._conns.values()
            if c.ready and (client_id is None or c.client_id == client_id)
        ]

    def _close(self, conn: _Conn) -> None:
        self._conns.pop(conn.conn_id, None)
        with contextlib.suppress(Exception):
            conn.writer.close()

    async def _drain(self) -> None:
        for conn in list(self._conns.values()):
            with contextlib.suppress(ConnectionError, RuntimeError):
                await conn.writer.drain()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self.connections_accepted += 1
        if self._refuse_mode is not None:
            writer.close()
            return
        self._next_conn_id += 1
        conn = _Conn(self._next_conn_id, writer)
        self._conns[conn.conn_id] = conn
        try:
            await self._serve(conn, reader)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            log.info("fake gateway: connection %d ended: %r", conn.conn_id, exc)
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("fake gateway: connection %d failed", conn.conn_id)
        finally:
            self._close(conn)

    async def _serve(self, conn: _Conn, reader: asyncio.StreamReader) -> None:
        magic = await reader.readexactly(4)
        if magic != b"API\0":
            log.warning("fake gateway: bad handshake prefix %r", magic)
            return
        first = await self._read(conn, reader)
        low, high = _parse_versions(first[0])
        version = min(high, self.server_version)
        if version < max(low, MIN_CLIENT_VERSION):
            log.warning("fake gateway: no common version with client %s", first[0])
            return
        conn.server_version = version
        stamp = datetime.now(UTC).strftime("%Y%m%d %H:%M:%S UTC")
        conn.send(version, stamp)
        await conn.writer.drain()
        while True:
            fields = await self._read(conn, reader)
            if not fields or not fields[0].isdigit():
                log.warning("fake gateway: ignoring malformed message %r", fields)
                continue
            if self._pacing_exceeded(conn):
                continue
            msg_id = int(fields[0])
            if not conn.ready and msg_id != START_API:
                log.info("fake gateway: ignoring request %d before startApi", msg_id)
                continue
            if msg_id in self._unanswered:
                log.info("fake gateway: leaving request %d unanswered", msg_id)
                continue
            handler = self._handlers.get(msg_id)
            if handler is None:
                log.info("fake gateway: ignoring unsupported request %s", fields[0])
                continue
            try:
                handler(self, conn, fields)
            except (ValueError, IndexError):
                log.exception("fake gateway: cannot decode %r", fields)
            await conn.writer.drain()
            if conn.conn_id not in self._conns:
                return

    async def _read(self, conn: _Conn, reader: asyncio.StreamReader) -> list[str]:
        (length,) = struct.unpack(">I", await reader.readexactly(4))
        if length > MAX_MESSAGE:
            raise ConnectionError(f"message of {length} bytes")
        payload = await reader.readexactly(length)
        fields = payload.decode(errors="replace").split("\0")
        if fields and fields[-1] == "":
            fields.pop()
        now = time.monotonic()
        self.received.append(Received(now, conn.conn_id, conn.client_id, tuple(fields)))
        conn.recent.append(now)
        return fields

    def _pacing_exceeded(self, conn: _Conn) -> bool:
        if self.pacing_limit is None:
            return False
        now = conn.recent[-1]
        conn.recent = [t for t in conn.recent if now - t < 1.0]
        if len(conn.recent) <= self.pacing_limit:
            return False
        self._send_error(conn, -1, 100, MSG_PACING % len(conn.recent))
        return True

    def _send_error(self, conn: _Conn, req_id: int, code: int, message: str) -> None:
        fields: list[Field] = [ERR_MSG, 2, req_id, code, message]
        if conn.server_version >= 166:
            fields.append("")  # advancedOrderRejectJson
        conn.send(*fields)
        self.errors_sent.append((conn.client_id, req_id, code, message))

    # internals: requests

    def _on_start_api(self, conn: _Conn, fields: list[str]) -> None:
        client_id = int(fields[2])
        taken = client_id in self._ids_in_use or client_id in self.client_ids
        if taken:
            self._send_error(conn, -1, 326, MSG_CLIENT_ID_IN_USE)
            self._close(conn)
            return
        conn.client_id = client_id
        conn.ready = True
        conn.send_many([[MANAGED_ACCOUNTS, 1, self.account], [NEXT_VALID_ID, 1, self._order_id()]])
        if self.farm_messages:
            for code, text in (
                (2104, "Market data farm connection is OK:usfarm"),
                (2106, "HMDS data farm connection is OK:ushmds"),
                (2158, "Sec-def data farm connection is OK:secdefnj"),
            ):
                self._send_error(conn, -1, code, text)

    def _order_id(self) -> int:
        self._next_order_id += 1
        return self._next_order_id - 1

    def _on_positions(self, conn: _Conn, fields: list[str]) -> None:
        conn.send(POSITION_END, 1)

    def _on_open_orders(self, conn: _Conn, fields: list[str]) -> None:
        conn.send(OPEN_ORDER_END, 1)

    def _on_completed_orders(self, conn: _Conn, fields: list[str]) -> None:
        conn.send(COMPLETED_ORDERS_END)

    def _on_account_updates(self, conn: _Conn, fields: list[str]) -> None:
        if fields[2] == "1":
            acct = fields[3] or self.account
            conn.send_many(
                [
                    [UPDATE_ACCOUNT_VALUE, 2, "NetLiquidation", "1000000.00", "USD", acct],
                    [ACCOUNT_DOWNLOAD_END, 1, acct],
                ]
            )

    def _on_account_updates_multi(self, conn: _Conn, fields: list[str]) -> None:
        conn.send(ACCOUNT_UPDATE_MULTI_END, 1, int(fields[2]))

    def _on_executions(self, conn: _Conn, fields: list[str]) -> None:
        conn.send(EXECUTION_DATA_END, 1, int(fields[2]))

    def _on_req_ids(self, conn: _Conn, fields: list[str]) -> None:
        conn.send(NEXT_VALID_ID, 1, self._order_id())

    def _on_current_time(self, conn: _Conn, fields: list[str]) -> None:
        conn.send(CURRENT_TIME, 1, int(time.time()))

    def _on_market_data_type(self, conn: _Conn, fields: list[str]) -> None:
        conn.requested_market_data_type = int(fields[2])

    def _rejects(self, contract: FakeContract | None) -> bool:
        if contract is None:
            return True
        names = {contract.key.upper(), contract.symbol.upper(), contract.local_symbol.upper()}
        return bool(names & self._rejected)

    def _on_contract_details(self, conn: _Conn, fields: list[str]) -> None:
        req_id = int(fields[2])
        found = [c for c in self._match(fields[3:15]) if not self._rejects(c)]
        if not found:
            self._send_error(conn, req_id, 200, MSG_NO_SECDEF)
            return
        messages = [self._contract_details(req_id, c) for c in found]
        messages.append([CONTRACT_DATA_END, 1, req_id])
        conn.send_many(messages)

    def _contract_details(self, req_id: int, c: FakeContract) -> list[Field]:
        """contractDetails (10) in the layout of server versions 164..178 (no version field)."""
        order_types = "LMT,MKT,STP,STPLMT,TRAIL"
        hours = "20241202:0930-20241202:1600;20241203:0930-20241203:1600"
        return [
            CONTRACT_DATA,
            req_id,
            c.symbol,
            c.sec_type,
            c.last_trade_date,
            0,  # strike
            "",  # right
            c.exchange,
            c.currency,
            c.local_symbol,
            c.trading_class,  # marketName
            c.trading_class,
            c.con_id,
            c.min_tick,
            c.multiplier,
            order_types,
            f"{c.exchange},{c.primary_exchange}" if c.primary_exchange else c.exchange,
            1,  # priceMagnifier
            0,  # underConId
            c.long_name,
            c.primary_exchange,
            c.contract_month,
            "",  # industry
            "",  # category
            "",  # subcategory
            c.time_zone,
            hours,  # tradingHours
            hours,  # liquidHours
            "",  # evRule
            "",  # evMultiplier
            0,  # secIdList count
            1,  # aggGroup
            c.symbol if c.sec_type == "FUT" else "",  # underSymbol
            "IND" if c.sec_type == "FUT" else "",  # underSecType
            "26",  # marketRuleIds
            c.last_trade_date,  # realExpirationDate
            "COMMON" if c.sec_type == "STK" else "",  # stockType
            1,  # minSize
            1,  # sizeIncrement
            1,  # suggestedSizeIncrement
        ]

    def _on_mkt_data(self, conn: _Conn, fields: list[str]) -> None:
        req_id = int(fields[2])
        matches = self._match(fields[3:15])
        contract = matches[0] if len(matches) == 1 else None
        if contract is None or self._rejects(contract):
            self._send_error(conn, req_id, 200, MSG_NO_SECDEF)
            return
        rest = fields[15:]  # the fake knows no combos (BAG), so no leg fields follow
        if rest and rest[0] == "1":  # delta-neutral contract: three more fields
            rest = rest[3:]
        generic, snapshot = rest[1], rest[2] == "1"
        live = sum(1 for s in conn.subs.values() if s.kind == "mktdata")
        if not snapshot and self.max_tickers is not None and live >= self.max_tickers:
            self._send_error(conn, req_id, 101, MSG_MAX_TICKERS)
            return
        self._announce_type(conn, req_id)
        state = self._state.get(contract.con_id, {})
        if (snapshot or self.replay_on_subscribe) and state and self._flowing(contract):
            conn.send_many(self._tick_messages(req_id, state, state))
        if snapshot:
            conn.send(TICK_SNAPSHOT_END, 1, req_id)
            return
        sub = Subscription("mktdata", req_id, contract.con_id, contract.key, generic_ticks=generic)
        conn.subs[("mktdata", req_id)] = sub

    def _announce_type(self, conn: _Conn, req_id: int) -> None:
        if self.market_data_type in (3, 4):
            self._send_error(conn, req_id, 10167, MSG_DELAYED)
        conn.send(MARKET_DATA_TYPE, 1, req_id, self.market_data_type)

    def _on_cancel_mkt_data(self, conn: _Conn, fields: list[str]) -> None:
        self._cancel(conn, "mktdata", int(fields[2]))

    def _on_tick_by_tick(self, conn: _Conn, fields: list[str]) -> None:
        req_id = int(fields[1])
        matches = self._match(fields[2:14])
        tick_type = fields[14]
        contract = matches[0] if len(matches) == 1 else None
        if contract is None or self._rejects(contract):
            self._send_error(conn, req_id, 200, MSG_NO_SECDEF)
            return
        if tick_type not in TBT_TYPES:
            self._send_error(conn, req_id, 10189, f"Failed to request tick-by-tick: {tick_type}")
            return
        open_tbt = sum(1 for s in conn.subs.values() if s.kind == "tbt")
        if self.max_tick_by_tick is not None and open_tbt >= self.max_tick_by_tick:
            self._send_error(conn, req_id, 10190, MSG_TBT_CAP)
            return
        sub = Subscription("tbt", req_id, contract.con_id, contract.key, tick_type=tick_type)
        conn.subs[("tbt", req_id)] = sub

    def _on_cancel_tick_by_tick(self, conn: _Conn, fields: list[str]) -> None:
        self._cancel(conn, "tbt", int(fields[1]))

    def _on_ignored(self, conn: _Conn, fields: list[str]) -> None:
        pass

    def _cancel(self, conn: _Conn, kind: SubKind, req_id: int) -> None:
        sub = conn.subs.pop((kind, req_id), None)
        if sub is None:
            log.info("fake gateway: cancel of unknown %s reqId %d", kind, req_id)
            return
        self.cancelled.append((conn.client_id, sub))

    # internals: ticks

    def _flowing(self, contract: FakeContract) -> bool:
        return not self._ticks_stopped and contract.key not in self._silenced

    def _subscribers(
        self, contract: FakeContract, kind: SubKind
    ) -> list[tuple[_Conn, Subscription]]:
        return [
            (conn, sub)
            for conn in self._ready(None)
            for sub in conn.subs.values()
            if sub.kind == kind
            and sub.con_id == contract.con_id
            and (conn.conn_id, sub.kind, sub.req_id) not in self._dead
        ]

    def _tick_messages(
        self, req_id: int, values: dict[str, float], state: dict[str, float]
    ) -> list[list[Field]]:
        """tickPrice (with its size for bid/ask/last) and tickSize messages for some values."""
        delayed = self.market_data_type in (3, 4)
        prices = DELAYED_TICKS if delayed else LIVE_TICKS
        sizes = DELAYED_SIZES if delayed else LIVE_SIZES
        paired = {"bid": "bid_size", "ask": "ask_size", "last": "size"}
        out: list[list[Field]] = []
        for name in ("bid", "ask", "last", "high", "low", "close", "open"):
            if name in values:
                size_name = paired.get(name, "")
                size = state.get(size_name, 0 if name == "last" else 1) if size_name else 0
                out.append([TICK_PRICE, 6, req_id, prices[name], values[name], size, 0])
        for name in ("bid_size", "ask_size", "size", "volume"):
            price_name = {"bid_size": "bid", "ask_size": "ask", "size": "last"}.get(name)
            if name in values and (price_name is None or price_name not in values):
                out.append([TICK_SIZE, 6, req_id, sizes[name], values[name]])
        return out

    _handlers: dict[int, Callable[[FakeGateway, _Conn, list[str]], None]] = {
        START_API: _on_start_api,
        REQ_POSITIONS: _on_positions,
        REQ_OPEN_ORDERS: _on_open_orders,
        REQ_COMPLETED_ORDERS: _on_completed_orders,
        REQ_ACCOUNT_UPDATES: _on_account_updates,
        REQ_ACCOUNT_UPDATES_MULTI: _on_account_updates_multi,
        REQ_EXECUTIONS: _on_executions,
        REQ_IDS: _on_req_ids,
        REQ_CURRENT_TIME: _on_current_time,
        REQ_MARKET_DATA_TYPE: _on_market_data_type,
        REQ_CONTRACT_DETAILS: _on_contract_details,
        REQ_MKT_DATA: _on_mkt_data,
        CANCEL_MKT_DATA: _on_cancel_mkt_data,
        REQ_TICK_BY_TICK: _on_tick_by_tick,
        CANCEL_TICK_BY_TICK: _on_cancel_tick_by_tick,
        REQ_AUTO_OPEN_ORDERS: _on_ignored,
        CANCEL_POSITIONS: _on_ignored,
        CANCEL_ACCOUNT_UPDATES_MULTI: _on_ignored,
    }
