"""The local supervisor restarts a service that dies, with backoff, and says so."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from mdp.shared.natsserver import EmbeddedNats
from mdp.supervisor import Supervisor
from tests.conftest import wait_for

pytestmark = pytest.mark.integration


async def test_a_dead_service_is_restarted_and_announced(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    said: list[str] = []
    sup = Supervisor(
        data_dir=tmp_path,
        store_url=f"sqlite:///{tmp_path / 'x.db'}",
        nats_url=nats_server.url,
        services=("router",),
        say=said.append,
    )
    sup.start()
    try:
        await sup.wait_ready()
        first = sup.children["router"].proc
        assert first is not None
        first.kill()
        first.wait()

        def restarted() -> bool:
            sup.check()
            proc = sup.children["router"].proc
            return proc is not first and proc is not None and proc.poll() is None

        started = time.monotonic()
        await wait_for(restarted, 30, "the router to be restarted")
        await sup.wait_ready()
        assert any("router exited with code -9; restarting in" in line for line in said), said
        assert any(line == "service router restarted" for line in said), said
        assert time.monotonic() - started >= 0.5  # the first backoff step
    finally:
        codes = sup.stop()
    assert codes == {"router": 0}
