"""One NATS connection per process: unlimited reconnects, logged callbacks, its own inbox."""

from __future__ import annotations

from collections.abc import Callable

import nats
from nats.aio.client import Client as NATS
from structlog.typing import FilteringBoundLogger

from mdp.shared.settings import Settings


async def connect(
    settings: Settings,
    name: str,
    log: FilteringBoundLogger,
    on_disconnect: Callable[[], None] | None = None,
    on_closed: Callable[[], None] | None = None,
) -> NATS:
    """Connect with unlimited reconnects, logging callbacks and a per-service inbox prefix.

    The first connect retries without limit too (a service may start before its server), so
    the caller races it against its stop signal. `on_closed` is called when the connection is
    closed, asked for or not: a caller that did not ask exits non-zero rather than idle.
    """

    async def on_error(exc: Exception) -> None:
        log.warning("nats_error", error=repr(exc))

    async def on_disconnected() -> None:
        if on_disconnect is not None:
            on_disconnect()
        if not nc.is_draining and not nc.is_closed:
            log.warning("nats_disconnected")

    async def on_reconnected() -> None:
        log.info("nats_reconnected", url=str(nc.connected_url.netloc if nc.connected_url else ""))

    async def closed() -> None:
        log.info("nats_closed")
        if on_closed is not None:
            on_closed()

    nc = await nats.connect(
        servers=[u.strip() for u in settings.nats_url.split(",")],
        name=f"mdp-{name}",
        inbox_prefix=f"_INBOX.mdp-{name}",
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=5,
        allow_reconnect=True,
        error_cb=on_error,
        disconnected_cb=on_disconnected,
        reconnected_cb=on_reconnected,
        closed_cb=closed,
        pending_size=64 * 1024 * 1024,
        # Bounded: a subscription whose reader was cancelled at shutdown never drains, and
        # nats-py's default (30 s) equals a supervisor's patience before SIGKILL.
        drain_timeout=5,
    )
    return nc
