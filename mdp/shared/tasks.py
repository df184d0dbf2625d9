"""Awaiting code that may swallow a cancel, in bounded time.

On Python 3.11 `asyncio.wait_for` returns its inner result when a cancel lands in the same
loop iteration as that result (fixed in 3.12). nats-py connects through such `wait_for`s, so
a SIGTERM that arrives just as a TCP connection opens is lost and the connect loop goes on
retrying forever. Running that code in its own task and cancelling it until it ends makes
the caller's cancel and timeout hold whatever the callee does with one cancel.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")

RECANCEL_EVERY_S = 0.05


async def cancel_until_done(task: asyncio.Future[Any], patience_s: float = 5.0) -> bool:
    """Cancel `task` again every 50 ms until it ends; False if it outlived `patience_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience_s
    while not task.done():
        if loop.time() >= deadline:
            return False
        task.cancel()
        await asyncio.wait({task}, timeout=RECANCEL_EVERY_S)
    if not task.cancelled():
        task.exception()  # retrieved: a failure while cancelling is not logged as unhandled
    return True


async def cancellable(awaitable: Awaitable[T], timeout: float | None = None) -> T:
    """Await `awaitable` in its own task; a cancel here, or `timeout` (TimeoutError), ends it."""
    task: asyncio.Future[T] = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    except asyncio.CancelledError:
        await cancel_until_done(task)
        raise
    if not done:
        await cancel_until_done(task)
        raise TimeoutError
    return task.result()
