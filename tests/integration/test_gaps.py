"""A live feed that goes silent: a gap event opens, closes when ticks return, no bar is invented."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import DeliverPolicy

from mdp.cli import control_request
from mdp.shared.contract.messages import Bar
from tests.conftest import PipelineFactory, wait_for

pytestmark = pytest.mark.integration


async def test_silent_subscribed_symbol_opens_then_closes_a_gap(
    pipeline: PipelineFactory, nc: NATS
) -> None:
    sup = pipeline(env={"MDP_AGGREGATOR__GAP_INTERVALS": "2", "MDP_POLICY__BARS__GRACE_MS": "100"})
    await sup.wait_ready()
    js = nc.jetstream()
    gaps: list[dict[str, Any]] = []
    bars: list[Bar] = []

    async def on_gap(msg: Any) -> None:
        gaps.append(msgspec.json.decode(msg.data))

    async def on_bar(msg: Any) -> None:
        bars.append(msgspec.json.decode(msg.data, type=Bar))

    await js.subscribe(
        "ingest.events.gap", cb=on_gap, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    await nc.subscribe("md.bars.1s.*", cb=on_bar)
    reply = await control_request(
        nc, "start", {"provider": "synthetic", "symbols": ["GAP.X"], "params": {"rate": 50}}
    )
    assert reply["ok"], reply
    await wait_for(lambda: len(bars) >= 2, 30, "bars from the live feed")

    # The feed dies: the provider process stops; the job stays wanted.
    provider = sup.children["provider"].proc
    assert provider is not None
    provider.terminate()
    provider.wait(30)
    await wait_for(lambda: any(g["state"] == "opened" for g in gaps), 30, "a gap opened")
    opened = next(g for g in gaps if g["state"] == "opened")
    assert opened["symbol"] == "GAP.X" and opened["interval"] == "1s"
    assert opened["missing_intervals"] == 2

    # The feed comes back.
    sup.spawn("provider")
    await wait_for(lambda: any(g["state"] == "closed" for g in gaps), 60, "the gap closed")
    closed = next(g for g in gaps if g["state"] == "closed")
    assert closed["since_ns"] == opened["since_ns"] and closed["until_ns"] > closed["since_ns"]
    assert [g["state"] for g in gaps] == ["opened", "closed"]

    # No flat bar was made up for the silent seconds.
    inside = [
        b for b in bars if opened["since_ns"] < b.start and b.end <= closed["until_ns"] - 10**9
    ]
    assert not inside, f"bars invented during the gap: {inside[:3]}"
    await control_request(nc, "stop", {"job": "default"})
