"""Hot standbys: `"standby": true` also starts the job's fallback sources, which stop with it;
a standby nothing can provide is refused precisely and disturbs nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from mdp.shared.natsserver import EmbeddedNats
from tests.conftest import wait_for
from tests.conftest_control import System, start_system, stop_system

pytestmark = pytest.mark.integration
DATA = Path(__file__).resolve().parents[1] / "data"

PROVIDERS = """
synthetic:
  enabled: true
  symbols: [AAA, BBB, CCC]
  params: {rate: 20}
backup:
  enabled: true
  symbols: []
  params: {rate: 20, seed: 2}
replay:
  enabled: true
  symbols_from_source: true
fallback:
  default: [%s]
  symbols:
    CCC: [synthetic]
"""


async def states(system: System) -> dict[str, str]:
    return {view["job"]: view["state"] for view in (await system.ok("status"))["jobs"]}


async def test_standbys_start_and_stop_with_their_job(tmp_path: Path) -> None:
    server = EmbeddedNats(tmp_path / "nats", log_file=tmp_path / "nats.log")
    server.start()
    system = await start_system(
        server,
        tmp_path,
        ("provider", "control"),
        env={"MDP_PROVIDER__ADAPTERS": "synthetic,replay,tests.backup_adapter:BackupAdapter"},
        configs={"data_providers.yaml": PROVIDERS % "synthetic, backup, replay"},
    )
    try:
        await wait_for(lambda: _hosted(system, "backup"), 20, "the provider to announce backup")
        reply = await system.ok("start", {"provider": "synthetic", "standby": True})
        assert reply["job"]["symbols"] == ["AAA", "BBB", "CCC"]
        # CCC's order names no other source; replay is a bounded input, never a standby.
        [standby] = reply["standbys"]
        assert (standby["job"], standby["provider"], standby["symbols"]) == (
            "default-standby-backup",
            "backup",
            ["AAA", "BBB"],
        )
        assert standby["standby_of"] == "default" and standby["params"]["seed"] == 2

        async def both_running() -> bool:
            s = await states(system)
            return s.get("default") == "running" and s.get("default-standby-backup") == "running"

        await wait_for(both_running, 20, "the job and its standby to run")
        assert (await system.ok("status"))["limits"]["running"] == 2

        stop = await system.ok("stop", {"job": "default"})
        assert stop["status"] == "stopped"
        await wait_for(lambda: _no_jobs(system), 20, "the standby to stop with its job")
        stops = {r["job"] for r in (await system.ok("status"))["stopped"]}
        assert {"default", "default-standby-backup"} <= stops

        # A bounded job cannot have standbys; nothing is started.
        replay = {"path": str(DATA / "lean_equity_20131008_slice.ticks.csv.gz")}
        refused = await system.request(
            "start", {"provider": "replay", "params": replay, "standby": True}
        )
        assert refused.code == "invalid_request", refused.body
        assert "only a live job" in refused.body["error"]["message"]
        # A symbol whose order names no other source: no_fallback, with the order and the keys.
        refused = await system.request(
            "start", {"provider": "synthetic", "symbols": ["CCC"], "standby": True}
        )
        assert refused.code == "no_fallback", refused.body
        message = refused.body["error"]["message"]
        assert "synthetic" in message and "fallback.default" in message, message
        assert await states(system) == {}
    finally:
        await stop_system(system)
        server.stop()


async def _hosted(system: System, adapter: str) -> bool:
    hosts = (await system.ok("status"))["hosts"]
    return any(a["name"] == adapter and a["live"] for h in hosts for a in h["adapters"])


async def _no_jobs(system: System) -> bool:
    return await states(system) == {}
