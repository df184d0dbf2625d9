"""Store fixtures: a fresh PostgreSQL database per test (skipped when none is reachable).

Load with `pytest_plugins = ["tests.conftest_store"]`. The server is taken from
`MDP_TEST_POSTGRES_URL` (a URL to a maintenance database, default
`postgresql://postgres@127.0.0.1:5432/postgres`), or, where a Docker engine exists, started with
testcontainers from the image `MDP_TEST_POSTGRES_IMAGE` names (`pip install testcontainers`;
e.g. `timescale/timescaledb:latest-pg16`, which also runs the Timescale-only statements). The
machines CI runs on have no Docker engine: there the local server is the path that runs.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

PG_ADMIN_URL = os.environ.get(
    "MDP_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
PG_IMAGE = os.environ.get("MDP_TEST_POSTGRES_IMAGE", "")


def _start_container(image: str) -> str:
    """Start a PostgreSQL container for the session (stopped at exit); its admin URL."""
    import atexit

    from testcontainers.postgres import PostgresContainer  # type: ignore[import-not-found]

    container = PostgresContainer(image, username="postgres", password="postgres")
    container.start()
    atexit.register(container.stop)
    host, port = container.get_container_host_ip(), container.get_exposed_port(5432)
    return f"postgresql://postgres:postgres@{host}:{port}/postgres"


if PG_IMAGE:
    PG_ADMIN_URL = _start_container(PG_IMAGE)

# Probed once per session: a missing server costs one connect timeout, not one per test.
_pg_probe: dict[str, str | None] = {}


def database_url(admin_url: str, database: str) -> str:
    """`admin_url` pointing at `database` instead of the maintenance database."""
    parts = urlsplit(admin_url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, parts.fragment))


async def admin_connect() -> asyncpg.Connection:
    """A connection to the maintenance database (to create and drop test databases)."""
    return await asyncpg.connect(PG_ADMIN_URL, timeout=5)


async def _pg_unreachable() -> str | None:
    """Why PostgreSQL cannot be used, or None when it can."""
    if PG_ADMIN_URL not in _pg_probe:
        try:
            conn = await admin_connect()
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            host = urlsplit(PG_ADMIN_URL).netloc.rpartition("@")[2]
            _pg_probe[PG_ADMIN_URL] = (
                f"PostgreSQL not reachable at {host} (set MDP_TEST_POSTGRES_URL): "
                f"{type(exc).__name__}: {exc}"
            )
        else:
            await conn.close()
            _pg_probe[PG_ADMIN_URL] = None
    return _pg_probe[PG_ADMIN_URL]


async def drop_database(name: str) -> None:
    """Drop database `name`, disconnecting its sessions (PostgreSQL 13+)."""
    conn = await admin_connect()
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def create_database(name: str) -> None:
    """Create the empty database `name`."""
    conn = await admin_connect()
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


@pytest.fixture
async def postgres_url() -> AsyncIterator[str]:
    """A URL to a freshly created, empty database of its own, dropped after the test."""
    reason = await _pg_unreachable()
    if reason:
        pytest.skip(reason)
    # Random, so parallel runs (xdist, several checkouts, CI jobs) never share a database.
    name = f"mdp_test_{secrets.token_hex(6)}"
    await create_database(name)
    try:
        yield database_url(PG_ADMIN_URL, name)
    finally:
        await drop_database(name)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLite store URL in the test's directory, under a folder that does not exist yet."""
    return f"sqlite:///{tmp_path / 'store' / 'bars.db'}"
