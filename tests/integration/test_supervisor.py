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


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def test_an_embedded_server_has_a_soft_memory_limit_unless_the_environment_sets_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GOMEMLIMIT", raising=False)
    for given, expected in ((None, "768MiB"), ("2GiB", "2GiB")):
        if given:
            monkeypatch.setenv("GOMEMLIMIT", given)
        server = EmbeddedNats(tmp_path / f"nats-{expected}")
        server.start()
        try:
            assert server.proc is not None
            assert _environ(server.proc.pid)["GOMEMLIMIT"] == expected
        finally:
            server.stop()
