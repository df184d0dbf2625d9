"""A poison message is handled once; an outage is waited out, never dead-lettered."""

from __future__ import annotations

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import StreamConfig

from mdp.shared.bus.consumer import PullConsumer
from tests.conftest import wait_for

LOG = structlog.get_logger()


async def test_a_message_the_handler_keeps_failing_on_is_passed_to_poison_once(
    nc: NATS,
) -> None:
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="POISON", subjects=["poison.>"]))
    handled: list[bytes] = []
    poisoned: list[tuple[bytes, str]] = []
    outage = {"left": 3}  # the first attempts meet an "outage": waited out, not poison

    async def handler(msgs: list[Msg]) -> None:
        if outage["left"]:
            outage["left"] -= 1
            raise ConnectionResetError("the database went away")
        for msg in msgs:
            if msg.data == b"bad":
                raise ValueError("cannot fold this")
        handled.extend(m.data for m in msgs)

    async def poison(msg: Msg, error: str) -> None:
        poisoned.append((msg.data, error))

    for i in range(10):
        await js.publish("poison.x", b"bad" if i == 4 else str(i).encode())
    consumer = PullConsumer(
        nc, js, "POISON", "c", ["poison.>"], handler, LOG, batch=16, poison=poison, max_failures=3
    )
    await consumer.ensure()
    await consumer.start()
    try:
        await wait_for(lambda: len(handled) == 9, 30, "the nine good messages")
        assert handled == [str(i).encode() for i in range(10) if i != 4]
        assert poisoned == [(b"bad", "ValueError('cannot fold this')")]
        await js.publish("poison.x", b"10")
        await wait_for(lambda: handled[-1:] == [b"10"], 10, "the next message")
        assert len(poisoned) == 1
    finally:
        await consumer.stop()
