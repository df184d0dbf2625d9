"""Fixtures: a real nats-server from the wheel, the five services as real subprocesses."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NATS

from mdp.shared.natsserver import EmbeddedNats
from mdp.supervisor import Supervisor

pytest_plugins = ["tests.conftest_store"]

DATA = Path(__file__).parent / "data"
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """A private nats-server with JetStream, its store in the test's temporary directory."""
    server = EmbeddedNats(tmp_path / "nats", log_file=tmp_path / "nats-server.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def nc(nats_server: EmbeddedNats) -> AsyncIterator[NATS]:
    """A client connection to the test's server."""
    client = await nats.connect(nats_server.url)
    yield client
    await client.close()


PipelineFactory = Callable[..., Supervisor]


@pytest.fixture
def pipeline(nats_server: EmbeddedNats, tmp_path: Path) -> Iterator[PipelineFactory]:
    """Start the five services (optionally a subset, with extra env) against the test's server."""
    started: list[Supervisor] = []

    def start(
        store_url: str | None = None,
        services: tuple[str, ...] = ("provider", "router", "aggregator", "store", "control"),
        env: dict[str, str] | None = None,
    ) -> Supervisor:
        sup = Supervisor(
            data_dir=tmp_path / f"pipeline{len(started)}",
            store_url=store_url or f"sqlite:///{tmp_path / 'mdp.db'}",
            nats_url=nats_server.url,
            services=services,
            env={"MDP_LOG_LEVEL": "INFO", **(env or {})},
            say=lambda line: print(line),
        )
        sup.start()
        started.append(sup)
        return sup

    yield start
    for sup in started:
        codes = sup.stop()
        bad = {name: code for name, code in codes.items() if code != 0}
        assert not bad, f"services did not stop cleanly: {bad} (logs in {sup.log_dir})"


async def wait_for(
    condition: Callable[[], object], timeout: float = 30.0, what: str = "condition"
) -> None:
    """Poll an (a)sync condition until it is truthy, failing with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


def postgres_available() -> bool:
    """Whether the PostgreSQL of this machine (or MDP_TEST_POSTGRES) accepts connections."""
    import socket

    host, port = os.environ.get("MDP_TEST_PG_HOST", "127.0.0.1"), 5432
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False
