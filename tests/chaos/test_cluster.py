"""A 3-node JetStream cluster with R3 streams: SIGKILL the node leading the streams mid-stream."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from mdp.cli import replay_file
from mdp.supervisor import Supervisor
from tests.chaos.test_kill import SEEDS, kill_when
from tests.cluster import EmbeddedCluster
from tests.conftest import DATA, wait_for
from tests.integration.test_pipeline import assert_store_matches_reference

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

STEM = "lean_equity_20131008_slice"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EmbeddedCluster]:
    """Three nats-server processes on loopback, one cluster."""
    nodes = EmbeddedCluster(tmp_path / "cluster")
    nodes.start()
    yield nodes
    nodes.stop()


@pytest.mark.parametrize("seed", SEEDS)
async def test_killing_the_stream_leader_node_loses_and_doubles_nothing(
    cluster: EmbeddedCluster, tmp_path: Path, seed: int
) -> None:
    fraction = random.Random(seed).uniform(0.1, 0.6)
    print(f"seed={seed} kill the MD_QUOTES leader at {fraction:.0%} of the quotes")
    nc = await nats.connect(cluster.url.split(","), max_reconnect_attempts=-1)

    async def jetstream_ready() -> bool:
        try:
            await nc.jetstream().account_info()
            return True
        except Exception:
            return False

    await wait_for(jetstream_ready, 60, "the cluster's JetStream meta leader")
    store_url = f"sqlite:///{tmp_path / 'bars.db'}"
    sup = Supervisor(
        data_dir=tmp_path / "pipeline",
        store_url=store_url,
        nats_url=cluster.url,
        env={
            "MDP_STREAM__REPLICAS": "3",
            "MDP_PROVIDER__BATCH_MAX_TICKS": "40",
            "MDP_PROVIDER__BATCH_MAX_DELAY_MS": "20",
        },
        say=print,
    )
    sup.start()
    try:
        await sup.wait_ready(60)
        info = await nc.jetstream().stream_info("MD_QUOTES")
        assert info.config.num_replicas == 3
        leader = info.cluster.leader if info.cluster else None
        assert leader, "MD_QUOTES has no leader"
        print(f"MD_QUOTES leader: {leader}")
        replay = asyncio.create_task(
            replay_file(nc, DATA / f"{STEM}.ticks.csv.gz", "max", timeout=240)
        )
        await kill_when(nc, "MD_QUOTES", max(1, int(570 * fraction)), cluster.node(leader).kill)
        result = await replay
        assert result["ticks"] == 22_734
        await assert_store_matches_reference(store_url, STEM)
    finally:
        codes = sup.stop()
        await nc.close()
    assert all(code == 0 for code in codes.values()), codes
