"""JsPublisher against a real nats-server: rejected publishes are resent even when idle."""

from __future__ import annotations

import pytest
from nats.aio.client import Client as NATS
from nats.js.api import StreamConfig

from mdp.shared.bus.publisher import JsPublisher
from tests.conftest import wait_for

pytestmark = pytest.mark.integration


async def test_a_last_message_rejected_while_no_stream_answers_is_stored_later(nc: NATS) -> None:
    publisher = JsPublisher(nc)
    await publisher.start()
    try:
        # No stream yet: JetStream answers "no responders" (503), as during a leader election.
        await publisher.publish("late.one", b"the last message", {"Nats-Msg-Id": "late-1"})
        await wait_for(lambda: publisher._resync, 5, "the rejection")
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="LATE", subjects=["late.>"]))
        # Nothing else is published or flushed: the publisher must resend by itself.

        async def stored() -> bool:
            return (await js.stream_info("LATE")).state.messages == 1

        await wait_for(stored, 10, "the message to be resent and stored")
        await wait_for(lambda: publisher.in_flight == 0, 5, "its ack")
        assert (await js.get_last_msg("LATE", "late.one")).data == b"the last message"
    finally:
        await publisher.close()
