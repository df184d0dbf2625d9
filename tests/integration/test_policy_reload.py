"""A reload of `bars`, `batching` and `fallback` takes effect in the running aggregator and
router, without a restart, and `status` shows the values published."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from mdp.shared.contract.messages import Bar, BarBatch
from mdp.shared.natsserver import EmbeddedNats
from tests.conftest import wait_for
from tests.conftest_control import start_system, stop_system

pytestmark = pytest.mark.integration

POLICY = """
bars:
  intervals: [%s]
  grace_ms: 100
batching:
  max_rows: %d
  max_delay_ms: 50
"""


async def test_reloaded_bars_and_batching_apply_without_a_restart(tmp_path: Path) -> None:
    server = EmbeddedNats(tmp_path / "nats", log_file=tmp_path / "nats.log")
    server.start()
    system = await start_system(
        server,
        tmp_path,
        ("provider", "router", "aggregator", "control"),
        configs={"ingestion_policy.yaml": POLICY % ("1s", 1000)},
    )
    bars: list[tuple[str, Bar]] = []
    batch_sizes: list[int] = []

    async def on_bar(msg: Any) -> None:
        bars.append((msg.subject.split(".")[2], msgspec.json.decode(msg.data, type=Bar)))

    async def on_batch(msg: Any) -> None:
        batch_sizes.append(len(msgspec.json.decode(msg.data, type=BarBatch).bars))

    try:
        await system.nc.subscribe("md.bars.>", cb=on_bar)
        await system.nc.subscribe("store.sync.bus", cb=on_batch)
        await system.ok(
            "start", {"provider": "synthetic", "symbols": ["AAA", "BBB"], "params": {"rate": 20}}
        )
        await wait_for(lambda: len(bars) >= 4, 20, "1s bars")
        assert {interval for interval, _ in bars} == {"1s"}

        system.write_config("ingestion_policy.yaml", POLICY % ("1s, 2s", 1))
        reply = await system.ok("reload")
        await system.wait_policy_seen("aggregator", reply["policy_revision"])
        marker = len(bars), len(batch_sizes)
        await wait_for(
            lambda: sum(i == "2s" for i, _ in bars[marker[0] :]) >= 4, 20, "2s bars after reload"
        )
        # Two symbols close their 1s bars together: one batch each now, with max_rows 1.
        await wait_for(lambda: len(batch_sizes) > marker[1] + 4, 10, "batches after reload")
        assert set(batch_sizes[marker[1] + 2 :]) == {1}, batch_sizes[marker[1] :]
        status = await system.ok("status")
        assert status["effective"]["bars"]["intervals"] == ["1s", "2s"]
        assert status["effective"]["batching"]["max_rows"] == 1
        assert status["effective"]["revision"] == reply["policy_revision"]
        # The 1s bars go on uninterrupted beside the new interval.
        assert sum(i == "1s" for i, _ in bars[marker[0] :]) >= 4
        await system.ok("stop", {"job": "default"})
    finally:
        await stop_system(system)
        server.stop()
