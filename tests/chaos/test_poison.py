"""Poison among the ticks: each bad message is acked, counted and dead-lettered; bars stay exact."""

from __future__ import annotations

import asyncio
import math
import random
from collections import Counter
from pathlib import Path

import msgspec
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import DeliverPolicy

from mdp.cli import replay_file
from mdp.shared.contract import names
from mdp.shared.contract.codec import MSGPACK
from mdp.shared.contract.names import DLQ_REASON
from tests.chaos.test_kill import SEEDS
from tests.conftest import DATA, PipelineFactory, wait_for
from tests.integration.test_pipeline import assert_store_matches_reference

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

STEM = "lean_equity_20131008_slice"
TS = 1_381_239_000_000_000_000  # inside the slice's day


def poison(kind: int, i: int) -> tuple[str, bytes, dict[str, str]]:
    """One bad message of each of several kinds, on a plausible raw subject."""
    symbol = ["SPY", "AIG", "BAC", "IBM", "BRK.B"][i % 5]
    subject = names.raw("replay", symbol)
    tick = {"ts": TS + i, "recv": TS + i, "seq": i + 1, "price": 10.0, "size": 1.0}
    json_ct = {"Content-Type": "application/json"}
    if kind == 0:
        return subject, b'{"symbol": "SPY", "provider": "replay", "ticks": [', json_ct
    if kind == 1:
        body = {"symbol": symbol, "provider": "replay", "ticks": [{**tick, "price": "ten"}]}
        return subject, msgspec.json.encode(body), json_ct
    if kind == 2:
        body = {"symbol": symbol, "provider": "replay", "ticks": [{**tick, "price": math.nan}]}
        return subject, msgspec.msgpack.encode(body), {"Content-Type": MSGPACK}
    if kind == 3:
        body = {"symbol": symbol, "provider": "replay", "ticks": [{**tick, "size": -5.0}]}
        return subject, msgspec.json.encode(body), json_ct
    if kind == 4:
        body = {"symbol": symbol, "provider": "replay", "ticks": [{**tick, "ts": 42}]}
        return subject, msgspec.json.encode(body), json_ct
    if kind == 5:  # ten years in the future
        far = {**tick, "ts": TS + 10 * 365 * 86400 * 10**9}
        body = {"symbol": symbol, "provider": "replay", "ticks": [far]}
        return subject, msgspec.json.encode(body), json_ct
    body = {"symbol": "NOT-" + symbol, "provider": "replay", "ticks": [tick]}  # wrong subject
    return subject, msgspec.json.encode(body), json_ct


@pytest.mark.parametrize("seed", SEEDS)
async def test_a_thousand_poison_messages_are_dead_lettered_and_bars_stay_exact(
    pipeline: PipelineFactory, nc: NATS, tmp_path: Path, seed: int
) -> None:
    rng = random.Random(seed)
    print(f"seed={seed}")
    store_url = f"sqlite:///{tmp_path / 'bars.db'}"
    sup = pipeline(store_url=store_url, env={"MDP_PROVIDER__BATCH_MAX_TICKS": "100"})
    await sup.wait_ready()
    js = nc.jetstream()
    messages = [poison(rng.randrange(7), i) for i in range(1000)]

    async def inject() -> None:
        for subject, data, headers in messages:
            await js.publish(subject, data, headers=headers)
            if rng.random() < 0.05:
                await asyncio.sleep(0.001)  # spread them among the real ticks

    injector = asyncio.create_task(inject())
    await replay_file(nc, DATA / f"{STEM}.ticks.csv.gz", "max", timeout=120)
    await injector
    await assert_store_matches_reference(store_url, STEM)

    reasons: Counter[str] = Counter()

    async def on_dlq(msg: object) -> None:
        reasons[msg.headers[DLQ_REASON].split(" ")[0]] += 1  # type: ignore[attr-defined]

    sub = await js.subscribe(
        "md.dlq.router", cb=on_dlq, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    await wait_for(lambda: sum(reasons.values()) >= 1000, 60, "1000 dead letters")
    info = await js.stream_info("MD_DLQ", subjects_filter="md.dlq.>")
    await sub.unsubscribe()
    assert info.state.messages == 1000, info.state.subjects
    assert sum(reasons.values()) == 1000
    assert all(reasons.values())
