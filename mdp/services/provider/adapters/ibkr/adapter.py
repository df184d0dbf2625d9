"""The `ibkr` adapter: live ticks from TWS / IB Gateway through ib_async (the imperative shell).

Everything that decides is pure and lives beside it: the symbol grammar (`symbols`), the tick
conversion (`feed`), the per-code recovery table (`recovery`), the tick-age watchdog and
market hours (`watchdog`). This module only talks to the gateway and the sink:

- **Connection.** One coroutine connects (with a timeout; on 326 the next client id of the
  range), brings every symbol up, serves, and after a drop reconnects with capped exponential
  backoff and jitter: there is never a second reconnect loop. The provider's job lease makes
  one process own the job, so one connection per job and client id.
- **Contracts** are qualified once and cached in KV (`ibkr.contract.<symbol>`), so a restart
  does not ask the gateway again; 200 refuses that symbol alone (status, an event).
- **Requests** (connect, qualify, market data type, reqMktData, tick-by-tick, cancels) each
  draw from the provider's `ibkr` pacing budget first, so our own traffic never provokes 100.
- **Data** is tapped from ib_async's wrapper callbacks (one call per TWS message, with IB's
  tick-by-tick time), converted by `feed.SymbolTicks`, and handed to the sink by one pump
  task, in order, with a market-data marker wherever a symbol's data type changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import msgspec
import structlog
from prometheus_client import Counter, Gauge

from mdp.services.provider.adapters.base import (
    AdapterError,
    FeedSink,
    TickSink,
    check_params,
    job_symbols,
)
from mdp.services.provider.adapters.ibkr import recovery
from mdp.services.provider.adapters.ibkr.feed import SymbolTicks
from mdp.services.provider.adapters.ibkr.params import MARKET_DATA_NAMES, IbkrParams
from mdp.services.provider.adapters.ibkr.recovery import Action
from mdp.services.provider.adapters.ibkr.symbols import ContractSpec, SymbolError, describe, parse
from mdp.services.provider.adapters.ibkr.watchdog import (
    VerdictKind,
    WatchConfig,
    Watchdog,
    is_open,
    utc_now_from,
)
from mdp.services.provider.retry import Backoff
from mdp.shared.breaker import FailureKind
from mdp.shared.contract import names
from mdp.shared.contract.control import JobSpec
from mdp.shared.contract.messages import Tick
from mdp.shared.contract.records import FeedConnection, FeedStatus, IbkrContract, SymbolFeed

log = structlog.get_logger(__name__)

RECONNECTS = Counter("mdp_ibkr_reconnects_total", "Reconnections to the IB gateway", ["job"])
RESUBSCRIPTIONS = Counter(
    "mdp_ibkr_resubscriptions_total", "Market data requested again, by cause", ["job", "reason"]
)
ERRORS = Counter("mdp_ibkr_errors_total", "Errors and notices from the IB gateway", ["code"])
DATA_STOPPED = Counter(
    "mdp_ibkr_data_stopped_total", "Symbols found silent while the socket was up", ["job"]
)
CONNECTED = Gauge("mdp_ibkr_connected", "1 while the job's gateway connection is up", ["job"])
DELAYED = Gauge(
    "mdp_ibkr_delayed_symbols", "Symbols the gateway serves other than as requested", ["job"]
)
REFUSED = Gauge("mdp_ibkr_refused_symbols", "Symbols refused (unknown, not subscribed)", ["job"])

CHECK_PERIOD_S = 0.25  # how often the watchdog looks at tick ages
REPORT_PERIOD_S = 1.0  # how often the feed report is refreshed for `status`
RETRY_BRING_UP_S = 10.0  # symbols that could not be qualified or subscribed: tried again
CONNECT_MESSAGES = 3  # handshake, startApi, positions (the rest of the sync is turned off)
TBT_TYPES = ("AllLast", "BidAsk")

SubKind = Literal["mktdata", "tbt"]


def _ib_async() -> Any:
    """The ib_async module (ib_insync-compatible), imported when a job runs."""
    try:
        import ib_async
    except ImportError as exc:  # the [ibkr] extra is not installed
        raise AdapterError(
            f"ibkr: the ib_async package is missing ({exc}); pip install 'mdp[ibkr]'"
        ) from None
    return ib_async


class ClientIdInUse(ConnectionError):
    """Error 326 while connecting: the gateway has a session with this client id."""


@dataclass
class _Sub:
    """One symbol's subscription on the current connection."""

    kind: SubKind
    req_ids: list[int]


@dataclass
class _Symbol:
    """Everything the shell knows about one symbol across connections."""

    name: str
    spec: ContractSpec | None
    ticks: SymbolTicks
    contract: Any = None  # the qualified ib_async Contract
    sec_type: str = ""
    exchange: str = ""
    sub: _Sub | None = None
    refused: tuple[int, str] | None = None
    market_data: str = ""
    resubscriptions: int = 0
    gaps: int = 0
    last_gap_s: float | None = None
    last_tick_ns: int = 0
    no_tick_by_tick: bool = False  # 10189 / 10190: reqMktData instead


class IbkrAdapter:
    """Live trades and quotes from Interactive Brokers for `job.symbols` (see the module doc)."""

    name: ClassVar[str] = "ibkr"
    live: ClassVar[bool] = True
    Params: ClassVar[type[IbkrParams]] = IbkrParams

    def __init__(self, job: JobSpec) -> None:
        self.job = job
        self.params = check_params(self.name, self.Params, job.params)
        self.symbols = job_symbols(job)
        if not self.symbols:
            raise AdapterError("ibkr: job.symbols is empty; name at least one symbol")
        self.specs: dict[str, ContractSpec | SymbolError] = {}
        for symbol in self.symbols:
            try:
                self.specs[symbol] = parse(symbol)
            except SymbolError as exc:
                self.specs[symbol] = exc
        if all(isinstance(s, SymbolError) for s in self.specs.values()):
            problems = "; ".join(str(s) for s in self.specs.values())
            raise AdapterError(f"ibkr: no symbol of the job is valid: {problems}")

    @property
    def clock_rate(self) -> float:
        """Live data: one event-time second per wall second."""
        return 1.0

    async def run(self, sink: TickSink, resume_after: Mapping[str, int] | None = None) -> None:
        """Stream until cancelled, reconnecting and resubscribing by itself."""
        session = Session(self, sink, dict(resume_after or {}))
        await session.run()


class Session:
    """One run of the adapter: the connection loop and everything it keeps across reconnects."""

    def __init__(self, adapter: IbkrAdapter, sink: TickSink, resume: dict[str, int]) -> None:
        self.adapter = adapter
        self.params = p = adapter.params
        self.job = adapter.job
        self.sink = sink
        self.feed_sink: FeedSink | None = sink if isinstance(sink, FeedSink) else None
        self.log = log.bind(job=self.job.job, provider=self.job.provider)
        self.port = p.port
        self.client_ids = list(p.client_ids)
        self.client_index = 0
        self.backoff = Backoff(initial_s=p.reconnect_initial_s, cap_s=p.reconnect_max_s)
        self.watchdog = Watchdog(
            WatchConfig(p.stale_factor, p.stale_min_s, p.stale_max_s, p.probe_timeout_s)
        )
        self.symbols: dict[str, _Symbol] = {}
        for name, spec in adapter.specs.items():
            ticks = SymbolTicks(seq=max(0, resume.get(name, 0)), quote_ticks=p.quote_ticks)
            entry = _Symbol(name, spec if isinstance(spec, ContractSpec) else None, ticks)
            if isinstance(spec, ContractSpec) and spec.secType == "CASH":
                ticks.quote_ticks = True  # FX has no trades: its quotes are its ticks
            if isinstance(spec, SymbolError):
                entry.refused = (0, str(spec))
            self.symbols[name] = entry
        self.ib: Any = None
        self.by_req: dict[int, str] = {}
        self.qualifying: dict[int, str] = {}  # id(contract) -> symbol, for errors while qualifying
        self.pending: dict[str, list[Tick | str]] = {}
        self.wake = asyncio.Event()
        self.actions: asyncio.Queue[tuple[int, int, str, str | None]] = asyncio.Queue()
        self.disconnected = asyncio.Event()
        self.reconnect_now = asyncio.Event()
        self.in_use: asyncio.Future[None] | None = None
        self.connection: FeedConnection = "connecting"
        self.server_version = 0
        self.connected_since_ns = 0
        self.reconnects = 0
        self.resubscriptions = 0
        self.data_stopped = 0
        self.last_error: tuple[int, str] | None = None
        self.degraded: dict[int, str] = {}
        self.degraded_since = 0.0  # loop time: when the open degradations began
        self.last_failure_at = 0.0
        self.announced: set[str] = set()
        self.fail_over_alerted = False
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- the connection loop -----------------------------------------------------------------

    async def run(self) -> None:
        """Connect, serve, reconnect; until cancelled."""
        for entry in self.symbols.values():
            if entry.refused is not None:
                await self._announce_refusal(entry)
        pump = asyncio.create_task(self._pump(), name=f"ibkr-pump-{self.job.job}")
        attempt = 0
        try:
            while True:
                self._set_connection("connecting")
                try:
                    await self._connect()
                except (OSError, TimeoutError, ConnectionError) as exc:
                    attempt += 1
                    await self._connect_failed(exc, attempt)
                    continue
                attempt = 0
                try:
                    await self._serve()
                except (OSError, TimeoutError, ConnectionError) as exc:  # the socket went
                    self.log.info("ibkr_connection_lost", error=repr(exc))
                finally:
                    self._teardown()
                self.reconnects += 1
                RECONNECTS.labels(self.job.job).inc()
                await self._failure("connection")
                attempt = 1
                delay = self.backoff.delay_s(attempt, random.random())
                self.log.warning("ibkr_disconnected", reconnect_in_s=round(delay, 3))
                self._report()
                await asyncio.sleep(delay)
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
            for task in list(self._tasks):
                task.cancel()
            self._teardown()
            CONNECTED.labels(self.job.job).set(0)

    async def _connect_failed(self, exc: BaseException, attempt: int) -> None:
        """A connection attempt failed: count it, show it, wait the backoff."""
        delay = self.backoff.delay_s(attempt, random.random())
        self.log.warning(
            "ibkr_connect_failed",
            host=self.params.host,
            port=self.port,
            error=repr(exc),
            attempt=attempt,
            retry_in_s=round(delay, 3),
        )
        if not isinstance(exc, ClientIdInUse):
            self.last_error = (502, f"cannot connect to {self.params.host}:{self.port}: {exc!r}")
        self._set_connection("disconnected")
        await self._failure("connection")
        await asyncio.sleep(delay)

    async def _connect(self) -> None:
        """Connect with the next free client id; ClientIdInUse when the whole range is taken."""
        ib_async = _ib_async()
        p = self.params
        for _ in range(len(self.client_ids)):
            client_id = self.client_ids[self.client_index]
            ib = ib_async.IB()
            ib.RequestTimeout = p.request_timeout_s
            self._install(ib)
            self.ib = ib
            self.disconnected = asyncio.Event()
            self.in_use = asyncio.get_running_loop().create_future()
            kwargs: dict[str, Any] = {"readonly": p.readonly, "account": p.account}
            if hasattr(ib_async, "StartupFetchNONE"):  # ib_async: skip the order/account sync
                kwargs["fetchFields"] = ib_async.StartupFetchNONE
            await self.sink.pacer.acquire(CONNECT_MESSAGES)
            connect = asyncio.ensure_future(
                ib.connectAsync(
                    p.host, self.port, clientId=client_id, timeout=p.connect_timeout_s, **kwargs
                )
            )
            done, _ = await asyncio.wait({connect, self.in_use}, return_when="FIRST_COMPLETED")
            if connect not in done:  # 326: ib_async would only time out; try the next id now
                connect.cancel()
                with contextlib.suppress(BaseException):
                    await connect
                ib.disconnect()
                self.log.warning("ibkr_client_id_in_use", client_id=client_id)
                self.client_index = (self.client_index + 1) % len(self.client_ids)
                continue
            try:
                connect.result()
            except BaseException:
                ib.disconnect()
                raise
            self.server_version = int(ib.client.serverVersion() or 0)
            self.connected_since_ns = time.time_ns()
            self._set_connection("connected")
            CONNECTED.labels(self.job.job).set(1)
            self.log.info(
                "ibkr_connected",
                host=p.host,
                port=self.port,
                client_id=client_id,
                server_version=self.server_version,
            )
            return
        first, last = self.client_ids[0], self.client_ids[-1]
        raise ClientIdInUse(f"client ids {first}..{last} are all in use at the gateway (326)")

    def _install(self, ib: Any) -> None:
        """Tap the wrapper callbacks (one call per TWS message) and subscribe to the events."""
        wrapper = ib.wrapper

        def tap(name: str, ours: Callable[..., None]) -> None:
            original = getattr(wrapper, name)

            def both(*args: Any) -> None:
                try:
                    ours(*args)
                except Exception:  # our bug must not break ib_async's own bookkeeping
                    self.log.exception("ibkr_tap_failed", callback=name)
                original(*args)

            setattr(wrapper, name, both)

        tap("priceSizeTick", self._on_price)
        tap("tickSize", self._on_size)
        tap("tickByTickAllLast", self._on_tbt_last)
        tap("tickByTickBidAsk", self._on_tbt_quote)
        tap("marketDataType", self._on_market_data_type)
        ib.errorEvent += self._on_error
        ib.disconnectedEvent += self._on_disconnected

    def _teardown(self) -> None:
        """Forget the connection: its request ids mean nothing to the next one."""
        ib, self.ib = self.ib, None
        if ib is not None:
            ib.errorEvent -= self._on_error
            ib.disconnectedEvent -= self._on_disconnected
            with contextlib.suppress(Exception):
                ib.disconnect()
        self.by_req.clear()
        self.qualifying.clear()
        self.watchdog.interrupted()
        for entry in self.symbols.values():
            entry.sub = None
        if self.connection != "connecting":
            self._set_connection("disconnected")
        CONNECTED.labels(self.job.job).set(0)

    # -- serving one connection --------------------------------------------------------------

    async def _serve(self) -> None:
        """Bring every symbol up, then act on errors and the watchdog until the socket goes."""
        self.reconnect_now.clear()
        self.degraded.clear()
        self.watchdog.paused = False
        await self._request(lambda ib: ib.reqMarketDataType(self.params.market_data_code))
        bring_up = self._spawn(self._bring_up(), "bring-up")
        last_report = last_retry = 0.0
        loop = asyncio.get_running_loop()
        try:
            while not (self.disconnected.is_set() or self.reconnect_now.is_set()):
                with contextlib.suppress(TimeoutError):
                    action = await asyncio.wait_for(self.actions.get(), CHECK_PERIOD_S)
                    await self._act(*action)
                    while not self.actions.empty():
                        await self._act(*self.actions.get_nowait())
                    self._report()
                now = loop.time()
                await self._watch(now)
                if now - last_retry >= RETRY_BRING_UP_S and bring_up.done():
                    last_retry = now
                    if any(self._wants_bring_up(e) for e in self.symbols.values()):
                        bring_up = self._spawn(self._bring_up(), "bring-up")
                if now - last_report >= REPORT_PERIOD_S:
                    last_report = now
                    self._report()
        finally:
            bring_up.cancel()
            with contextlib.suppress(BaseException):
                await bring_up

    def _wants_bring_up(self, entry: _Symbol) -> bool:
        return entry.refused is None and entry.sub is None

    async def _bring_up(self) -> None:
        """Qualify (or read from the cache) and subscribe every symbol not yet subscribed."""
        entries = [e for e in self.symbols.values() if self._wants_bring_up(e)]
        await asyncio.gather(*(self._bring_up_one(e) for e in entries))
        self._report()

    async def _bring_up_one(self, entry: _Symbol) -> None:
        try:
            if entry.contract is None:
                await self._qualify(entry)
            if entry.contract is not None and entry.refused is None and entry.sub is None:
                await self._subscribe(entry, reason="")
        except (ConnectionError, TimeoutError) as exc:  # the connection went: retried later
            self.log.info("ibkr_bring_up_interrupted", symbol=entry.name, error=repr(exc))

    async def _qualify(self, entry: _Symbol) -> None:
        """The symbol's contract: from the KV cache, else asked from the gateway once."""
        assert entry.spec is not None
        cached = await self._cached(entry.name)
        if cached is not None:
            self._use(entry, cached)
            return
        ib_async = _ib_async()
        request = ib_async.Contract(**entry.spec.fields())
        self.qualifying[id(request)] = entry.name
        try:
            await self.sink.pacer.acquire(1)
            if self.ib is None:
                raise ConnectionError("not connected")
            details = await asyncio.wait_for(
                self.ib.reqContractDetailsAsync(request), self.params.request_timeout_s
            )
        finally:
            self.qualifying.pop(id(request), None)
        if entry.refused is not None:  # the error callback refused it already (200)
            return
        if not details:
            await self._refuse(entry, 200, f"no security definition for {describe(entry.spec)}")
            return
        if len(details) > 1:
            found = ", ".join(
                f"{d.contract.localSymbol or d.contract.symbol}@{d.contract.exchange}"
                f"/{d.contract.currency} ({d.contract.conId})"
                for d in details[:6]
            )
            await self._refuse(
                entry, 200, f"ambiguous: {describe(entry.spec)} matches {len(details)}: {found}"
            )
            return
        record = _record(entry.name, details[0], time.time_ns(), entry.spec.exchange)
        self._use(entry, record)
        store = self.feed_sink.store if self.feed_sink is not None else None
        if store is not None:
            await store.put(names.ibkr_contract_key(entry.name), msgspec.json.encode(record))

    async def _cached(self, symbol: str) -> IbkrContract | None:
        store = self.feed_sink.store if self.feed_sink is not None else None
        if store is None:
            return None
        raw = await store.get(names.ibkr_contract_key(symbol))
        if raw is None:
            return None
        try:
            record = msgspec.json.decode(raw, type=IbkrContract)
        except msgspec.DecodeError:
            return None
        max_age_ns = self.params.contract_cache_days * 86400 * 1e9
        if record.spec != symbol or time.time_ns() - record.qualified_ns > max_age_ns:
            return None
        today = time.strftime("%Y%m%d", time.gmtime())
        if record.last_trade_date and record.last_trade_date[:8] < today:
            return None  # an expired future: ask again
        return record

    def _use(self, entry: _Symbol, record: IbkrContract) -> None:
        ib_async = _ib_async()
        entry.contract = ib_async.Contract(
            conId=record.con_id,
            symbol=record.symbol,
            secType=record.sec_type,
            exchange=record.exchange,
            currency=record.currency,
            primaryExchange=record.primary_exchange,
            localSymbol=record.local_symbol,
            tradingClass=record.trading_class,
            lastTradeDateOrContractMonth=record.last_trade_date,
            multiplier=record.multiplier,
        )
        entry.sec_type, entry.exchange = record.sec_type, record.exchange
        if record.sec_type == "CASH":
            entry.ticks.quote_ticks = True

    async def _subscribe(self, entry: _Symbol, reason: str, cancel: bool = False) -> None:
        """Request the symbol's market data (again, when `reason` says why)."""
        if self.ib is None or entry.refused is not None or entry.contract is None:
            return
        if cancel and entry.sub is not None:
            await self._cancel(entry)
        self._drop_sub(entry)
        contract = entry.contract
        use_tbt = self.params.tick_by_tick and not entry.no_tick_by_tick
        req_ids: list[int] = []
        if use_tbt:
            for tick_type in TBT_TYPES:
                ticker = await self._request(_call("reqTickByTickData", contract, tick_type))
                req_ids.append(self._req_id(ticker, tick_type))
        else:
            ticker = await self._request(lambda ib: ib.reqMktData(contract, "", False, False))
            req_ids.append(self._req_id(ticker, "mktData"))
        entry.sub = _Sub("tbt" if use_tbt else "mktdata", req_ids)
        for req_id in req_ids:
            self.by_req[req_id] = entry.name
        entry.ticks.resubscribed()
        if not entry.market_data:
            self._mark(entry, self.params.market_data_name)
        now = asyncio.get_running_loop().time()
        self.watchdog.subscribed(entry.name, now)
        if reason:
            entry.resubscriptions += 1
            self.resubscriptions += 1
            RESUBSCRIPTIONS.labels(self.job.job, reason).inc()
            if entry.last_tick_ns:
                self.watchdog.probe(entry.name, now)  # it ticked before: a tick must come soon
            self.log.info("ibkr_resubscribed", symbol=entry.name, reason=reason)

    async def _cancel(self, entry: _Symbol) -> None:
        sub, contract = entry.sub, entry.contract
        if sub is None:
            return
        if sub.kind == "tbt":
            for tick_type in TBT_TYPES:
                await self._request(_call("cancelTickByTickData", contract, tick_type))
        else:
            await self._request(lambda ib: ib.cancelMktData(contract))

    def _drop_sub(self, entry: _Symbol) -> None:
        if entry.sub is not None:
            for req_id in entry.sub.req_ids:
                self.by_req.pop(req_id, None)
            entry.sub = None

    async def _request(self, send: Callable[[Any], Any]) -> Any:
        """One outgoing message, paid for from the pacing budget first."""
        await self.sink.pacer.acquire(1)
        if self.ib is None or not self.ib.isConnected():
            raise ConnectionError("not connected")
        return send(self.ib)

    def _req_id(self, ticker: Any, tick_type: str) -> int:
        return int(self.ib.wrapper.ticker2ReqId[tick_type].get(ticker, 0))

    # -- errors and the recovery table -------------------------------------------------------

    def _on_error(self, req_id: int, code: int, text: str, contract: Any = None) -> None:
        """errorEvent: note it, then queue it for the serve loop (326 ends a connect at once).

        The symbol is resolved now: a failed request's ids are gone once ib_async ended it.
        """
        ERRORS.labels(str(code)).inc()
        row = recovery.policy(code, text)
        farm_ok = 2100 <= code < 2200 and row.action is Action.VERIFY
        notice = row.action is Action.IGNORE or farm_ok
        if not notice:  # "farm OK" is no error to show
            self.last_error = (code, text)
        if code == 326 and self.in_use is not None and not self.in_use.done():
            self.in_use.set_result(None)
            return
        symbol = self.by_req.get(req_id) if req_id > 0 else None
        if symbol is None and contract is not None:
            symbol = self.qualifying.get(id(contract))
        self.actions.put_nowait((code, req_id, text, symbol))

    def _on_disconnected(self) -> None:
        self.disconnected.set()

    def _symbol_of(self, req_id: int) -> _Symbol | None:
        name = self.by_req.get(req_id)
        return self.symbols.get(name) if name is not None else None

    async def _act(self, code: int, req_id: int, text: str, symbol: str | None) -> None:
        """Carry out the recovery table's action for one error (`symbol`: the one it names)."""
        row = recovery.policy(code, text)
        for cleared in row.clears:
            self.degraded.pop(cleared, None)
        entry = self.symbols.get(symbol) if symbol is not None else None
        action = row.action
        if action in (Action.IGNORE, Action.WARN):
            if action is Action.WARN:
                self.log.warning("ibkr_notice", code=code, req_id=req_id, text=text)
            if row.clears:
                self._degrade_update()
            return
        self.log.info("ibkr_error", code=code, req_id=req_id, text=text, action=str(action))
        if action is Action.DEGRADE:
            first = code not in self.degraded
            self.degraded[code] = row.meaning
            self._degrade_update()
            if first and row.failure is not None:
                await self._failure(row.failure)
        elif action is Action.RESUBSCRIBE_ALL:
            self._degrade_update()
            for other in self.symbols.values():
                if other.contract is not None and other.refused is None:
                    self._drop_sub(other)
                    await self._subscribe(other, reason=str(code))
        elif action is Action.VERIFY:
            self._degrade_update()
            if not self.watchdog.paused:
                self.watchdog.verify(asyncio.get_running_loop().time())
        elif action is Action.RESUBSCRIBE:
            if entry is not None:
                self._drop_sub(entry)
                await self._subscribe(entry, reason=str(code))
        elif action is Action.RECONNECT:
            port = recovery.new_port(text) if code == 1300 else None
            if port is not None:
                self.port = port
            if code == 1300 or (self.ib is not None and not self.ib.isConnected()):
                self.reconnect_now.set()
        elif action is Action.COOLDOWN:
            await self.sink.pacer.pacing_error(row.cooldown_s)
            if row.failure is not None:
                await self._failure(row.failure)
        elif action is Action.REFUSE:
            if entry is not None:
                await self._refuse(entry, code, f"{row.meaning}: {text}")
        elif action is Action.DELAYED:
            if entry is not None:
                self._delayed(entry)
        elif action is Action.FALLBACK:
            if entry is not None and not entry.no_tick_by_tick:
                entry.no_tick_by_tick = True
                with contextlib.suppress(ConnectionError):
                    await self._cancel(entry)  # the other tick-by-tick request of the symbol
                self._drop_sub(entry)
                await self._subscribe(entry, reason=str(code))
        elif action is Action.FAIL_OVER:
            if not self.fail_over_alerted:
                self.fail_over_alerted = True
                self.log.error("ibkr_competing_session", code=code, text=text)
            if row.failure is not None:
                await self._failure(row.failure)

    def _degrade_update(self) -> None:
        """The connection state and the watchdog follow the open degradations."""
        if self.degraded and not self.watchdog.paused:
            self.degraded_since = asyncio.get_running_loop().time()
        self.watchdog.paused = bool(self.degraded)
        if self.connection in ("connected", "degraded"):
            self._set_connection("degraded" if self.degraded else "connected")

    async def _refuse(self, entry: _Symbol, code: int, reason: str) -> None:
        """Refuse one symbol for this run: its subscription ends, the others go on."""
        if entry.refused is not None:
            return
        entry.refused = (code, reason)
        if entry.sub is not None:
            with contextlib.suppress(ConnectionError):
                await self._cancel(entry)
        self._drop_sub(entry)
        self.watchdog.forget(entry.name)
        await self._announce_refusal(entry)
        self._report()

    async def _announce_refusal(self, entry: _Symbol) -> None:
        assert entry.refused is not None
        code, reason = entry.refused
        self.log.warning("ibkr_symbol_refused", symbol=entry.name, code=code, reason=reason)
        REFUSED.labels(self.job.job).set(sum(e.refused is not None for e in self.symbols.values()))
        if self.feed_sink is not None and entry.name not in self.announced:
            self.announced.add(entry.name)
            await self.feed_sink.refuse(entry.name, code, reason)

    async def _failure(self, kind: FailureKind) -> None:
        """Count a failure against the provider's breaker (a sink without one: logged only)."""
        self.last_failure_at = asyncio.get_running_loop().time()
        if self.feed_sink is not None:
            await self.feed_sink.failure(kind)

    # -- the watchdog ------------------------------------------------------------------------

    async def _watch(self, now: float) -> None:
        """Resubscribe what the watchdog finds silent; count failed probes against the breaker."""
        if self.watchdog.paused and now - self.degraded_since >= self.params.stale_max_s:
            # The gateway never said the degradation ended: do not trust it for ever.
            self.log.warning("ibkr_degraded_too_long", degraded=sorted(self.degraded))
            self.watchdog.paused = False
        wall = utc_now_from(time.time())

        def open_now(symbol: str) -> bool:
            entry = self.symbols[symbol]
            if not self.params.market_hours or not entry.exchange:
                return True
            exchange = entry.exchange
            if exchange == "SMART" and entry.contract is not None:
                exchange = entry.contract.primaryExchange or exchange
            return is_open(exchange, entry.sec_type, wall)

        counted = False
        for verdict in self.watchdog.check(now, open_now):
            entry = self.symbols[verdict.symbol]
            if verdict.kind is VerdictKind.STALE:
                self.data_stopped += 1
                DATA_STOPPED.labels(self.job.job).inc()
                self.log.warning(
                    "ibkr_data_stopped", symbol=entry.name, silent_s=round(verdict.silent_s, 2)
                )
            elif verdict.resubscribed and not counted:
                counted = True  # one failure per check, however many symbols stay silent
                await self._failure("data_stopped")
            try:
                await self._subscribe(entry, reason=str(verdict.kind), cancel=True)
            except ConnectionError:
                return
            self.watchdog.probe(entry.name, now)

    # -- data --------------------------------------------------------------------------------

    def _deliver(self, entry: _Symbol, tick: Tick | None) -> None:
        if entry.ticks.delayed_seen and entry.market_data in ("live", "frozen"):
            self._delayed(entry)
        if tick is None:
            return
        entry.last_tick_ns = tick.recv
        ended = self.watchdog.tick(entry.name, asyncio.get_running_loop().time())
        if ended is not None:
            entry.gaps += 1
            entry.last_gap_s = round(ended, 3)
            self.log.info("ibkr_data_resumed", symbol=entry.name, gap_s=entry.last_gap_s)
        self.pending.setdefault(entry.name, []).append(tick)
        self.wake.set()

    def _on_price(self, req_id: int, tick_type: int, price: float, size: float) -> None:
        entry = self._symbol_of(req_id)
        if entry is not None:
            self._deliver(entry, entry.ticks.price(tick_type, price, size, time.time_ns()))

    def _on_size(self, req_id: int, tick_type: int, size: float) -> None:
        entry = self._symbol_of(req_id)
        if entry is not None:
            self._deliver(entry, entry.ticks.size(tick_type, size, time.time_ns()))

    def _on_tbt_last(
        self, req_id: int, tick_type: int, when: int, price: float, size: float, *_: Any
    ) -> None:
        entry = self._symbol_of(req_id)
        if entry is not None:
            now = time.time_ns()
            ts = int(when) * 1_000_000_000 if when else now
            self._deliver(entry, entry.ticks.trade(ts, price, size, now))

    def _on_tbt_quote(
        self,
        req_id: int,
        when: int,
        bid: float,
        ask: float,
        bid_size: float,
        ask_size: float,
        *_: Any,
    ) -> None:
        entry = self._symbol_of(req_id)
        if entry is not None:
            now = time.time_ns()
            ts = int(when) * 1_000_000_000 if when else now
            self._deliver(entry, entry.ticks.quote(bid, ask, bid_size, ask_size, ts, now))

    def _on_market_data_type(self, req_id: int, code: int) -> None:
        entry = self._symbol_of(req_id)
        if entry is not None:
            self._mark(entry, MARKET_DATA_NAMES.get(int(code), str(code)))

    def _delayed(self, entry: _Symbol) -> None:
        """The gateway serves this symbol delayed data (10167, or delayed tick types)."""
        if entry.market_data in ("delayed", "delayed_frozen"):
            return
        self._mark(entry, "delayed_frozen" if entry.market_data == "frozen" else "delayed")

    def _mark(self, entry: _Symbol, kind: str) -> None:
        """From the next tick on, `entry`'s ticks are `kind` data (a marker in its stream)."""
        if entry.market_data == kind:
            return
        if entry.market_data:
            self.log.warning(
                "ibkr_market_data_changed", symbol=entry.name, was=entry.market_data, now=kind
            )
        entry.market_data = kind
        requested = self.params.market_data_name
        DELAYED.labels(self.job.job).set(
            sum(bool(e.market_data) and e.market_data != requested for e in self.symbols.values())
        )
        self.pending.setdefault(entry.name, []).append(kind)
        self.wake.set()

    async def _pump(self) -> None:
        """Hand the buffered ticks to the sink in order; market-data markers in between."""
        while True:
            await self.wake.wait()
            self.wake.clear()
            pending, self.pending = self.pending, {}
            for symbol, items in pending.items():
                run: list[Tick] = []
                for item in items:
                    if isinstance(item, Tick):
                        run.append(item)
                        continue
                    if run:
                        await self.sink.put(symbol, run)
                        run = []
                    if self.feed_sink is not None:
                        await self.feed_sink.set_market_data(symbol, item)
                if run:
                    await self.sink.put(symbol, run)

    # -- status ------------------------------------------------------------------------------

    def _set_connection(self, state: FeedConnection) -> None:
        if state != self.connection:
            self.connection = state
            self._report()

    def _report(self) -> None:
        """Give the sink the feed's state for `status` (the next state record carries it)."""
        if self.feed_sink is None:
            return
        self.feed_sink.report(self.status())

    def status(self) -> FeedStatus:
        """The feed as `status` shows it."""
        now_ns = time.time_ns()
        symbols: dict[str, SymbolFeed] = {}
        for name, entry in self.symbols.items():
            watch = self.watchdog.watches.get(name)
            if entry.refused is not None:
                state: Any = "refused"
            elif entry.contract is None:
                state = "qualifying"
            elif entry.sub is None:
                state = "subscribing"
            elif watch is not None and watch.stale_since is not None:
                state = "stale"
            else:
                state = "live"
            symbols[name] = SymbolFeed(
                state,
                entry.market_data,
                entry.last_tick_ns,
                round((now_ns - entry.last_tick_ns) / 1e9, 3) if entry.last_tick_ns else None,
                entry.ticks.ticks,
                entry.resubscriptions,
                entry.gaps,
                entry.last_gap_s,
                entry.refused[1] if entry.refused else None,
                entry.refused[0] if entry.refused else None,
            )
        code, text = self.last_error if self.last_error else (None, None)
        return FeedStatus(
            self.connection,
            now_ns,
            self.params.host,
            self.port,
            self.client_ids[self.client_index],
            self.server_version,
            self.params.market_data_name,
            self.connected_since_ns,
            self.reconnects,
            self.resubscriptions,
            self.data_stopped,
            code,
            text,
            [f"{c}: {m}" for c, m in sorted(self.degraded.items())],
            symbols,
        )

    def _spawn(self, coro: Any, what: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=f"ibkr-{what}-{self.job.job}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def _call(method: str, *args: Any) -> Callable[[Any], Any]:
    """`ib.<method>(*args)` as a request for `Session._request`."""
    return lambda ib: getattr(ib, method)(*args)


def _record(symbol: str, details: Any, now_ns: int, requested_exchange: str) -> IbkrContract:
    """The cache record of a qualified contract (ib_async ContractDetails)."""
    c = details.contract
    # A SMART request stays SMART (the gateway answers with the primary exchange too).
    exchange = requested_exchange if requested_exchange == "SMART" else c.exchange
    return IbkrContract(
        spec=symbol,
        con_id=int(c.conId),
        symbol=c.symbol,
        sec_type=c.secType,
        exchange=exchange,
        currency=c.currency,
        qualified_ns=now_ns,
        primary_exchange=c.primaryExchange or "",
        local_symbol=c.localSymbol or "",
        trading_class=c.tradingClass or "",
        last_trade_date=c.lastTradeDateOrContractMonth or "",
        multiplier=str(c.multiplier or ""),
        time_zone=getattr(details, "timeZoneId", "") or "",
    )


__all__ = ["ClientIdInUse", "IbkrAdapter", "IbkrParams", "Session"]
