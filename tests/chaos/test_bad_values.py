"""One bad value never stops a symbol, a service or the pipeline (issue findings 1, 2, 3, 5).

Through the five real services with a live synthetic feed: a tick dated 20 hours ahead on
`md.raw` (its receive time equally far ahead), one an hour ahead on `md.quotes`, a price and
size of 1e308, meme-coin sizes of 2e10, a 1,048,450-byte garbage message, and one tick in
seconds among good ones. Each bad one is dead-lettered on its own with its reason; the bars of
every symbol go on; every service still answers and stops cleanly.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import DeliverPolicy

from mdp.shared.contract import names
from mdp.shared.contract.messages import Bar, TickBatch
from tests.conftest import PipelineFactory, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.chaos]
HOUR = 3600 * 10**9


def batch(provider: str, symbol: str, ticks: list[dict[str, Any]]) -> bytes:
    return msgspec.json.encode({"symbol": symbol, "provider": provider, "ticks": ticks})


async def test_single_bad_values_are_rejected_alone_and_bars_go_on(
    pipeline: PipelineFactory, nc: NATS
) -> None:
    sup = pipeline()
    await sup.wait_ready()
    pids = {n: c.proc.pid for n, c in sup.children.items() if c.proc}
    js = nc.jetstream()
    bars: list[Bar] = []
    quotes: dict[str, list[int]] = {}
    dead: list[Any] = []

    async def on_bar(msg: Any) -> None:
        bars.append(msgspec.json.decode(msg.data, type=Bar))

    async def on_quote(msg: Any) -> None:
        got = msgspec.json.decode(msg.data, type=TickBatch)
        quotes.setdefault(got.symbol, []).extend(t.seq for t in got.ticks)

    async def on_dead(msg: Any) -> None:
        dead.append(msg)

    await nc.subscribe("md.bars.1s.>", cb=on_bar)
    await nc.subscribe("md.quotes.>", cb=on_quote)
    await js.subscribe(
        names.DLQ_ALL, cb=on_dead, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    start = {"provider": "synthetic", "symbols": ["AAA"], "params": {"rate": 50}}
    reply = await nc.request("ingest.control.start", msgspec.json.encode(start), timeout=10)
    assert msgspec.json.decode(reply.data)["ok"], reply.data

    def bars_of(symbol: str) -> list[Bar]:
        return [b for b in bars if b.symbol == symbol and b.rev == 0]

    await wait_for(lambda: len(bars_of("AAA")) >= 2, 30, "live bars of AAA")

    def reasons() -> list[str]:
        return [m.headers.get(names.DLQ_REASON, "") for m in dead]

    now = time.time_ns()
    # 1. Twenty hours ahead, the receive time as well: refused by the router's own clock.
    future = {"ts": now + 20 * HOUR, "recv": now + 20 * HOUR, "seq": 10**9, "price": 1, "size": 1}
    await js.publish(names.raw("synthetic", "AAA"), batch("synthetic", "AAA", [future]))
    # 1b. An hour ahead straight on md.quotes: held by the aggregator, then rejected.
    ahead = {"ts": now + HOUR, "recv": now, "seq": 10**9 + 1, "price": 1, "size": 1}
    await js.publish(names.quotes("AAA"), batch("synthetic", "AAA", [ahead]))
    # 2. 1e308 price and size; and meme-coin sizes whose volume passes 2**64 units.
    huge = {"ts": now, "recv": now, "seq": 1, "price": 1e308, "size": 1e308}
    await js.publish(names.quotes("HUGE"), batch("synthetic", "HUGE", [huge]))
    meme = [
        {"ts": now + i, "recv": now + i, "seq": 2 + i, "price": 1e-8, "size": 2e10}
        for i in range(100)
    ]
    await js.publish(names.quotes("PEPE"), batch("synthetic", "PEPE", meme))
    # 3. A garbage message just under max_payload: its dead letter must still fit.
    await js.publish(names.raw("synthetic", "AAA"), b"\xff" * 1_048_450)
    # 5. One tick in seconds among good ones: only that tick goes.
    mixed = [
        {"ts": now + i * 10**6, "recv": now, "seq": 1 + i, "price": 5, "size": 1} for i in range(10)
    ]
    mixed[4]["ts"] = now // 10**9
    await js.publish(names.raw("synthetic", "BBB"), batch("synthetic", "BBB", mixed))

    await wait_for(lambda: any("unconfirmed jump" in r for r in reasons()), 30, "the jump rejected")
    await wait_for(lambda: len(quotes.get("BBB", [])) == 9, 20, "the nine good ticks of BBB")
    assert sorted(quotes["BBB"]) == [1, 2, 3, 4, 6, 7, 8, 9, 10]
    await wait_for(lambda: len(dead) >= 5, 20, "five dead letters")
    text = " | ".join(reasons())
    assert "receive time" in text and "ahead of the router's clock" in text, text
    assert "price * size overflows" in text, text
    assert "absurd event time" in text, text
    big = [m for m in dead if m.headers.get(names.DLQ_SIZE) == "1048450"]
    assert big and names.DLQ_TRUNCATED in big[0].headers, [m.headers for m in dead]
    assert len(big[0].data) == int(big[0].headers[names.DLQ_TRUNCATED])

    # The symbol's bars go on, none of them in the future; PEPE's volume is exact.
    marker = len(bars_of("AAA"))
    await wait_for(lambda: len(bars_of("AAA")) >= marker + 3, 30, "AAA's bars to go on")
    assert max(b.start for b in bars_of("AAA")) < time.time_ns() + 60 * 10**9
    await wait_for(lambda: bars_of("PEPE"), 20, "PEPE's bar")
    assert sum(b.volume for b in bars_of("PEPE")) == 2e12
    await nc.request("ingest.control.stop", b'{"job": "default"}', timeout=10)
    for service in ("router", "aggregator", "store", "provider", "control"):
        await nc.request(f"$SRV.PING.mdp-{service}", b"", timeout=5)
    assert pids == {n: c.proc.pid for n, c in sup.children.items() if c.proc}, "a restart"
