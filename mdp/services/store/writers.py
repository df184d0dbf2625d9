"""The store's database edge: idempotent bar writers for SQLite (embedded) and PostgreSQL.

Both back ends hold one table, `bars`, keyed by `(symbol, bar_interval, start_ns)`:

    column        SQLite        PostgreSQL         from `Bar`
    symbol        TEXT          TEXT COLLATE "C"   symbol
    bar_interval  TEXT          TEXT COLLATE "C"   interval
    start_ns      INTEGER       BIGINT             start (ns since the epoch, UTC)
    end_ns        INTEGER       BIGINT             end
    open          REAL          DOUBLE PRECISION   open
    high          REAL          DOUBLE PRECISION   high
    low           REAL          DOUBLE PRECISION   low
    close         REAL          DOUBLE PRECISION   close
    volume        REAL          DOUBLE PRECISION   volume
    trade_count   INTEGER       BIGINT             trade_count
    vwap          REAL NULL     DOUBLE PRECISION   vwap (NULL when None)
    provider      TEXT          TEXT               provider
    rev           INTEGER       BIGINT             rev
    updated_at    TEXT (ISO)    TIMESTAMPTZ        when the row last changed (UTC)
    unique key    (symbol, bar_interval, start_ns), the upsert's conflict target

Physical layout differs where the engines do. PostgreSQL: `PRIMARY KEY (symbol, bar_interval,
start_ns)`, so a symbol's bars are one index range. SQLite: `PRIMARY KEY (bar_interval,
start_ns, symbol) WITHOUT ROWID`, i.e. the table is clustered by time. SQLite's WAL logs whole
pages, and a batch holds one bar per symbol for a few starts: keyed by symbol first, each batch
dirtied one page per symbol (5000 symbols: ~55k rows/s, falling as the file grows); clustered by
time it appends (~400k rows/s, flat). The price is that a one-symbol read scans the table
(~60 ms per million bars), acceptable for the embedded store; PostgreSQL is the one that scales.

`start`/`end`/`interval` are renamed so no column needs quoting in either dialect; the text key
columns use byte order in PostgreSQL (`COLLATE "C"`) so both back ends sort alike.

PostgreSQL ages (see `mdp/services/store/timescale.py`): `mdp_ts(start_ns)` / `mdp_ns(timestamptz)`
convert time, and `bars_5m`, `bars_1h`, `bars_1d` roll the `1s` bars up. When the `timescaledb`
extension is available, `bars` is a hypertable on `start_ns` (6-hour chunks by default, with the
integer-now function `mdp_now_ns()`), compressed after 7 days, dropped after 365 (settings
`MDP_STORE__CHUNK_HOURS`, `_COMPRESS_AFTER_DAYS`, `_RETENTION_DAYS`), and the rollups are
continuous aggregates; on plain PostgreSQL they are views.

A write is one transaction that upserts and keeps the latest revision:
`ON CONFLICT (key) DO UPDATE ... WHERE excluded.rev >= bars.rev`, so a replayed batch changes
nothing and an older revision never overwrites a newer one. It returns only after the commit is
durable; on any failure the transaction is rolled back, a `StoreError` is raised and the writer
stays usable, so the caller can retry the same batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import math
import operator
import sqlite3
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self, TextIO, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import structlog
from msgspec.structs import astuple

from mdp.services.store.timescale import (
    COMPRESSION_SETTINGS,
    PLAIN_STATEMENTS,
    ROLLUPS,
    Aging,
    Rollup,
    cagg_statements,
    hypertable_statements,
    plain_rollup_views,
    policy_statements,
)
from mdp.shared.contract.messages import Bar

__all__ = [
    "COLUMNS",
    "CSV_HEADER",
    "BarWriter",
    "InvalidBarError",
    "PostgresBarWriter",
    "SqliteBarWriter",
    "StoreError",
    "StoreUnavailableError",
    "check_bar",
    "export_csv",
    "latest_revisions",
    "open_writer",
    "redact_url",
    "sqlite_path",
    "storage_problem",
    "stream_bars",
    "symbol_known",
]

log = structlog.get_logger(__name__)

T = TypeVar("T")

# Rows are built with `astuple(bar)`, so the column lists below follow `Bar`'s field order.
# Fail at import, not with silently shuffled columns, if the message ever changes shape.
_BAR_FIELDS = (
    "symbol", "interval", "start", "end", "open", "high", "low", "close",
    "volume", "trade_count", "vwap", "provider", "rev",
)  # fmt: skip
if Bar.__struct_fields__ != _BAR_FIELDS:
    raise RuntimeError(f"Bar fields changed to {Bar.__struct_fields__}; update the store schema")

COLUMNS = (
    "symbol", "bar_interval", "start_ns", "end_ns", "open", "high", "low", "close",
    "volume", "trade_count", "vwap", "provider", "rev",
)  # fmt: skip
_KEY = "symbol, bar_interval, start_ns"
_COLS = ", ".join(COLUMNS)
_SET = ", ".join(f"{c} = excluded.{c}" for c in (*COLUMNS[3:], "updated_at"))
_SELECT = f"SELECT {_COLS} FROM bars"
_ORDER = f" ORDER BY {_KEY}"

CSV_HEADER = (
    "symbol", "interval", "bar_start_ns", "open", "high", "low", "close",
    "volume", "trade_count", "vwap",
)  # fmt: skip

_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1


class StoreError(Exception):
    """A store operation failed; a failed write was rolled back and retrying it is safe."""


class StoreUnavailableError(StoreError):
    """The store could not be reached (connection refused or lost, database missing)."""


class InvalidBarError(ValueError):
    """A bar that no store can hold (NaN, out-of-range integer, NUL byte): retrying won't help."""


class BarWriter(Protocol):
    """Stores bars idempotently; one implementation per database."""

    url: str

    async def open(self) -> None:
        """Connect and create the schema idempotently."""
        ...

    async def write(self, bars: Sequence[Bar]) -> int:
        """Upsert `bars` in one transaction; return the rows inserted or changed, after commit."""
        ...

    async def read(self, symbol: str | None = None, interval: str | None = None) -> list[Bar]:
        """Return the stored bars (latest revisions) ordered by symbol, interval, start."""
        ...

    async def count(self) -> int:
        """Return the number of stored bars."""
        ...

    async def close(self) -> None:
        """Release connections; pending writes finish first."""
        ...


def open_writer(
    store_url: str, *, timeout_s: float = 30.0, aging: Aging | None = None
) -> BarWriter:
    """Return an unopened writer for `sqlite:///PATH` or `postgresql://...`; ValueError otherwise.

    `timeout_s` bounds how long a write waits for a lock (SQLite) or a statement (PostgreSQL);
    `aging` is how a TimescaleDB store ages (chunks, compression, retention).
    """
    if store_url.startswith("sqlite:"):
        return SqliteBarWriter(sqlite_path(store_url), busy_timeout_s=timeout_s, url=store_url)
    if store_url.startswith(("postgresql://", "postgres://")):
        return PostgresBarWriter(store_url, command_timeout_s=timeout_s, aging=aging or Aging())
    raise ValueError(
        f"unsupported store URL {redact_url(store_url)!r}: expected sqlite:///PATH "
        "(sqlite:////ABSOLUTE/PATH) or postgresql://USER@HOST:PORT/DB"
    )


async def read_bars(
    store_url: str, symbol: str | None = None, interval: str | None = None
) -> list[Bar]:
    """The stored bars (latest revision), ordered by symbol, interval, start: open, read, close."""
    writer = open_writer(store_url)
    await writer.open()
    try:
        return await writer.read(symbol=symbol, interval=interval)
    finally:
        await writer.close()


STREAM_CHUNK = 5000  # rows per fetch: a few MB of Bars at most, whatever the range holds


async def stream_bars(
    store_url: str,
    symbol: str | None = None,
    interval: str | None = None,
    start_ns: int | None = None,
    end_ns: int | None = None,
    chunk: int = STREAM_CHUNK,
) -> AsyncGenerator[list[Bar], None]:
    """Stored bars with `start_ns <= start < end_ns`, ordered by symbol, interval, start, in
    chunks of at most `chunk` (constant memory: a server-side cursor, or SQLite `fetchmany`)."""
    if store_url.startswith("sqlite:"):
        async for rows in _sqlite_stream(store_url, symbol, interval, start_ns, end_ns, chunk):
            yield rows
        return
    if not store_url.startswith(("postgresql://", "postgres://")):
        open_writer(store_url)  # raises the one message for an unsupported URL
    where, params = _where(symbol, interval, lambda i: f"${i}", start_ns, end_ns)
    try:
        conn = await asyncpg.connect(store_url, timeout=10)
    except _PG_ERRORS as exc:
        raise _pg_error(f"cannot connect to PostgreSQL store {redact_url(store_url)}", exc) from exc
    try:
        # A cursor lives in a transaction; it fetches `chunk` rows per round trip.
        async with conn.transaction(readonly=True):
            cursor = await conn.cursor(_SELECT + where + _ORDER, *params)
            while records := await cursor.fetch(chunk):
                yield [Bar(*record) for record in records]
    except _PG_ERRORS as exc:
        raise _pg_error(f"PostgreSQL store {redact_url(store_url)}: read failed", exc) from exc
    finally:
        await conn.close()


async def _sqlite_stream(
    store_url: str,
    symbol: str | None,
    interval: str | None,
    start_ns: int | None,
    end_ns: int | None,
    chunk: int,
) -> AsyncGenerator[list[Bar], None]:
    where, params = _where(symbol, interval, lambda _: "?", start_ns, end_ns)
    path = sqlite_path(store_url)
    # One thread owns the connection (sqlite3 objects stay on their thread); read-only, so a
    # missing file is an error instead of a new empty store.
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mdp-sqlite-read")
    loop = asyncio.get_running_loop()

    def open_cursor() -> tuple[sqlite3.Connection, sqlite3.Cursor]:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        return conn, conn.execute(_SELECT + where + _ORDER, params)

    conn: sqlite3.Connection | None = None
    try:
        try:
            conn, cursor = await loop.run_in_executor(executor, open_cursor)
            while rows := await loop.run_in_executor(executor, cursor.fetchmany, chunk):
                yield [Bar(*row) for row in rows]
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite store {store_url}: read failed: {exc}") from exc
    finally:
        if conn is not None:
            await loop.run_in_executor(executor, conn.close)
        executor.shutdown(wait=False)


async def symbol_known(store_url: str, symbol: str) -> bool:
    """Whether the store holds any bar of `symbol` (to tell an unknown symbol from a gap)."""
    async with contextlib.aclosing(stream_bars(store_url, symbol=symbol, chunk=1)) as chunks:
        async for _ in chunks:
            return True
    return False


def sqlite_path(store_url: str) -> str:
    """The file path of a `sqlite:///relative` or `sqlite:////absolute` URL (`:memory:` too)."""
    prefix = "sqlite:///"
    path = store_url[len(prefix) :] if store_url.startswith(prefix) else ""
    if not path:
        raise ValueError(
            f"unsupported SQLite URL {store_url!r}: expected sqlite:///relative/path.db "
            "or sqlite:////absolute/path.db"
        )
    return path


def redact_url(url: str) -> str:
    """`url` with any password (in the user info or a `password=` parameter) replaced by `***`."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            userinfo, _, hostport = netloc.rpartition("@")
            netloc = f"{userinfo.partition(':')[0]}:***@{hostport}"
        query = parts.query
        if "password" in query.lower():
            pairs = parse_qsl(query, keep_blank_values=True)
            query = urlencode([(k, "***" if k.lower() == "password" else v) for k, v in pairs])
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        # An unparsable URL may hide a password anywhere; name only its scheme.
        return url.partition(":")[0] + "://<unparsable>"


def export_csv(bars: Iterable[Bar], out: TextIO) -> None:
    """Write `bars` as CSV with `CSV_HEADER`; floats as `repr` so they round-trip exactly."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    for b in bars:
        vwap = "" if b.vwap is None else repr(b.vwap)
        writer.writerow(
            (b.symbol, b.interval, b.start, repr(b.open), repr(b.high), repr(b.low),
             repr(b.close), repr(b.volume), b.trade_count, vwap)
        )  # fmt: skip


def latest_revisions(bars: Iterable[Bar]) -> list[Bar]:
    """One bar per key: the highest `rev`, the last one seen among equal revisions."""
    return list(_latest(bars).values())


def _latest(bars: Iterable[Bar]) -> dict[tuple[str, int, str], Bar]:
    """`latest_revisions` keyed by `(interval, start, symbol)`, SQLite's clustering order."""
    latest: dict[tuple[str, int, str], Bar] = {}
    for bar in bars:
        key = (bar.interval, bar.start, bar.symbol)
        seen = latest.get(key)
        if seen is None or bar.rev >= seen.rev:
            latest[key] = bar
    return latest


def storage_problem(bar: Bar) -> str | None:
    """Why both back ends could not store `bar` exactly, None when they can."""
    isfinite = math.isfinite
    # SQLite turns NaN into NULL and PostgreSQL stores it: reject it so the two never disagree.
    if not (
        isfinite(bar.open)
        and isfinite(bar.high)
        and isfinite(bar.low)
        and isfinite(bar.close)
        and isfinite(bar.volume)
        and (bar.vwap is None or isfinite(bar.vwap))
    ):
        return "prices and volume must be finite"
    if not (
        _I64_MIN <= bar.start <= _I64_MAX
        and _I64_MIN <= bar.end <= _I64_MAX
        and _I64_MIN <= bar.trade_count <= _I64_MAX
        and _I64_MIN <= bar.rev <= _I64_MAX
    ):
        return "an integer field is outside 64 bits"
    # PostgreSQL text cannot hold NUL.
    if "\x00" in bar.symbol or "\x00" in bar.interval or "\x00" in bar.provider:
        return "text fields must not contain NUL"
    return None


def check_bar(bar: Bar) -> None:
    """Raise InvalidBarError unless both back ends can store `bar` exactly."""
    problem = storage_problem(bar)
    if problem is not None:
        raise InvalidBarError(f"bar {bar.bar_id!r}: {problem}")


def _rows(
    bars: Sequence[Bar], extra: tuple[Any, ...] = (), *, time_order: bool = False
) -> list[tuple[Any, ...]]:
    """Deduplicated, validated rows in `COLUMNS` order (then `extra`), time-ordered if asked."""
    latest = _latest(bars)
    rows: list[tuple[Any, ...]] = []
    for key in sorted(latest) if time_order else latest:
        bar = latest[key]
        check_bar(bar)
        rows.append(astuple(bar) + extra)
    return rows


# ---------------------------------------------------------------------------------------------
# SQLite


_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS bars (
    symbol       TEXT    NOT NULL,
    bar_interval TEXT    NOT NULL,
    start_ns     INTEGER NOT NULL,
    end_ns       INTEGER NOT NULL,
    open         REAL    NOT NULL,
    high         REAL    NOT NULL,
    low          REAL    NOT NULL,
    close        REAL    NOT NULL,
    volume       REAL    NOT NULL,
    trade_count  INTEGER NOT NULL,
    vwap         REAL,
    provider     TEXT    NOT NULL,
    rev          INTEGER NOT NULL,
    updated_at   TEXT    NOT NULL,
    PRIMARY KEY (bar_interval, start_ns, symbol)
) WITHOUT ROWID
"""

_SQLITE_UPSERT = (
    f"INSERT INTO bars ({_COLS}, updated_at) VALUES ({', '.join('?' * (len(COLUMNS) + 1))})"
    f" ON CONFLICT ({_KEY}) DO UPDATE SET {_SET} WHERE excluded.rev >= bars.rev"
)


class _Managed:
    """`async with writer:` opens and closes it."""

    async def open(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class SqliteBarWriter(_Managed):
    """Bars in a SQLite file (WAL, synchronous=FULL), used from one dedicated worker thread."""

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 30.0, url: str = "") -> None:
        self.path = str(path)
        self.url = url or f"sqlite:///{self.path}"
        self.busy_timeout_s = busy_timeout_s
        self._conn: sqlite3.Connection | None = None
        # One thread owns the connection: sqlite3 objects must stay on the thread that made them,
        # and it also serialises writes, which SQLite would otherwise do with lock retries.
        self._executor: ThreadPoolExecutor | None = None

    async def open(self) -> None:
        """Open (creating parent directories and the file) and create the schema."""
        if self._executor is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mdp-sqlite")
        try:
            await self._run(self._open_sync)
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise
        log.info("store_opened", backend="sqlite", url=self.url)

    def _open_sync(self) -> None:
        try:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, nothing implicit.
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise StoreUnavailableError(f"cannot open SQLite store {self.url}: {exc}") from exc
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal" and self.path != ":memory:":
                log.warning("sqlite_wal_unavailable", url=self.url, journal_mode=mode)
            # The store acks a batch after write() returns: the commit must survive power loss.
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute(_SQLITE_SCHEMA)
        except sqlite3.Error as exc:
            conn.close()
            raise StoreUnavailableError(
                f"cannot initialise SQLite store {self.url}: {exc}"
            ) from exc
        self._conn = conn

    async def write(self, bars: Sequence[Bar]) -> int:
        """Upsert `bars` in one durable transaction; return the rows inserted or changed."""
        if not bars:
            return 0
        return await self._run(self._write_sync, bars)

    def _write_sync(self, bars: Sequence[Bar]) -> int:
        # Row building runs here, off the event loop: ~1 ms per 1000 bars.
        now = datetime.now(UTC).isoformat(timespec="microseconds")
        # In clustering order, consecutive inserts land on the same few B-tree pages.
        rows = _rows(bars, (now,), time_order=True)
        conn = self._connection()
        try:
            # IMMEDIATE takes the write lock up front (waiting up to the busy timeout), so the
            # batch cannot fail half-way for lack of it.
            conn.execute("BEGIN IMMEDIATE")
            cursor = conn.executemany(_SQLITE_UPSERT, rows)
            written = cursor.rowcount
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback(conn)
            raise StoreError(
                f"SQLite store {self.url}: write of {len(bars)} bars failed: {exc}"
            ) from exc
        except BaseException:
            self._rollback(conn)
            raise
        return written

    def _rollback(self, conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error as exc:  # the original error is the one worth raising
                log.warning("sqlite_rollback_failed", url=self.url, error=str(exc))

    async def read(self, symbol: str | None = None, interval: str | None = None) -> list[Bar]:
        """Return the stored bars ordered by symbol, interval, start, optionally filtered."""
        where, params = _where(symbol, interval, lambda _: "?")
        return await self._run(self._read_sync, _SELECT + where + _ORDER, params)

    def _read_sync(self, sql: str, params: list[str]) -> list[Bar]:
        try:
            rows = self._connection().execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite store {self.url}: read failed: {exc}") from exc
        return [Bar(*row) for row in rows]

    async def count(self) -> int:
        """Return the number of stored bars."""
        return await self._run(self._count_sync)

    def _count_sync(self) -> int:
        try:
            return int(self._connection().execute("SELECT count(*) FROM bars").fetchone()[0])
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite store {self.url}: count failed: {exc}") from exc

    async def close(self) -> None:
        """Close the connection once pending operations finish (the executor runs them in order)."""
        executor, self._executor = self._executor, None
        if executor is None:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(executor, self._close_sync)
        finally:
            executor.shutdown(wait=False)
        log.info("store_closed", backend="sqlite", url=self.url)

    def _close_sync(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError(f"SQLite store {self.url} is not open")
        return self._conn

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            raise RuntimeError(f"SQLite store {self.url} is not open")
        return await asyncio.get_running_loop().run_in_executor(self._executor, partial(fn, *args))


# ---------------------------------------------------------------------------------------------
# PostgreSQL


_PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS bars (
    symbol       TEXT COLLATE "C" NOT NULL,
    bar_interval TEXT COLLATE "C" NOT NULL,
    start_ns     BIGINT           NOT NULL,
    end_ns       BIGINT           NOT NULL,
    open         DOUBLE PRECISION NOT NULL,
    high         DOUBLE PRECISION NOT NULL,
    low          DOUBLE PRECISION NOT NULL,
    close        DOUBLE PRECISION NOT NULL,
    volume       DOUBLE PRECISION NOT NULL,
    trade_count  BIGINT           NOT NULL,
    vwap         DOUBLE PRECISION,
    provider     TEXT             NOT NULL,
    rev          BIGINT           NOT NULL,
    updated_at   TIMESTAMPTZ      NOT NULL DEFAULT now(),
    PRIMARY KEY (symbol, bar_interval, start_ns)
)
"""

# A per-session staging table: COPY into it is the fastest way in; ON COMMIT DELETE ROWS empties
# it at every commit (and a rollback discards it), so it is created once per connection.
_PG_STAGE = "mdp_bars_stage"
_PG_STAGE_DDL = f"""
CREATE TEMP TABLE IF NOT EXISTS {_PG_STAGE} (
    symbol TEXT, bar_interval TEXT, start_ns BIGINT, end_ns BIGINT,
    open DOUBLE PRECISION, high DOUBLE PRECISION, low DOUBLE PRECISION, close DOUBLE PRECISION,
    volume DOUBLE PRECISION, trade_count BIGINT, vwap DOUBLE PRECISION, provider TEXT, rev BIGINT
) ON COMMIT DELETE ROWS
"""


# A row's key (symbol, interval, start) in the order of `COLLATE "C"`, as the upsert sorts:
# PostgreSQL's "C" compares UTF-8 bytes, and UTF-8 keeps code-point order, so Python's own
# string order is the same order without encoding every key (a third of the rows' preparation).
_pg_key = operator.itemgetter(0, 1, 2)


# ORDER BY: concurrent writers then lock overlapping keys in the same order and cannot deadlock.
_PG_UPSERT = (
    f"INSERT INTO bars ({_COLS}, updated_at)"
    f' SELECT {_COLS}, now() FROM {_PG_STAGE} ORDER BY symbol COLLATE "C", bar_interval'
    f' COLLATE "C", start_ns'
    f" ON CONFLICT ({_KEY}) DO UPDATE SET {_SET} WHERE excluded.rev >= bars.rev"
)

# Serialises schema creation between replicas starting together (CREATE ... IF NOT EXISTS can
# still collide on the catalog). The key is arbitrary but fixed: "mdp.bars" as a number.
_PG_SCHEMA_LOCK = 0x6D64_702E_6261_7273

# Errors meaning "no usable connection", as opposed to a statement that failed.
_PG_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InvalidCatalogNameError,
    asyncpg.exceptions.InvalidAuthorizationSpecificationError,
    asyncpg.exceptions.InvalidPasswordError,
    asyncpg.exceptions.TooManyConnectionsError,
    # Raised when the server's "terminating connection" arrives just before our next query.
    asyncpg.InternalClientError,
)
# Errors of a pooled connection that died while idle (server restart, failover, killed session):
# they surface only when it is next used, the pool then replaces it, so one retry is worth it.
_PG_STALE: tuple[type[BaseException], ...] = (
    ConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.AdminShutdownError,
)
_PG_ERRORS: tuple[type[BaseException], ...] = (*_PG_UNAVAILABLE, asyncpg.PostgresError)


class PostgresBarWriter(_Managed):
    """Bars in PostgreSQL (a TimescaleDB hypertable when the extension is available)."""

    def __init__(
        self,
        dsn: str,
        *,
        command_timeout_s: float = 30.0,
        connect_timeout_s: float = 10.0,
        pool_size: int = 4,
        aging: Aging | None = None,
    ) -> None:
        self.dsn = dsn
        self.aging = aging or Aging()
        self.url = redact_url(dsn)
        self.command_timeout_s = command_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.pool_size = pool_size
        self.hypertable = False
        self._pool: asyncpg.Pool | None = None

    async def open(self) -> None:
        """Connect a pool (every new connection ensures the table), then set up the aging."""
        if self._pool is not None:
            return
        try:
            self._pool = await asyncpg.create_pool(
                self.dsn,
                min_size=1,
                max_size=self.pool_size,
                timeout=self.connect_timeout_s,
                command_timeout=self.command_timeout_s,
                init=self._init_connection,
            )
            async with self._pool.acquire() as conn:
                await self._age(conn)
        except _PG_ERRORS as exc:
            if self._pool is not None:
                self._pool.terminate()
                self._pool = None
            raise _pg_error(f"cannot connect to PostgreSQL store {self.url}", exc) from exc
        log.info("store_opened", backend="postgresql", url=self.url, hypertable=self.hypertable)

    async def _init_connection(self, conn: asyncpg.Connection) -> None:
        # Per connection rather than once: a connection made after the database was recreated
        # (or restored empty) finds its table again instead of failing every write.
        await self._ensure_schema(conn)
        await conn.execute(_PG_STAGE_DDL)

    async def _ensure_schema(self, conn: asyncpg.Connection) -> None:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _PG_SCHEMA_LOCK)
            await conn.execute(_PG_SCHEMA)
            for statement in PLAIN_STATEMENTS:
                await conn.execute(statement)

    async def _age(self, conn: asyncpg.Connection) -> None:
        """TimescaleDB when available (hypertable, policies, continuous aggregates), else the
        rollups as plain views. Once per open: the policies are jobs, not per connection."""
        available = await conn.fetchval(
            "SELECT true FROM pg_available_extensions WHERE name = 'timescaledb'"
        )
        created: list[Rollup] = []
        if available:
            try:
                async with conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock($1)", _PG_SCHEMA_LOCK)
                    created = await self._timescale(conn)
                self.hypertable = True
            except asyncpg.PostgresError as exc:
                # Installed but not preloaded, or no privilege: the plain table serves.
                log.warning("timescaledb_skipped", url=self.url, error=str(exc))
        if not self.hypertable:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _PG_SCHEMA_LOCK)
                for statement in plain_rollup_views():
                    await conn.execute(statement)
        for rollup in created:
            # Outside a transaction (TimescaleDB requires it): the rows stored before the
            # aggregate existed; the policy refreshes only its recent window.
            log.info("rollup_refreshing", view=rollup.name)
            await conn.execute(
                f"CALL refresh_continuous_aggregate('{rollup.name}', NULL, NULL)",
                timeout=max(self.command_timeout_s, 3600.0),
            )

    async def _timescale(self, conn: asyncpg.Connection) -> list[Rollup]:
        """The TimescaleDB-only statements, in one transaction; the aggregates it created."""
        await conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
        caggs = {
            r["view_name"]
            for r in await conn.fetch(
                "SELECT view_name FROM timescaledb_information.continuous_aggregates"
            )
        }
        for rollup in ROLLUPS:
            if rollup.name not in caggs:  # the plain view of a store that had no TimescaleDB
                await conn.execute(f"DROP VIEW IF EXISTS {rollup.name}")
        for statement in hypertable_statements(self.aging):
            await conn.execute(statement)
        compressed = await conn.fetchval(
            "SELECT compression_enabled FROM timescaledb_information.hypertables"
            " WHERE hypertable_name = 'bars'"
        )
        if not compressed:
            await conn.execute(COMPRESSION_SETTINGS)
        for statement in policy_statements(self.aging):
            await conn.execute(statement)
        created = [rollup for rollup in ROLLUPS if rollup.name not in caggs]
        for rollup in ROLLUPS:
            for statement in cagg_statements(rollup):
                await conn.execute(statement)
        return created

    async def write(self, bars: Sequence[Bar]) -> int:
        """Upsert `bars` in one transaction: COPY straight into `bars` when every key is new
        (the common case), else COPY to staging and one INSERT ... ON CONFLICT."""
        if not bars:
            return 0
        # In key order, as the upsert's ORDER BY: concurrent writers lock keys alike.
        rows = sorted(_rows(bars), key=_pg_key)

        async def upsert(conn: asyncpg.Connection) -> str:
            async with conn.transaction():
                with contextlib.suppress(asyncpg.UniqueViolationError):
                    # A savepoint: a key already stored (a revision, a batch sent again)
                    # undoes only this attempt. INSERT ... ON CONFLICT costs ~1.6x a COPY.
                    async with conn.transaction():
                        await conn.copy_records_to_table("bars", records=rows, columns=COLUMNS)
                    return f"INSERT 0 {len(rows)}"
                await conn.copy_records_to_table(_PG_STAGE, records=rows, columns=COLUMNS)
                status: str = await conn.execute(_PG_UPSERT)
                return status

        status = await self._call(f"write of {len(bars)} bars", upsert)
        # The status is "INSERT 0 <n>": rows inserted or updated, stale revisions excluded.
        return int(status.rsplit(" ", 1)[-1])

    async def read(self, symbol: str | None = None, interval: str | None = None) -> list[Bar]:
        """Return the stored bars ordered by symbol, interval, start, optionally filtered."""
        where, params = _where(symbol, interval, lambda i: f"${i}")
        sql = _SELECT + where + _ORDER
        records = await self._call("read", lambda conn: conn.fetch(sql, *params))
        return [Bar(*record) for record in records]

    async def count(self) -> int:
        """Return the number of stored bars."""
        return int(
            await self._call("count", lambda conn: conn.fetchval("SELECT count(*) FROM bars"))
        )

    async def close(self) -> None:
        """Close the pool, waiting for connections in use to be released."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), timeout=self.command_timeout_s)
        except TimeoutError:
            pool.terminate()
        log.info("store_closed", backend="postgresql", url=self.url)

    async def _call(self, what: str, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """`fn` on a pooled connection, retried once on a dead one; errors as StoreError."""
        pool = self._require_pool()
        try:
            try:
                async with pool.acquire() as conn:
                    return await fn(conn)
            except _PG_STALE as exc:
                if isinstance(exc, ConnectionRefusedError):
                    raise  # no server to reconnect to: the caller's backoff is the retry
                # Safe to repeat: a write is an idempotent upsert, even if it did commit.
                log.warning("store_connection_lost", url=self.url, op=what, error=repr(exc))
            async with pool.acquire() as conn:
                return await fn(conn)
        except _PG_ERRORS as exc:
            raise _pg_error(f"PostgreSQL store {self.url}: {what} failed", exc) from exc

    def _require_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError(f"PostgreSQL store {self.url} is not open")
        return self._pool


def _pg_error(message: str, exc: BaseException) -> StoreError:
    kind = StoreUnavailableError if isinstance(exc, _PG_UNAVAILABLE) else StoreError
    return kind(f"{message}: {type(exc).__name__}: {exc}")


def _where(
    symbol: str | None,
    interval: str | None,
    placeholder: Callable[[int], str],
    start_ns: int | None = None,
    end_ns: int | None = None,
) -> tuple[str, list[Any]]:
    """A WHERE clause (fixed column names, bound values) for the optional read filters."""
    clauses: list[str] = []
    params: list[Any] = []
    filters = (
        ("symbol =", symbol),
        ("bar_interval =", interval),
        ("start_ns >=", start_ns),
        ("start_ns <", end_ns),
    )
    for condition, value in filters:
        if value is not None:
            params.append(value)
            clauses.append(f"{condition} {placeholder(len(params))}")
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params
