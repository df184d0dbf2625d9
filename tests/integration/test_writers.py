"""The bar writers against a real SQLite file and a real PostgreSQL (skipped when unreachable)."""

from __future__ import annotations

import asyncio
import csv
import io
import math
import random
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest

from mdp.services.store.writers import (
    CSV_HEADER,
    BarWriter,
    InvalidBarError,
    PostgresBarWriter,
    SqliteBarWriter,
    StoreError,
    StoreUnavailableError,
    _pg_key,
    export_csv,
    latest_revisions,
    open_writer,
    redact_url,
    sqlite_path,
)
from mdp.shared.contract.messages import Bar
from tests.conftest_store import admin_connect, create_database, drop_database

pytest_plugins = ["tests.conftest_store"]

T0 = 1_700_000_000_000_000_000
SEC = 1_000_000_000

SYMBOLS = [
    "AAPL",
    "BRK.B",
    "BTC/USD",
    "ES 202412",
    "A_B",
    "Ünïcødé",
    "株式会社",
    "🚀MOON",
    "O'Reilly",
    'QU"OTE',
    "COM,MA",
]


def bar(
    symbol: str = "AAPL",
    start: int = T0,
    rev: int = 0,
    interval: str = "1s",
    close: float = 100.5,
    vwap: float | None = 100.25,
) -> Bar:
    """A valid bar; prices chosen so float repr round trips are non-trivial."""
    return Bar(
        symbol=symbol,
        interval=interval,
        start=start,
        end=start + SEC,
        open=100.1,
        high=max(101.3, close),
        low=min(99.7, close),
        close=close,
        volume=1234.5678,
        trade_count=17,
        vwap=vwap,
        provider="synthetic",
        rev=rev,
    )


def random_bars(n: int, n_symbols: int = 100, seed: int = 7) -> list[Bar]:
    """`n` distinct bars over `n_symbols` symbols, time-major as the aggregator emits them."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        price = rnd.uniform(1.0, 5000.0)
        out.append(
            Bar(
                symbol=f"SYM{i % n_symbols:04d}",
                interval="1s",
                start=T0 + (i // n_symbols) * SEC,
                end=T0 + (i // n_symbols + 1) * SEC,
                open=price,
                high=price * (1 + rnd.random() / 100),
                low=price * (1 - rnd.random() / 100),
                close=price * (1 + (rnd.random() - 0.5) / 100),
                volume=rnd.uniform(0, 1e6),
                trade_count=rnd.randint(1, 10_000),
                vwap=price if rnd.random() > 0.1 else None,
                provider="synthetic",
                rev=rnd.randint(0, 3),
            )
        )
    return out


def ordered(bars: list[Bar]) -> list[Bar]:
    """`bars` in the order `read()` returns them (str order is UTF-8 byte order)."""
    return sorted(bars, key=lambda b: (b.symbol, b.interval, b.start))


@asynccontextmanager
async def opened(url: str) -> AsyncIterator[BarWriter]:
    """`open_writer(url)`, opened, closed on exit."""
    w = open_writer(url, timeout_s=10)
    await w.open()
    try:
        yield w
    finally:
        await w.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, sqlite_url: str) -> str:
    """Each back end in turn."""
    if request.param == "sqlite":
        return sqlite_url
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
async def writer(store_url: str) -> AsyncIterator[BarWriter]:
    """An open writer on an empty store."""
    async with opened(store_url) as w:
        yield w


# ---------------------------------------------------------------------------------------------
# URLs and pure helpers


def test_open_writer_picks_the_backend_from_the_url(tmp_path: Path) -> None:
    rel = open_writer("sqlite:///var/mdp.db")
    assert isinstance(rel, SqliteBarWriter)
    assert rel.path == "var/mdp.db"
    absolute = open_writer(f"sqlite:///{tmp_path}/x.db")
    assert isinstance(absolute, SqliteBarWriter)
    assert absolute.path == f"{tmp_path}/x.db"
    assert sqlite_path("sqlite:////abs/x.db") == "/abs/x.db"
    assert isinstance(open_writer("postgresql://u@h/db"), PostgresBarWriter)
    assert isinstance(open_writer("postgres://u@h/db"), PostgresBarWriter)


@pytest.mark.parametrize(
    "url", ["mysql://u@h/db", "sqlite://", "sqlite:///", "sqlite://host/x.db", "bars.db", ""]
)
def test_open_writer_rejects_other_urls(url: str) -> None:
    with pytest.raises(ValueError, match="URL"):
        open_writer(url)


def test_unsupported_url_error_hides_the_password() -> None:
    with pytest.raises(ValueError) as info:
        open_writer("mysql://root:hunter2@db/x")
    assert "hunter2" not in str(info.value)


def test_redact_url() -> None:
    assert redact_url("postgresql://u:pw@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert redact_url("postgresql://u@h/db") == "postgresql://u@h/db"
    assert "pw" not in redact_url("postgresql://u@h/db?password=pw&sslmode=require")
    assert "sslmode=require" in redact_url("postgresql://u@h/db?password=pw&sslmode=require")


def test_latest_revisions_keeps_highest_rev_then_last_seen() -> None:
    first, second = bar(rev=1, close=101.0), bar(rev=1, close=102.0)
    got = latest_revisions([bar(rev=2, close=99.0), bar(rev=0), first, second, bar("MSFT")])
    assert got == [bar(rev=2, close=99.0), bar("MSFT")]
    assert latest_revisions([bar(rev=0), first, second]) == [second]


def test_export_csv_header_and_exact_floats() -> None:
    bars = [
        bar("BTC/USD", close=0.1 + 0.2, vwap=None),
        bar("COM,MA", close=1 / 3, vwap=5e-324),
        Bar("X", "1m", T0, T0 + 60 * SEC, 1.7976931348623157e308, 1.7976931348623157e308,
            2.2250738585072014e-308, 123456789.12345679, 1e-7, 0, 3.0, "replay", 4),
    ]  # fmt: skip
    out = io.StringIO()
    export_csv(bars, out)
    text = out.getvalue()
    assert text.splitlines()[0] == (
        "symbol,interval,bar_start_ns,open,high,low,close,volume,trade_count,vwap"
    )
    rows = list(csv.reader(io.StringIO(text)))
    assert tuple(rows[0]) == CSV_HEADER
    assert len(rows) == len(bars) + 1
    for row, b in zip(rows[1:], bars, strict=True):
        assert row[0] == b.symbol
        assert row[1] == b.interval
        assert int(row[2]) == b.start
        assert [float(x) for x in row[3:8]] == [b.open, b.high, b.low, b.close, b.volume]
        assert int(row[8]) == b.trade_count
        assert row[9] == ("" if b.vwap is None else repr(b.vwap))
        if b.vwap is not None:
            assert float(row[9]) == b.vwap
    assert rows[1][6] == "0.30000000000000004"


# ---------------------------------------------------------------------------------------------
# Both back ends


async def test_round_trip_is_exact(writer: BarWriter) -> None:
    bars = [
        bar(sym, start=T0 + i * SEC, close=100 + i / 3, vwap=None if i % 3 == 0 else 1 / (i + 7))
        for i, sym in enumerate(SYMBOLS)
    ]
    bars.append(
        Bar("EDGE", "1d", 2**62, 2**62 + 86_400 * SEC, 5e-324, 1.7976931348623157e308,
            2.2250738585072014e-308, 0.1 + 0.2, 0.0, 2**40, -1.5, "replay", 2**31)
    )  # fmt: skip
    assert await writer.write(bars) == len(bars)
    got = await writer.read()
    assert got == ordered(bars)
    for g in got:
        assert all(type(getattr(g, f)) is float for f in ("open", "high", "low", "close", "volume"))
        assert all(type(getattr(g, f)) is int for f in ("start", "end", "trade_count", "rev"))
    assert await writer.count() == len(bars)


async def test_read_filters(writer: BarWriter) -> None:
    bars = [
        bar(s, start=T0 + k * SEC, interval=i)
        for s in SYMBOLS
        for i in ("1s", "1m")
        for k in range(3)
    ]
    await writer.write(bars)
    for sym in SYMBOLS:
        assert await writer.read(symbol=sym) == ordered([b for b in bars if b.symbol == sym])
    assert await writer.read(interval="1m") == ordered([b for b in bars if b.interval == "1m"])
    assert await writer.read(symbol="BTC/USD", interval="1s") == ordered(
        [b for b in bars if b.symbol == "BTC/USD" and b.interval == "1s"]
    )
    assert await writer.read(symbol="NOPE") == []


async def test_replayed_batch_is_idempotent(writer: BarWriter) -> None:
    bars = random_bars(2000)
    await writer.write(bars)
    before = await writer.read()
    # The same revision again is rewritten (harmless) and changes nothing.
    await writer.write(bars)
    await writer.write(list(reversed(bars)))
    assert await writer.count() == len(bars)
    assert await writer.read() == before == ordered(bars)


async def test_newer_revision_wins_and_older_never_overwrites(writer: BarWriter) -> None:
    await writer.write([bar(rev=0, close=100.0), bar("MSFT", rev=0)])
    assert await writer.write([bar(rev=1, close=101.0)]) == 1
    assert await writer.read(symbol="AAPL") == [bar(rev=1, close=101.0)]
    # A redelivered older revision arrives after the newer one: nothing changes.
    assert await writer.write([bar(rev=0, close=100.0)]) == 0
    assert await writer.read(symbol="AAPL") == [bar(rev=1, close=101.0)]
    assert await writer.write([bar(rev=3, close=103.0, vwap=None)]) == 1
    assert await writer.read() == [bar(rev=3, close=103.0, vwap=None), bar("MSFT", rev=0)]
    assert await writer.count() == 2


async def test_a_batch_of_new_keys_and_stored_ones_upserts_them_all(writer: BarWriter) -> None:
    # PostgreSQL COPYs a batch of new keys straight in; one stored key sends the whole batch
    # through the upsert instead, and a stale revision in it still changes nothing.
    await writer.write([bar(rev=2, close=102.0), bar("MSFT", rev=0)])
    mixed = [bar("NVDA", rev=0), bar(rev=1, close=101.0), bar("MSFT", rev=1, close=7.0)]
    assert await writer.write(mixed) == 2  # NVDA new, MSFT revised, AAPL's rev 1 stale
    assert await writer.read() == [
        bar(rev=2, close=102.0), bar("MSFT", rev=1, close=7.0), bar("NVDA", rev=0)
    ]  # fmt: skip
    assert await writer.write([bar("TSLA", rev=0), bar("ORCL", rev=0)]) == 2  # all new again
    assert await writer.count() == 5


async def test_duplicate_keys_in_one_batch_resolve_to_highest_rev(writer: BarWriter) -> None:
    batch = [
        bar(rev=0, close=100.0),
        bar(rev=2, close=102.0),
        bar(rev=1, close=101.0),
        bar("MSFT", rev=1, close=1.0),
        bar("MSFT", rev=1, close=2.0),  # same revision: the last one wins
        bar("MSFT", rev=0, close=0.5),
    ]
    assert await writer.write(batch) == 2
    assert await writer.read() == [bar(rev=2, close=102.0), bar("MSFT", rev=1, close=2.0)]


async def test_vwap_none_round_trips_and_updates(writer: BarWriter) -> None:
    await writer.write([bar(vwap=None)])
    assert (await writer.read())[0].vwap is None
    await writer.write([bar(rev=1, vwap=100.3)])
    assert (await writer.read())[0].vwap == 100.3
    await writer.write([bar(rev=2, vwap=None)])
    assert (await writer.read())[0].vwap is None


async def test_invalid_bars_are_rejected_before_anything_is_written(writer: BarWriter) -> None:
    for bad in (
        bar(close=math.nan),
        bar(vwap=math.inf),
        bar(start=2**63),
        bar("NUL\x00"),
    ):
        with pytest.raises(InvalidBarError):
            await writer.write([bar("GOOD"), bad])
    assert await writer.count() == 0


async def test_concurrent_overlapping_writes_keep_the_latest_revision(writer: BarWriter) -> None:
    base = random_bars(3000, n_symbols=50)
    batches = []
    for rev in range(6):
        revised = [
            Bar(
                **{
                    **{f: getattr(b, f) for f in b.__struct_fields__},
                    "rev": rev,
                    "close": rev + 0.5,
                }
            )
            for b in base
        ]
        random.Random(rev).shuffle(revised)
        batches.append(revised)
    random.Random(1).shuffle(batches)
    await asyncio.gather(*(writer.write(b) for b in batches))
    got = await writer.read()
    assert len(got) == len(base)
    assert {(b.rev, b.close) for b in got} == {(5, 5.5)}


async def test_export_csv_of_stored_bars_round_trips(writer: BarWriter) -> None:
    bars = random_bars(500, n_symbols=10) + [bar(s) for s in SYMBOLS]
    await writer.write(bars)
    out = io.StringIO()
    export_csv(await writer.read(), out)
    rows = list(csv.reader(io.StringIO(out.getvalue())))[1:]
    expect = ordered(latest_revisions(bars))
    assert [r[0] for r in rows] == [b.symbol for b in expect]
    assert [float(r[6]) for r in rows] == [b.close for b in expect]
    assert [None if r[9] == "" else float(r[9]) for r in rows] == [b.vwap for b in expect]


async def test_write_50k_bars(writer: BarWriter) -> None:
    bars = random_bars(50_000, n_symbols=500)
    assert await writer.write(bars) == 50_000
    assert await writer.count() == 50_000
    assert await writer.read() == ordered(bars)
    # And again in 5000-row batches, as the batcher sends them: all updates, nothing new.
    for i in range(0, len(bars), 5000):
        await writer.write(bars[i : i + 5000])
    assert await writer.count() == 50_000


async def test_empty_write_is_a_no_op(writer: BarWriter) -> None:
    assert await writer.write([]) == 0
    assert await writer.count() == 0


async def test_operations_after_close_fail_clearly(store_url: str) -> None:
    w = open_writer(store_url)
    await w.open()
    await w.open()  # idempotent
    await w.close()
    await w.close()  # idempotent
    with pytest.raises(RuntimeError, match="not open"):
        await w.write([bar()])


async def test_data_survives_reopening(store_url: str) -> None:
    async with opened(store_url) as w:
        await w.write([bar(), bar("MSFT", vwap=None)])
    async with opened(store_url) as w:
        assert await w.read() == [bar(), bar("MSFT", vwap=None)]


# ---------------------------------------------------------------------------------------------
# SQLite specifics


async def test_sqlite_creates_parent_dirs_and_uses_wal(sqlite_url: str) -> None:
    path = Path(sqlite_path(sqlite_url))
    assert not path.parent.exists()
    async with SqliteBarWriter(path) as w:
        await w.write([bar()])
        other = sqlite3.connect(path)
        try:
            assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert other.execute("SELECT count(*) FROM bars").fetchone()[0] == 1
        finally:
            other.close()


async def test_sqlite_relative_url_is_relative_to_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    async with opened("sqlite:///var/rel.db") as w:
        await w.write([bar()])
    assert (tmp_path / "var" / "rel.db").is_file()


async def test_sqlite_readers_are_not_blocked_by_an_open_write(sqlite_url: str) -> None:
    path = sqlite_path(sqlite_url)
    async with SqliteBarWriter(path) as w:
        await w.write([bar()])
        locker = sqlite3.connect(path, isolation_level=None)
        try:
            locker.execute("BEGIN IMMEDIATE")
            locker.execute("DELETE FROM bars")
            # WAL: our reads see the last commit while another connection is mid-write.
            assert await w.read() == [bar()]
        finally:
            locker.execute("ROLLBACK")
            locker.close()


async def test_sqlite_locked_write_fails_then_retry_succeeds(sqlite_url: str) -> None:
    path = sqlite_path(sqlite_url)
    async with SqliteBarWriter(path, busy_timeout_s=0.2, url=sqlite_url) as w:
        await w.write([bar()])
        locker = sqlite3.connect(path, isolation_level=None)
        try:
            locker.execute("BEGIN EXCLUSIVE")
            with pytest.raises(StoreError, match="locked") as info:
                await w.write([bar(rev=1, close=1.0), bar("MSFT")])
            assert sqlite_url in str(info.value)
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        assert await w.write([bar(rev=1, close=1.0), bar("MSFT")]) == 2
        assert await w.read() == [bar(rev=1, close=1.0), bar("MSFT")]


async def test_sqlite_failure_mid_batch_rolls_back_everything(sqlite_url: str) -> None:
    path = sqlite_path(sqlite_url)
    async with SqliteBarWriter(path) as w:
        await w.write([bar(rev=0)])
        ddl = sqlite3.connect(path)
        ddl.execute(
            "CREATE TRIGGER boom BEFORE INSERT ON bars WHEN NEW.symbol = 'BOOM'"
            " BEGIN SELECT RAISE(ABORT, 'boom'); END"
        )
        ddl.commit()
        batch = [bar(rev=1, close=1.0), *(bar(f"S{i}") for i in range(100)), bar("BOOM")]
        with pytest.raises(StoreError, match="boom"):
            await w.write(batch)
        assert await w.read() == [bar(rev=0)]
        ddl.execute("DROP TRIGGER boom")
        ddl.commit()
        ddl.close()
        assert await w.write(batch) == len(batch)
        assert await w.count() == len(batch)


async def test_sqlite_unopenable_path_raises_unavailable(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    w = open_writer(f"sqlite:///{tmp_path}/file/sub/bars.db")
    with pytest.raises(StoreUnavailableError, match=r"file/sub/bars\.db"):
        await w.open()


# ---------------------------------------------------------------------------------------------
# PostgreSQL specifics


async def test_postgres_unreachable_error_names_url_without_password() -> None:
    w = PostgresBarWriter("postgresql://mdp:s3cret@127.0.0.1:1/nowhere", connect_timeout_s=2)
    with pytest.raises(StoreUnavailableError) as info:
        await w.open()
    message = str(info.value)
    assert "postgresql://mdp:***@127.0.0.1:1/nowhere" in message
    assert "s3cret" not in message


@pytest.mark.postgres
async def test_postgres_schema(postgres_url: str) -> None:
    async with PostgresBarWriter(postgres_url) as w:
        await w.write([bar()])
        assert w.hypertable is False  # TimescaleDB is not installed on the test server
    conn = await asyncpg.connect(postgres_url)
    try:
        cols = await conn.fetch(
            "SELECT column_name, data_type, is_nullable FROM information_schema.columns"
            " WHERE table_name = 'bars' ORDER BY ordinal_position"
        )
        assert [c["column_name"] for c in cols] == [
            "symbol", "bar_interval", "start_ns", "end_ns", "open", "high", "low", "close",
            "volume", "trade_count", "vwap", "provider", "rev", "updated_at",
        ]  # fmt: skip
        assert {c["column_name"] for c in cols if c["is_nullable"] == "YES"} == {"vwap"}
        pk = await conn.fetchval(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint"
            " WHERE conrelid = 'bars'::regclass AND contype = 'p'"
        )
        assert pk == "PRIMARY KEY (symbol, bar_interval, start_ns)"
        assert await conn.fetchval("SELECT updated_at > now() - interval '1 minute' FROM bars")
    finally:
        await conn.close()


@pytest.mark.postgres
async def test_postgres_failure_mid_batch_rolls_back_everything(postgres_url: str) -> None:
    async with PostgresBarWriter(postgres_url) as w:
        await w.write([bar(rev=0)])
        conn = await asyncpg.connect(postgres_url)
        try:
            await conn.execute(
                "CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$"
                " BEGIN IF NEW.symbol = 'BOOM' THEN RAISE EXCEPTION 'boom'; END IF;"
                " RETURN NEW; END $$;"
                " CREATE TRIGGER boom BEFORE INSERT ON bars FOR EACH ROW EXECUTE FUNCTION boom();"
            )
            batch = [bar(rev=1, close=1.0), *(bar(f"S{i}") for i in range(100)), bar("BOOM")]
            with pytest.raises(StoreError, match="boom"):
                await w.write(batch)
            assert await w.read() == [bar(rev=0)]
            await conn.execute("DROP TRIGGER boom ON bars")
        finally:
            await conn.close()
        assert await w.write(batch) == len(batch)
        assert await w.count() == len(batch)


@pytest.mark.postgres
async def test_postgres_database_dropped_mid_way_then_back(postgres_url: str) -> None:
    name = urlsplit(postgres_url).path.lstrip("/")
    async with PostgresBarWriter(postgres_url, connect_timeout_s=3) as w:
        await w.write([bar()])
        await drop_database(name)  # terminates the pool's sessions too
        with pytest.raises(StoreUnavailableError) as info:
            await w.write([bar("MSFT")])
        assert postgres_url in str(info.value)
        with pytest.raises(StoreUnavailableError):
            await w.count()
        # Restored empty: the next connection recreates the schema and the retry goes through.
        await create_database(name)
        assert await w.write([bar("MSFT")]) == 1
        assert await w.read() == [bar("MSFT")]


@pytest.mark.postgres
async def test_postgres_sessions_killed_between_writes_are_replaced(postgres_url: str) -> None:
    name = urlsplit(postgres_url).path.lstrip("/")
    async with PostgresBarWriter(postgres_url) as w:
        await w.write([bar()])
        conn = await admin_connect()
        try:
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
            )
        finally:
            await conn.close()
        # The pooled session is dead: the writer replaces it without bothering the caller.
        assert await w.write([bar("MSFT")]) == 1
        assert await w.read() == [bar(), bar("MSFT")]


@pytest.mark.postgres
async def test_the_writers_key_order_is_postgresqls_c_collation(postgres_url: str) -> None:
    # The writer sorts rows as the upsert's ORDER BY ... COLLATE "C" does (concurrent writers
    # then lock keys in one order), comparing str, not UTF-8 bytes: the same order, checked here.
    rng = random.Random(11)
    alphabet = "aAzZ09._/-:é€ß日本𝄞\u00a0\u0301\uffff"
    symbols = list({"".join(rng.choices(alphabet, k=rng.randint(1, 6))) for _ in range(400)})
    rows = [(s, "1s", i) for i, s in enumerate(symbols)]
    conn = await asyncpg.connect(postgres_url)
    try:
        expected = await conn.fetch(
            'SELECT s FROM unnest($1::text[]) AS s ORDER BY s COLLATE "C"', symbols
        )
    finally:
        await conn.close()
    assert [row[0] for row in sorted(rows, key=_pg_key)] == [r["s"] for r in expected]
