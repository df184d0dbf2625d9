"""Becoming the active instance of a consumer: retried activation, and keeping the lease."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from structlog.typing import FilteringBoundLogger

from mdp.shared.lease import Lease, LeaseLost

__all__ = ["activate_with_retries", "keep_lease"]


async def activate_with_retries(
    become_active: Callable[[], Awaitable[None]],
    stopping: asyncio.Event,
    log: FilteringBoundLogger,
) -> None:
    """Run `become_active` until it succeeds or the service stops, backing off up to 10 s."""
    backoff = 0.5
    while not stopping.is_set():
        try:
            await become_active()
            return
        except Exception as exc:  # e.g. a timeout while the cluster elects a leader
            log.warning("activation_retry", error=repr(exc), retry_in_s=backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)


async def keep_lease(lease: Lease, stopping: asyncio.Event, log: FilteringBoundLogger) -> None:
    """Renew the lease until cancelled; once another instance took it, stop the service."""
    try:
        await lease.keep()
    except LeaseLost:
        log.error("lease_lost", key=lease.key)
        stopping.set()
