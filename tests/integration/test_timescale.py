"""The PostgreSQL store that ages, on the plain PostgreSQL of the test machine.

TimescaleDB is not installable here, so:
- every statement plain PostgreSQL accepts runs for real: the table, `mdp_now_ns`, `mdp_ts`,
  `mdp_ns`, and the rollups `bars_5m`, `bars_1h`, `bars_1d` as plain views, over a table the
  previous schema created with rows in it;
- the continuous aggregates' own query (`rollup_select(..., timescale=True)`, TimescaleDB's
  `time_bucket`, `first`, `last`) runs against stand-ins of those three functions with
  TimescaleDB's semantics for these types, defined in a schema of the test database;
- both are compared with the rollup computed here in Python from the stored bars;
- the TimescaleDB-only statements (extension, hypertable, chunk size, integer-now, compression,
  policies, continuous aggregates) are checked as text only, and are skipped by the writer
  because `pg_available_extensions` has no `timescaledb`.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from typing import Any

import asyncpg
import pytest

from mdp.services.store.timescale import (
    DAY_NS,
    HOUR_NS,
    ROLLUPS,
    SECOND_NS,
    Aging,
    cagg_statements,
    hypertable_statements,
    policy_statements,
    rollup_select,
)
from mdp.services.store.writers import PostgresBarWriter, latest_revisions
from mdp.shared.contract.messages import Bar

pytestmark = pytest.mark.postgres

T0 = 1_700_000_000 * SECOND_NS  # 2023-11-14 22:13:20 UTC: buckets of every width cross it

# The schema main created before the store aged (issue 14): the migration starts from it.
OLD_SCHEMA = """
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

# TimescaleDB's time_bucket(BIGINT, BIGINT), first(value, time) and last(value, time), for the
# types the rollups use: the bucket is floor(ts / width) * width; first/last take the value at
# the smallest/largest time.
SHIMS = [
    "CREATE SCHEMA mdp_shim",
    """CREATE FUNCTION mdp_shim.time_bucket(width BIGINT, ts BIGINT) RETURNS BIGINT
    LANGUAGE SQL IMMUTABLE AS $$ SELECT ts - ((ts % width) + width) % width $$""",
    "CREATE TYPE mdp_shim.pair AS (v DOUBLE PRECISION, t BIGINT)",
    """CREATE FUNCTION mdp_shim.first_step(s mdp_shim.pair, v DOUBLE PRECISION, t BIGINT)
    RETURNS mdp_shim.pair LANGUAGE SQL IMMUTABLE AS
    $$ SELECT CASE WHEN (s).t IS NULL OR t < (s).t THEN ROW(v, t)::mdp_shim.pair ELSE s END $$""",
    """CREATE FUNCTION mdp_shim.last_step(s mdp_shim.pair, v DOUBLE PRECISION, t BIGINT)
    RETURNS mdp_shim.pair LANGUAGE SQL IMMUTABLE AS
    $$ SELECT CASE WHEN (s).t IS NULL OR t > (s).t THEN ROW(v, t)::mdp_shim.pair ELSE s END $$""",
    """CREATE FUNCTION mdp_shim.pair_value(s mdp_shim.pair) RETURNS DOUBLE PRECISION
    LANGUAGE SQL IMMUTABLE AS $$ SELECT (s).v $$""",
    """CREATE AGGREGATE mdp_shim.first(DOUBLE PRECISION, BIGINT) (
    SFUNC = mdp_shim.first_step, STYPE = mdp_shim.pair, FINALFUNC = mdp_shim.pair_value)""",
    """CREATE AGGREGATE mdp_shim.last(DOUBLE PRECISION, BIGINT) (
    SFUNC = mdp_shim.last_step, STYPE = mdp_shim.pair, FINALFUNC = mdp_shim.pair_value)""",
]

Row = tuple[str, int, float, float, float, float, float, int, float | None, int]


def random_bars(seed: int, n: int = 3000) -> list[Bar]:
    """1 s bars of three symbols over ~3 days around T0 (some with no volume, some revised),
    and 1 m bars the rollups must leave out."""
    rng = random.Random(seed)
    out: list[Bar] = []
    for symbol in ("AAA", "BBB", "C.D"):
        starts = sorted(rng.sample(range(-DAY_NS // SECOND_NS, 2 * DAY_NS // SECOND_NS), n))
        for s in starts:
            start = T0 + s * SECOND_NS
            o, c = rng.uniform(90, 110), rng.uniform(90, 110)
            hi, lo = max(o, c) + rng.random(), min(o, c) - rng.random()
            volume = 0.0 if rng.random() < 0.05 else rng.choice([1.0, 2.5, 100.0, 7.25])
            vwap = None if volume == 0 else rng.uniform(lo, hi)
            count = 0 if volume == 0 else rng.randint(1, 50)
            bar = Bar(
                symbol, "1s", start, start + SECOND_NS, o, hi, lo, c, volume, count, vwap, "p"
            )
            out.append(bar)
            if rng.random() < 0.05:  # a revision: the store keeps only this one
                out.append(Bar(symbol, "1s", start, start + SECOND_NS, o, hi + 1, lo, c, volume,
                               count + 1, vwap, "p", 1))  # fmt: skip
        for s in range(0, 3 * 24 * 60, 7):
            start = T0 - DAY_NS + s * 60 * SECOND_NS
            out.append(Bar(symbol, "1m", start, start + 60 * SECOND_NS, 1e6, 1e6, 1e6, 1e6,
                           1e6, 1, 1e6, "p"))  # fmt: skip
    return out


def rollup_in_python(bars: list[Bar], width_ns: int) -> dict[tuple[str, int], Row]:
    """The definition: per symbol and bucket of the stored 1 s bars, in time order."""
    groups: dict[tuple[str, int], list[Bar]] = defaultdict(list)
    for bar in latest_revisions(bars):
        if bar.interval == "1s":
            groups[(bar.symbol, bar.start - bar.start % width_ns)].append(bar)
    out: dict[tuple[str, int], Row] = {}
    for key, group in groups.items():
        group.sort(key=lambda b: b.start)
        volume = sum(b.volume for b in group)
        pv = sum(b.vwap * b.volume for b in group if b.vwap is not None)
        out[key] = (
            key[0],
            key[1],
            group[0].open,
            max(b.high for b in group),
            min(b.low for b in group),
            group[-1].close,
            volume,
            sum(b.trade_count for b in group),
            pv / volume if volume else None,
            len(group),
        )
    return out


def assert_rollup_equal(rows: list[Any], expected: dict[tuple[str, int], Row]) -> None:
    got = {(r["symbol"], r["bucket_ns"]): tuple(r.values()) for r in rows}
    assert set(got) == set(expected)
    for key, want in expected.items():
        have = got[key]
        assert have[:6] == want[:6], key  # symbol, bucket, open, high, low, close: exact
        assert math.isclose(have[6], want[6], rel_tol=1e-12), key  # volume (summing order)
        assert have[7] == want[7] and have[9] == want[9], key
        if want[8] is None:
            assert have[8] is None, key
        else:
            assert math.isclose(have[8], want[8], rel_tol=1e-9), key


async def connect(url: str) -> asyncpg.Connection:
    return await asyncpg.connect(url, timeout=5)


async def test_an_old_table_with_rows_migrates_and_rolls_up(postgres_url: str) -> None:
    old = random_bars(1, n=400)
    conn = await connect(postgres_url)
    try:
        await conn.execute(OLD_SCHEMA)
        rows = [_row(b) for b in latest_revisions(old)]
        await conn.copy_records_to_table(
            "bars",
            records=rows,
            columns=[
                "symbol", "bar_interval", "start_ns", "end_ns", "open", "high", "low", "close",
                "volume", "trade_count", "vwap", "provider", "rev",
            ],
        )  # fmt: skip
        before = await conn.fetchval("SELECT count(*) FROM bars")
    finally:
        await conn.close()

    new = random_bars(2, n=300)
    async with PostgresBarWriter(postgres_url) as writer:
        assert writer.hypertable is False  # no TimescaleDB here: the plain path
        assert await writer.count() == before  # every old row is still there
        await writer.write(new)
    conn = await connect(postgres_url)
    try:
        kinds = await conn.fetch(
            "SELECT relname, relkind::text AS relkind FROM pg_class"
            " WHERE relname LIKE 'bars_%' ORDER BY 1"
        )
        assert {(k["relname"], k["relkind"]) for k in kinds} >= {
            ("bars_5m", "v"), ("bars_1h", "v"), ("bars_1d", "v")
        }  # fmt: skip
        stored = [*old, *new]
        for rollup in ROLLUPS:
            got = await conn.fetch(f"SELECT * FROM {rollup.name}")
            assert_rollup_equal(got, rollup_in_python(stored, rollup.width_ns))
    finally:
        await conn.close()


def _row(bar: Bar) -> tuple[Any, ...]:
    return (bar.symbol, bar.interval, bar.start, bar.end, bar.open, bar.high, bar.low,
            bar.close, bar.volume, bar.trade_count, bar.vwap, bar.provider, bar.rev)  # fmt: skip


@pytest.mark.parametrize("seed", [3, 4])
async def test_rollups_equal_aggregating_the_stored_bars(postgres_url: str, seed: int) -> None:
    bars = random_bars(seed)
    async with PostgresBarWriter(postgres_url) as writer:
        for i in range(0, len(bars), 1000):
            await writer.write(bars[i : i + 1000])
        stored = await writer.read()
    assert latest_revisions(stored) == stored  # one row per key: what the rollups see
    conn = await connect(postgres_url)
    try:
        for statement in SHIMS:
            await conn.execute(statement)
        for rollup in ROLLUPS:
            expected = rollup_in_python(stored, rollup.width_ns)
            assert len(expected) > 3, rollup  # several buckets per symbol
            # the plain views, as the writer created them
            assert_rollup_equal(await conn.fetch(f"SELECT * FROM {rollup.name}"), expected)
            # the continuous aggregate's query, with TimescaleDB's functions stood in for
            await conn.execute("SET search_path = mdp_shim, public")
            cagg = await conn.fetch(rollup_select(rollup.width_ns, timescale=True))
            await conn.execute("RESET search_path")
            assert_rollup_equal(cagg, expected)
    finally:
        await conn.close()


async def test_time_helpers(postgres_url: str) -> None:
    async with PostgresBarWriter(postgres_url):
        pass
    conn = await connect(postgres_url)
    try:
        ts = await conn.fetchval("SELECT mdp_ts($1::BIGINT)", T0 + 123_456_789)
        assert ts.timestamp() == pytest.approx(1_700_000_000.123456, abs=1e-6)
        assert await conn.fetchval("SELECT mdp_ns(mdp_ts($1::BIGINT))", T0 + 5_000) == T0 + 5_000
        now_ns, now = await conn.fetchrow("SELECT mdp_now_ns(), now()")
        assert abs(now_ns - now.timestamp() * 1e9) < 1e3
        # IMMUTABLE: a filter on mdp_ns(<literal>) is a constant (chunk exclusion, index use)
        volatility = await conn.fetch(
            "SELECT proname, provolatile::text AS provolatile FROM pg_proc"
            " WHERE proname IN ('mdp_ts', 'mdp_ns', 'mdp_now_ns') ORDER BY proname"
        )
        assert [(v["proname"], v["provolatile"]) for v in volatility] == [
            ("mdp_now_ns", "s"), ("mdp_ns", "i"), ("mdp_ts", "i")
        ]  # fmt: skip
    finally:
        await conn.close()


def test_timescale_statements_as_text() -> None:
    aging = Aging.of(chunk_hours=6, compress_after_days=7, retention_days=365)
    assert aging == Aging(6 * HOUR_NS, 7 * DAY_NS, 365 * DAY_NS)
    hyper = " ".join(hypertable_statements(aging))
    assert f"chunk_time_interval => {6 * HOUR_NS}::BIGINT" in hyper
    assert "migrate_data => true" in hyper and "'mdp_now_ns'" in hyper
    policies = policy_statements(aging)
    assert any(f"compress_after => {7 * DAY_NS}::BIGINT" in p for p in policies)
    assert any(f"drop_after => {365 * DAY_NS}::BIGINT" in p for p in policies)
    off = policy_statements(Aging(6 * HOUR_NS, 0, 0))
    assert not any("add_" in p for p in off), "0 turns a policy off"
    for rollup in ROLLUPS:
        view, policy = cagg_statements(rollup)
        assert "timescaledb.continuous" in view and view.endswith("WITH NO DATA")
        assert rollup_select(rollup.width_ns, timescale=True) in view
        # the refresh window stays inside the retention, and covers at least two buckets
        assert rollup.start_offset_ns - rollup.end_offset_ns >= 2 * rollup.width_ns
        assert rollup.start_offset_ns < aging.retention_ns
        assert f"'{rollup.name}'" in policy
