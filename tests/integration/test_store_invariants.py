"""The store checks every bar's invariants (a real store process and nats-server).

Bad bars among good ones on `store.sync.bus` and `store.sync.http`: each bad one is
dead-lettered on its own on `md.dlq.store` with its reason, the subject and the stream sequence,
and every good bar of the same batch is stored; the ingest API refuses such a batch whole.
"""

from __future__ import annotations

import math
from typing import Any

import aiohttp
import msgspec
import pytest
from nats.js.api import DeliverPolicy

from mdp.shared.contract import names
from mdp.shared.contract.codec import MSGPACK
from mdp.shared.contract.messages import Bar, BarBatch
from tests.conftest import wait_for
from tests.conftest_control import System, module_nats_fixture  # noqa: F401 (fixtures)
from tests.integration.test_store_modes import (
    STORE_TOKEN,
    bars,
    drained,
    publish,
    store_system_fixture,  # noqa: F401 (fixture)
    stored,
)

pytestmark = pytest.mark.integration


def broken(good: Bar, **changes: Any) -> Bar:
    """`good` with some fields changed."""
    return msgspec.structs.replace(good, **changes)


async def dead_letters(system: System, into: list[Any]) -> Any:
    async def on_dead(msg: Any) -> None:
        into.append(msg)

    return await system.nc.jetstream().subscribe(
        names.dlq("store"), cb=on_dead, ordered_consumer=True, deliver_policy=DeliverPolicy.NEW
    )


@pytest.mark.parametrize("subject", [names.STORE_SYNC_BUS, names.STORE_SYNC_HTTP])
async def test_bad_bars_are_dead_lettered_alone_and_the_good_ones_stored(
    store_system: System, subject: str
) -> None:
    system = store_system
    symbol = "INV" + subject.rsplit(".", 1)[-1].upper()
    good = bars(symbol, 6)
    bad = [
        (broken(good[1], high=8.0, low=9.0), "invalid bar: high 8.0 < low 9.0"),
        (broken(good[2], open=99.0), "invalid bar: open 99.0 outside [low 11.0, high 13.0]"),
        (broken(good[3], end=good[3].start), "invalid bar: end "),
        (broken(good[4], volume=-1.0), "invalid bar: volume -1.0 is negative"),
        (broken(good[5], interval="1m"), "but interval '1m' is 60000000000 ns"),
    ]
    kept = [good[0], broken(good[1], start=good[1].start + 10**12, end=good[1].end + 10**12)]
    seen: list[Any] = []
    sub = await dead_letters(system, seen)
    try:
        # One batch mixing good and bad bars, one of good bars only.
        mixed = [kept[0], *(b for b, _ in bad[:3]), kept[1], *(b for b, _ in bad[3:])]
        await publish(system, subject, BarBatch(f"mixed-{symbol}", mixed))
        others = bars(symbol + "X", 3)
        await publish(system, subject, BarBatch(f"others-{symbol}", others))
        # NaN cannot travel as JSON; msgpack carries it.
        nan = broken(bars(symbol + "N", 1)[0], close=math.nan)
        fine = bars(symbol + "N", 2)[1]
        await system.nc.jetstream().publish(
            subject,
            msgspec.msgpack.encode(BarBatch(f"nan-{symbol}", [nan, fine])),
            headers={names.CONTENT_TYPE: MSGPACK, names.MSG_ID: f"batch:nan-{symbol}"},
        )
        durable = "store-writer" if subject == names.STORE_SYNC_BUS else "store-http-forwarder"
        await wait_for(lambda: drained(system, durable), 20, "the store to take the batches")
        await wait_for(lambda: len(seen) >= len(bad) + 1, 20, "a dead letter per bad bar")

        stored_bars = sorted(await stored(system, symbol), key=lambda b: b.start)
        assert stored_bars == sorted(kept, key=lambda b: b.start)
        assert await stored(system, symbol + "X") == others
        assert await stored(system, symbol + "N") == [fine]

        assert len(seen) == len(bad) + 1, [m.headers for m in seen]
        by_start = {msgspec.json.decode(m.data, type=Bar).start: m for m in seen[: len(bad)]}
        for bar, reason in bad:
            dead = by_start[bar.start]
            assert msgspec.json.decode(dead.data, type=Bar) == bar
            assert reason in dead.headers[names.DLQ_REASON], dead.headers
            assert dead.headers[names.DLQ_SUBJECT] == subject
            assert dead.headers[names.DLQ_SERVICE] == "store"
            # The id names the source message's stream sequence and the bar's place in it.
            assert dead.headers[names.MSG_ID].startswith(f"dlq:store:{subject}:")
            assert not dead.headers[names.MSG_ID].startswith(f"dlq:store:{subject}:0:")
        assert "prices and volume must be finite" in seen[-1].headers[names.DLQ_REASON]
    finally:
        await sub.unsubscribe()


async def test_the_ingest_api_refuses_a_batch_with_a_bad_bar_whole(store_system: System) -> None:
    system = store_system
    url = (await system.kv(names.KV_STATE, names.HTTP_STORE_KEY))["url"]
    good = bars("APIINV", 3)
    batch = BarBatch("api-inv", [good[0], broken(good[1], high=1.0), good[2]])
    auth = {"Authorization": f"Bearer {STORE_TOKEN}", names.CONTENT_TYPE: "application/json"}
    body = msgspec.json.encode(batch)
    async with aiohttp.ClientSession() as http, http.post(url, data=body, headers=auth) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert error["code"] == "invalid_bar"
    assert "1 of 3 bars break the bar invariants; the first, bars[1]" in error["message"]
    assert "high 1.0 < low 10.0" in error["message"]
    assert await stored(system, "APIINV") == []
