"""Dead letters: a rejected message to `md.dlq.<service>`, its reason in headers.

A dead letter always fits: the original payload is truncated to what `max_payload` leaves
beside the headers, and its length and SHA-256 travel in `Mdp-Dlq-Size` / `Mdp-Dlq-Sha256`.
"""

from __future__ import annotations

import contextlib
import hashlib

from nats.aio.msg import Msg

from mdp.shared.bus.consumer import stream_sequence
from mdp.shared.bus.publisher import JsPublisher, message_size
from mdp.shared.contract import names
from mdp.shared.metrics import DEAD_LETTERS


async def dead_letter(
    publisher: JsPublisher, service: str, msg: Msg, reason: str, reason_class: str
) -> None:
    """Publish a rejected message to `md.dlq.<service>` with the reason in headers."""
    msg_id = None
    with contextlib.suppress(Exception):
        msg_id = names.dead_letter_id(service, msg.subject, stream_sequence(msg))
    await dead_letter_payload(
        publisher, service, msg.subject, msg.data, msg.headers, reason, reason_class, msg_id
    )


async def dead_letter_payload(
    publisher: JsPublisher,
    service: str,
    subject: str,
    data: bytes,
    original_headers: dict[str, str] | None,
    reason: str,
    reason_class: str,
    msg_id: str | None,
) -> None:
    """Dead-letter a payload that was on (or meant for) `subject`, truncated to fit."""
    headers = dict(original_headers or {})
    headers.pop(names.MSG_ID, None)
    headers[names.DLQ_REASON] = reason[:1000].replace("\r", " ").replace("\n", " ")
    headers[names.DLQ_SUBJECT] = subject
    headers[names.DLQ_SERVICE] = service
    if msg_id is not None:
        headers[names.MSG_ID] = msg_id
    headers[names.DLQ_SIZE] = str(len(data))
    headers[names.DLQ_SHA256] = hashlib.sha256(data).hexdigest()
    limit = publisher.max_payload
    if message_size(data, headers) > limit:
        # Drop the original's own headers first when they alone crowd the payload out.
        for key in [k for k in headers if not k.startswith("Mdp-Dlq") and k != names.MSG_ID]:
            if message_size(b"", headers) + 1024 <= limit:
                break
            del headers[key]
        room = max(0, limit - message_size(b"", headers) - 64)  # 64: the truncation header
        headers[names.DLQ_TRUNCATED] = str(room)
        data = data[:room]
    DEAD_LETTERS.labels(service, reason_class).inc()
    await publisher.publish(names.dlq(service), data, headers)
