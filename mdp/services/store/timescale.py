"""A PostgreSQL store that ages: time helpers, rollups of the 1 s bars, TimescaleDB policies.

Time stays `start_ns` (BIGINT, ns since the epoch), the hypertable's dimension, with an
integer-now function (`mdp_now_ns()`) so that TimescaleDB's compression, retention and
continuous-aggregate policies can measure age. Not a new `timestamptz` column because:
- a hypertable's time dimension cannot be changed in place, and every existing TimescaleDB store
  is a hypertable on `start_ns` (1-day chunks): a new dimension would mean rewriting the table;
- `start_ns` is the key and the upsert's conflict target on both back ends (SQLite too), so the
  writer's COPY and upsert stay as they are, and no row needs a new value to migrate;
- Grafana and SQL still query by time: `mdp_ts(start_ns)` is the `timestamptz` of a start and
  `mdp_ns(timestamptz)` the inverse, both IMMUTABLE, so
  `start_ns >= mdp_ns($__timeFrom())` folds to a constant and excludes chunks.

Rollups `bars_5m`, `bars_1h`, `bars_1d` aggregate the stored `1s` bars per symbol and bucket:
open = first by time, close = last, high = max, low = min, volume and trade_count = sum,
vwap = sum(vwap * volume) / sum(volume) (NULL when the volume is 0). With TimescaleDB they are
continuous aggregates (real-time: `materialized_only = false`), refreshed by policies; on plain
PostgreSQL the same names are plain views computing the same thing when read.

Everything here builds SQL (pure); `PostgresBarWriter` runs it: `PLAIN_STATEMENTS` everywhere, the
rest only once the `timescaledb` extension is created.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "BASE_INTERVAL",
    "COMPRESSION_SETTINGS",
    "PLAIN_STATEMENTS",
    "ROLLUPS",
    "Aging",
    "Rollup",
    "cagg_statements",
    "hypertable_statements",
    "plain_rollup_views",
    "policy_statements",
    "rollup_select",
]

SECOND_NS = 1_000_000_000
HOUR_NS = 3600 * SECOND_NS
DAY_NS = 24 * HOUR_NS
BASE_INTERVAL = "1s"  # the rollups aggregate the stored bars of this interval


@dataclass(frozen=True, slots=True)
class Rollup:
    """One rollup view: its name, bucket width, and its refresh policy's window and period."""

    name: str
    width_ns: int
    start_offset_ns: int  # refreshed from now - start_offset ...
    end_offset_ns: int  # ... to now - end_offset (newer buckets: computed when read)
    schedule: str  # how often the policy runs (a PostgreSQL interval)


ROLLUPS = (
    Rollup("bars_5m", 300 * SECOND_NS, DAY_NS, 300 * SECOND_NS, "5 minutes"),
    Rollup("bars_1h", HOUR_NS, 3 * DAY_NS, HOUR_NS, "1 hour"),
    Rollup("bars_1d", DAY_NS, 10 * DAY_NS, DAY_NS, "1 day"),
)


@dataclass(frozen=True, slots=True)
class Aging:
    """How the TimescaleDB store ages (0 turns compression or retention off)."""

    chunk_ns: int = 6 * HOUR_NS
    compress_after_ns: int = 7 * DAY_NS
    retention_ns: int = 365 * DAY_NS

    @classmethod
    def of(cls, chunk_hours: float, compress_after_days: float, retention_days: float) -> Aging:
        """From the settings' units (MDP_STORE__CHUNK_HOURS and the others)."""
        return cls(
            round(chunk_hours * HOUR_NS),
            round(compress_after_days * DAY_NS),
            round(retention_days * DAY_NS),
        )


# Accepted by plain PostgreSQL: run on every store.
PLAIN_STATEMENTS = (
    # The integer-now function of the hypertable: now, in the unit of start_ns.
    """CREATE OR REPLACE FUNCTION mdp_now_ns() RETURNS BIGINT LANGUAGE SQL STABLE AS
    $$ SELECT (extract(epoch FROM now()) * 1000000000)::BIGINT $$""",
    # ns since the epoch -> timestamptz (exact to the microsecond, the type's resolution).
    """CREATE OR REPLACE FUNCTION mdp_ts(ns BIGINT) RETURNS TIMESTAMPTZ
    LANGUAGE SQL IMMUTABLE STRICT PARALLEL SAFE AS
    $$ SELECT to_timestamp(div(ns, 1000)::DOUBLE PRECISION / 1000000) $$""",
    # timestamptz -> ns since the epoch.
    """CREATE OR REPLACE FUNCTION mdp_ns(ts TIMESTAMPTZ) RETURNS BIGINT
    LANGUAGE SQL IMMUTABLE STRICT PARALLEL SAFE AS
    $$ SELECT (extract(epoch FROM ts) * 1000000000)::BIGINT $$""",
)


def rollup_select(width_ns: int, *, timescale: bool) -> str:
    """The rollup query of one bucket width: TimescaleDB's functions, or plain SQL's."""
    if timescale:
        bucket = f"time_bucket({width_ns}::BIGINT, start_ns)"
        first_open, last_close = "first(open, start_ns)", "last(close, start_ns)"
    else:
        bucket = f"(start_ns - ((start_ns % {width_ns}) + {width_ns}) % {width_ns})"
        first_open = "(array_agg(open ORDER BY start_ns))[1]"
        last_close = "(array_agg(close ORDER BY start_ns DESC))[1]"
    return (
        f"SELECT symbol, {bucket} AS bucket_ns, {first_open} AS open, max(high) AS high,"
        f" min(low) AS low, {last_close} AS close, sum(volume) AS volume,"
        " sum(trade_count) AS trade_count,"
        " sum(vwap * volume) / NULLIF(sum(volume), 0) AS vwap, count(*) AS bar_count"
        f" FROM bars WHERE bar_interval = '{BASE_INTERVAL}'"
        f" GROUP BY symbol, {bucket}"
    )


def plain_rollup_views() -> list[str]:
    """Plain PostgreSQL: the rollups as views (computed when read)."""
    return [
        f"CREATE OR REPLACE VIEW {r.name} AS {rollup_select(r.width_ns, timescale=False)}"
        for r in ROLLUPS
    ]


def cagg_statements(rollup: Rollup) -> list[str]:
    """TimescaleDB: one rollup as a real-time continuous aggregate with its refresh policy.

    Created empty (allowed inside a transaction); the writer refreshes it once over the
    existing rows right after, outside any transaction.
    """
    return [
        f"CREATE MATERIALIZED VIEW IF NOT EXISTS {rollup.name}"
        " WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS "
        f"{rollup_select(rollup.width_ns, timescale=True)} WITH NO DATA",
        f"SELECT add_continuous_aggregate_policy('{rollup.name}',"
        f" start_offset => {rollup.start_offset_ns}::BIGINT,"
        f" end_offset => {rollup.end_offset_ns}::BIGINT,"
        f" schedule_interval => INTERVAL '{rollup.schedule}', if_not_exists => true)",
    ]


def hypertable_statements(aging: Aging) -> list[str]:
    """TimescaleDB only, after `CREATE EXTENSION timescaledb`: the hypertable (an existing
    plain table's rows migrate into chunks), its chunk size, its integer-now function."""
    return [
        "SELECT create_hypertable('bars', 'start_ns',"
        f" chunk_time_interval => {aging.chunk_ns}::BIGINT,"
        " if_not_exists => true, migrate_data => true)",
        # Existing hypertables (1-day chunks before): the new size applies to new chunks.
        f"SELECT set_chunk_time_interval('bars', {aging.chunk_ns}::BIGINT)",
        "SELECT set_integer_now_func('bars', 'mdp_now_ns', replace_if_exists => true)",
    ]


# TimescaleDB only, once (not while compressed chunks exist): one compressed segment per
# symbol and interval in time order, which covers the primary key as TimescaleDB requires.
COMPRESSION_SETTINGS = (
    "ALTER TABLE bars SET (timescaledb.compress,"
    " timescaledb.compress_segmentby = 'symbol, bar_interval',"
    " timescaledb.compress_orderby = 'start_ns')"
)


def policy_statements(aging: Aging) -> list[str]:
    """TimescaleDB only: the compression and retention policies, replaced so that changed
    settings apply at the next start (0 leaves a policy out)."""
    statements = [
        "SELECT remove_compression_policy('bars', if_exists => true)",
        "SELECT remove_retention_policy('bars', if_exists => true)",
    ]
    if aging.compress_after_ns:
        statements.append(
            "SELECT add_compression_policy('bars',"
            f" compress_after => {aging.compress_after_ns}::BIGINT)"
        )
    if aging.retention_ns:
        statements.append(
            f"SELECT add_retention_policy('bars', drop_after => {aging.retention_ns}::BIGINT)"
        )
    return statements
