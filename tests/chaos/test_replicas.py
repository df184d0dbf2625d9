"""Scaling out and fencing: partitioned aggregator replicas, and a standby that takes over."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from pathlib import Path

import msgspec
import pytest
from nats.aio.client import Client as NATS

from mdp.cli import replay_file
from mdp.shared.contract.messages import Bar
from mdp.shared.contract.names import PRODUCER
from tests.chaos.test_kill import SEEDS, kill_when
from tests.conftest import DATA, PipelineFactory
from tests.integration.test_pipeline import assert_store_matches_reference

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

STEM = "lean_equity_20131008_slice"
BASE_ENV = {
    "MDP_STREAM__QUOTE_PARTITIONS": "2",
    "MDP_PROVIDER__BATCH_MAX_TICKS": "40",
    "MDP_PROVIDER__BATCH_MAX_DELAY_MS": "20",
}
SERVICES = ("provider", "router", "store", "control")


async def producers_by_symbol(nc: NATS) -> dict[str, list[str]]:
    """For each symbol, the instance that published each of its bars, in stream order."""
    js = nc.jetstream()
    info = await js.stream_info("MD_BARS")
    out: dict[str, list[str]] = defaultdict(list)
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await js.get_msg("MD_BARS", seq)
        bar = msgspec.json.decode(msg.data, type=Bar)
        out[bar.symbol].append((msg.headers or {})[PRODUCER])
    return out


def runs(sequence: list[str]) -> list[str]:
    """The distinct values of a sequence in order, consecutive repeats folded."""
    return [v for i, v in enumerate(sequence) if i == 0 or sequence[i - 1] != v]


async def test_two_partitioned_replicas_share_the_symbols_and_bars_stay_exact(
    pipeline: PipelineFactory, nc: NATS, tmp_path: Path
) -> None:
    store_url = f"sqlite:///{tmp_path / 'bars.db'}"
    main = pipeline(store_url=store_url, services=SERVICES, env=BASE_ENV)
    replicas = [
        pipeline(
            store_url=store_url,
            services=("aggregator",),
            env={**BASE_ENV, "MDP_AGGREGATOR__PARTITION": str(p)},
        )
        for p in (0, 1)
    ]
    for sup in (main, *replicas):
        await sup.wait_ready()
    await replay_file(nc, DATA / f"{STEM}.ticks.csv.gz", "max", timeout=120)
    await assert_store_matches_reference(store_url, STEM)
    producers = await producers_by_symbol(nc)
    assert set(producers) == {"SPY", "AIG", "BAC", "IBM"}
    for symbol, seen in producers.items():
        assert len(set(seen)) == 1, f"{symbol} bars came from several replicas: {set(seen)}"
    assert len({seen[0] for seen in producers.values()}) == 2, "one replica did all the work"


@pytest.mark.parametrize("seed", SEEDS)
async def test_a_standby_takes_over_when_the_active_replica_is_killed(
    pipeline: PipelineFactory, nc: NATS, tmp_path: Path, seed: int
) -> None:
    fraction = random.Random(seed).uniform(0.1, 0.7)
    print(f"seed={seed} kill the active aggregator at {fraction:.0%} of the bars")
    store_url = f"sqlite:///{tmp_path / 'bars.db'}"
    env = {**BASE_ENV, "MDP_STREAM__QUOTE_PARTITIONS": "1"}
    main = pipeline(store_url=store_url, services=(*SERVICES, "aggregator"), env=env)
    await main.wait_ready()
    standby = pipeline(store_url=store_url, services=("aggregator",), env=env)
    await standby.wait_ready()  # it answers PING while it waits for the lease

    replay = asyncio.create_task(replay_file(nc, DATA / f"{STEM}.ticks.csv.gz", "max", timeout=180))
    active = main.children["aggregator"].proc
    assert active is not None

    def kill_active() -> None:
        active.kill()
        active.wait()

    await kill_when(nc, "MD_BARS", max(1, int(1500 * fraction)), kill_active)
    result = await replay
    assert result["ticks"] == 22_734
    await assert_store_matches_reference(store_url, STEM)
    for symbol, seen in (await producers_by_symbol(nc)).items():
        # One writer at a time: the active replica, then (at most) the standby, never back.
        assert len(runs(seen)) <= 2, f"{symbol}: writers interleaved: {runs(seen)}"
    main.children.pop("aggregator")  # killed on purpose: not part of the clean stop
