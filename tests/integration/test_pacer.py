"""The Pacer against a real nats-server: pacers on separate connections (as separate processes
would be) share one budget through the KV record, and cooldowns and request limits with it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from fractions import Fraction

import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue

from mdp.services.provider.pacing import COOLDOWNS, TOKENS_GRANTED, WAITS, Pacer, unlimited
from mdp.services.provider.ratelimit import PacingConfig
from mdp.shared.contract import names
from mdp.shared.contract.records import RateRecord
from mdp.shared.natsserver import EmbeddedNats

pytestmark = pytest.mark.integration

S = 1_000_000_000


@pytest.fixture
async def kvs(nats_server: EmbeddedNats) -> AsyncIterator[list[KeyValue]]:
    """The checkpoints bucket, seen through three separate connections."""
    clients: list[NATS] = [await nats.connect(nats_server.url) for _ in range(3)]
    await (
        clients[0]
        .jetstream()
        .create_key_value(KeyValueConfig(bucket=names.KV_CHECKPOINTS, history=1))
    )
    yield [await c.jetstream().key_value(names.KV_CHECKPOINTS) for c in clients]
    for client in clients:
        await client.close()


def max_in_window(times: list[int], length_ns: int) -> int:
    """The most grants in any closed window of `length_ns` (sliding over every grant time)."""
    times = sorted(times)
    best, j = 0, 0
    for i, start in enumerate(times):
        j = max(j, i)
        while j < len(times) and times[j] <= start + length_ns:
            j += 1
        best = max(best, j - i)
    return best


async def draw(pacer: Pacer, until: float, stamps: list[int]) -> None:
    while time.monotonic() < until:
        await pacer.acquire()
        stamps.append(time.time_ns())


async def test_unlimited_returns_at_once_without_any_bucket() -> None:
    pacer = unlimited("synthetic")  # no KV at all: any traffic would fail
    started = time.monotonic()
    for _ in range(10_000):
        await pacer.acquire(1000)
    await pacer.pacing_error(5)
    assert time.monotonic() - started < 1
    assert not pacer.limited


async def test_two_pacers_share_one_budget_within_its_bound_and_use_it(
    kvs: list[KeyValue],
) -> None:
    rate, burst, ttl_s, run_s = 40, 6, 0.5, 3.0
    config = PacingConfig(messages_per_s=rate, message_burst=burst, block_ttl_s=ttl_s)
    pacers = [Pacer("shared", kv, config) for kv in kvs[:2]]
    stamps: list[list[int]] = [[], []]
    started = time.time_ns()
    until = time.monotonic() + run_s
    await asyncio.gather(*(draw(p, until, s) for p, s in zip(pacers, stamps, strict=True)))
    both = stamps[0] + stamps[1]
    for window_s in (0.1, 0.25, 0.5, 1, 2):
        # Tokens spent in a window were granted in it (at most burst + rate x T) or held when
        # it opened: at most one block per process, and never older than the block ttl.
        held = min(rate * ttl_s, len(pacers) * config.max_block)
        bound = burst + rate * window_s + held
        assert max_in_window(both, int(window_s * S)) <= bound, window_s
    # Separate budgets would grant each its own; one budget grants about rate x time in all.
    elapsed_s = (max(both) - started) / S
    assert len(both) <= burst + rate * (elapsed_s + ttl_s)
    assert len(both) >= 0.9 * rate * run_s, len(both)
    assert min(len(s) for s in stamps) >= 0.25 * rate * run_s, [len(s) for s in stamps]
    assert TOKENS_GRANTED.labels("shared")._value.get() == len(both)
    record = msgspec.json.decode(
        (await kvs[2].get(names.rate_key("shared"))).value, type=RateRecord
    )
    assert record.provider == "shared" and record.stamp_ns >= started
    assert 0 <= Fraction(record.level_num, record.level_den) <= burst


async def test_a_pacing_error_in_one_pauses_the_other(kvs: list[KeyValue]) -> None:
    config = PacingConfig(messages_per_s=1000, message_burst=10)
    tripper, other = Pacer("ib", kvs[0], config), Pacer("ib", kvs[1], config)
    await tripper.acquire()
    tripped = time.time_ns()
    await tripper.pacing_error(0.6)
    waits = WAITS.labels("ib")._value.get()
    assert COOLDOWNS.labels("ib")._value.get() == 1
    await other.acquire()  # no block in hand: it must ask the record, which says cool down
    assert time.time_ns() - tripped >= 0.6 * S
    assert WAITS.labels("ib")._value.get() == waits + 1
    # The process that saw the error stops at once, even before the record is read.
    await tripper.pacing_error(0.3)
    paused = time.monotonic()
    await tripper.acquire()
    assert time.monotonic() - paused >= 0.3


async def test_request_limits_bind_across_processes(kvs: list[KeyValue]) -> None:
    config = PacingConfig(
        messages_per_s=1000,
        message_burst=10,
        identical_interval_s=0.5,
        per_contract_requests=2,
        per_contract_window_s=0.4,
        historical_requests=3,
        historical_window_s=0.8,
    )
    a, b = Pacer("hist", kvs[0], config), Pacer("hist", kvs[1], config)
    started = time.monotonic()
    await a.acquire(key="AAPL:1d:bars")
    await b.acquire(key="AAPL:1d:bars")  # identical: not within 0.5 s of the first
    assert time.monotonic() - started >= 0.5
    started = time.monotonic()
    await a.acquire(contract="ES")
    await b.acquire(contract="ES")
    await a.acquire(contract="ES")  # a third within 0.4 s: waits for the first to leave
    assert time.monotonic() - started >= 0.4
    started = time.monotonic()
    for pacer in (a, b, a):
        await pacer.acquire(historical=True)
    await b.acquire(historical=True)  # a fourth within 0.8 s
    assert time.monotonic() - started >= 0.8


async def test_waiting_is_cancellable_bounded_and_follows_a_reload(kvs: list[KeyValue]) -> None:
    slow = PacingConfig(messages_per_s=0.01, message_burst=1)  # one token per 100 s
    pacer = Pacer("slow", kvs[0], slow)
    await pacer.acquire()
    with pytest.raises(ValueError, match="message_burst 1"):
        await pacer.acquire(2)  # never grantable: refused instead of waiting forever
    waiting = asyncio.create_task(pacer.acquire())
    await asyncio.sleep(0.2)
    assert not waiting.done()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    # A waiting acquire looks again at least every second: a reload that lifts the budget
    # releases it.
    waiting = asyncio.create_task(pacer.acquire())
    await asyncio.sleep(0.2)
    pacer.configure(None)
    await asyncio.wait_for(waiting, 2)
