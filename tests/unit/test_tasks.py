"""Cancels and timeouts that hold even when the awaited code swallows one cancel."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time

import pytest

from mdp.cli import Interrupt
from mdp.shared.tasks import cancel_until_done, cancellable


async def _swallows_one_cancel(started: asyncio.Event) -> str:
    """What nats-py's connect loop does when a cancel meets an opening socket (Python 3.11)."""
    started.set()
    with contextlib.suppress(asyncio.CancelledError):  # the first cancel is lost
        await asyncio.sleep(30)
    await asyncio.sleep(30)
    return "finished"


async def test_a_cancel_of_the_caller_ends_code_that_swallows_one() -> None:
    started = asyncio.Event()
    caller = asyncio.create_task(cancellable(_swallows_one_cancel(started)))
    await started.wait()
    t0 = time.monotonic()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert time.monotonic() - t0 < 1


async def test_a_timeout_ends_code_that_swallows_one_cancel() -> None:
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        await cancellable(_swallows_one_cancel(asyncio.Event()), timeout=0.1)
    assert time.monotonic() - t0 < 1


async def test_a_result_and_an_error_pass_through() -> None:
    async def fails() -> None:
        raise ValueError("bad")

    assert await cancellable(asyncio.sleep(0, "value"), timeout=1) == "value"
    with pytest.raises(ValueError, match="bad"):
        await cancellable(fails())


async def test_a_task_that_outlives_the_patience_is_given_up() -> None:
    mortal = False

    async def stubborn() -> None:
        while not mortal:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                continue

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    assert await cancel_until_done(task, patience_s=0.2) is False
    mortal = True
    assert await cancel_until_done(task) is True


async def test_a_signal_whose_cancel_was_lost_still_stops_the_gentle_phase() -> None:
    started = asyncio.Event()
    task = asyncio.create_task(_swallows_one_cancel(started))
    await started.wait()
    interrupt = Interrupt(task)
    interrupt(signal.SIGTERM)  # cancels the task, which swallows it and goes on
    await asyncio.sleep(0.01)
    assert not task.done()
    stop = asyncio.Event()
    interrupt.stop_gently(stop)  # the command reaches its gentle phase: it stops at once
    assert stop.is_set()
    await cancel_until_done(task)
