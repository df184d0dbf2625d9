"""The one place that touches nats-py's private state; pinned to the tested range in pyproject.

nats-py keeps commands written while disconnected in `Client._pending` (a list of encoded
protocol commands, with their total size in `_pending_data_size`) and sends them first after a
reconnect. The publisher must take its own publishes out of that buffer (see
`JsPublisher.disconnected`). `tests/unit/test_nats_internals.py` fails loudly when a nats-py
release changes this shape; `supported()` lets the publisher fall back to the older behaviour
(possible reordering across an outage, never loss) instead of corrupting the client.
"""

from __future__ import annotations

from nats.aio.client import Client as NATS

TESTED_RANGE = ">=2.16,<2.17"


def supported(nc: NATS) -> bool:
    """Whether this client has the reconnect buffer in the shape we rely on."""
    return isinstance(getattr(nc, "_pending", None), list) and isinstance(
        getattr(nc, "_pending_data_size", None), int
    )


def drop_buffered_publishes(nc: NATS, reply_prefix: str) -> int:
    """Drop buffered `HPUB`s replying to `reply_prefix.*`; return how many bytes went."""
    if not supported(nc) or not reply_prefix:
        return 0
    buffer: list[bytes] = nc._pending
    marker = f" {reply_prefix}.".encode()
    kept = [cmd for cmd in buffer if not (cmd[:5] == b"HPUB " and marker in cmd[:512])]
    removed = sum(len(cmd) for cmd in buffer) - sum(len(cmd) for cmd in kept)
    if removed:
        buffer[:] = kept
        nc._pending_data_size = max(0, nc._pending_data_size - removed)
    return removed
