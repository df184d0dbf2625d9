"""Dead letters: a rejected message to `md.dlq.<service>`, its reason in headers."""

from __future__ import annotations

import contextlib

from nats.aio.msg import Msg

from shared.bus.consumer import stream_sequence
from shared.bus.publisher import JsPublisher
from shared.contract import names
from shared.metrics import DEAD_LETTERS


async def dead_letter(
    publisher: JsPublisher, service: str, msg: Msg, reason: str, reason_class: str
) -> None:
    """Publish a rejected message to `md.dlq.<service>` with the reason in headers."""
    headers = dict(msg.headers or {})
    headers.pop(names.MSG_ID, None)
    headers[names.DLQ_REASON] = reason[:1000].replace("\r", " ").replace("\n", " ")
    headers[names.DLQ_SUBJECT] = msg.subject
    headers[names.DLQ_SERVICE] = service
    with contextlib.suppress(Exception):
        headers[names.MSG_ID] = names.dead_letter_id(service, msg.subject, stream_sequence(msg))
    DEAD_LETTERS.labels(service, reason_class).inc()
    await publisher.publish(names.dlq(service), msg.data, headers)
