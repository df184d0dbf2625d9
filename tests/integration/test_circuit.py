"""mdp.shared.circuit against a real nats-server: KV records, compare-and-swap, circuit events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import msgspec
import nats
import pytest
import structlog
from nats.aio.client import Client as NATS
from nats.js.kv import KeyValue

from mdp.shared.breaker import BreakerConfig
from mdp.shared.bus.declare import ensure_buckets, ensure_streams
from mdp.shared.bus.publisher import JsPublisher
from mdp.shared.circuit import Circuits
from mdp.shared.contract import names
from mdp.shared.contract.events import Circuit
from mdp.shared.contract.records import CircuitRecord
from mdp.shared.natsserver import EmbeddedNats
from mdp.shared.settings import StreamSettings
from tests.conftest import wait_for

pytestmark = pytest.mark.integration

S = 1_000_000_000
LOG = structlog.get_logger("test")


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: int = 1_000 * S) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


@dataclass
class Writer:
    """One process's view: its own connection, publisher and Circuits."""

    nc: NATS
    kv: KeyValue
    publisher: JsPublisher
    circuits: Circuits


async def writer(server: EmbeddedNats, config: BreakerConfig, clock: Clock) -> Writer:
    nc = await nats.connect(server.url)
    js = nc.jetstream()
    await ensure_streams(js, StreamSettings())
    await ensure_buckets(js, StreamSettings())
    publisher = JsPublisher(nc)
    await publisher.start()
    kv = await js.key_value(names.KV_STATE)
    return Writer(nc, kv, publisher, Circuits(kv, publisher, config, LOG, clock))


@pytest.fixture
async def clock() -> Clock:
    return Clock()


@pytest.fixture
async def writers(nats_server: EmbeddedNats, clock: Clock) -> AsyncIterator[list[Writer]]:
    config = BreakerConfig(failure_threshold=3, window_s=10, recovery_s=5)
    made = [await writer(nats_server, config, clock) for _ in range(2)]
    yield made
    for w in made:
        await w.publisher.close()
        await w.nc.close()


async def stored(w: Writer, provider: str) -> tuple[CircuitRecord, int]:
    entry = await w.kv.get(names.circuit_key(provider))
    assert entry.value
    return msgspec.json.decode(entry.value, type=CircuitRecord), int(entry.revision or 0)


async def circuit_events(nc: NATS, into: list[Circuit]) -> object:
    async def on_event(msg: nats.aio.msg.Msg) -> None:
        into.append(msgspec.json.decode(msg.data, type=Circuit))

    return await nc.subscribe(names.event("circuit"), cb=on_event)


async def test_open_half_open_probe_close_in_kv_with_events(
    writers: list[Writer], clock: Clock
) -> None:
    w = writers[0]
    events: list[Circuit] = []
    await circuit_events(w.nc, events)
    # Nothing to store yet: a closed breaker without failures leaves the bucket alone.
    assert (await w.circuits.allow("ibkr")).result is True
    assert await w.circuits.load("ibkr") == (None, 0)

    first = await w.circuits.record_failure("ibkr", "connection")
    assert first.result is None and first.view.failures == 1
    clock.now += 1
    await w.circuits.record_failure("ibkr", "pacing")
    clock.now += 1
    opened = await w.circuits.record_failure("ibkr", "data_stopped")
    assert opened.result is not None and opened.result.reason == "failure_threshold"
    record, revision = await stored(w, "ibkr")
    assert (record.state, record.opened_at_ns, record.updated_ns) == ("open", clock.now, clock.now)
    assert revision == opened.revision
    assert opened.view.next_allowed_ns == clock.now + 5 * S

    # While open: no call, and a refused allow writes nothing.
    denied = await w.circuits.allow("ibkr")
    assert denied.result is False and (await stored(w, "ibkr"))[1] == revision
    clock.now += 5 * S
    view = await w.circuits.read("ibkr")
    assert view.state == "half_open"  # read at now, not written:
    assert (await stored(w, "ibkr"))[0].state == "open"

    probe = await w.circuits.allow("ibkr")
    assert probe.result is True and probe.record.state == "half_open"
    assert (await w.circuits.allow("ibkr")).result is False  # one probe at a time
    closed = await w.circuits.record_success("ibkr")
    assert closed.record.state == "closed" and closed.record.failures_ns == []

    await wait_for(lambda: len(events) == 3, 5, "three circuit events")
    assert [(e.provider, e.from_state, e.to_state, e.reason) for e in events] == [
        ("ibkr", "closed", "open", "failure_threshold"),
        ("ibkr", "open", "half_open", "recovery_elapsed"),
        ("ibkr", "half_open", "closed", "probe_succeeded"),
    ]


async def test_reset_closes_and_is_a_no_op_when_closed(writers: list[Writer], clock: Clock) -> None:
    w = writers[0]
    for _ in range(3):
        clock.now += 1
        await w.circuits.record_failure("replay", "adapter_exception")
    _, revision = await stored(w, "replay")
    reset = await w.circuits.reset("replay")
    assert reset.result is not None and reset.result.reason == "manual_reset"
    assert (reset.result.from_state, reset.record.state) == ("open", "closed")
    again = await w.circuits.reset("replay")
    assert again.result is None and again.transitions == []
    assert (await stored(w, "replay"))[1] == reset.revision > revision


async def test_two_concurrent_writers_never_lose_a_failure(
    writers: list[Writer], clock: Clock
) -> None:
    # A threshold above every failure: each must land in the record (an open breaker ignores
    # stragglers, which would hide a lost update).
    for w in writers:
        w.circuits.config = BreakerConfig(failure_threshold=1000, window_s=3600, recovery_s=5)

    async def fail(w: Writer, n: int) -> None:
        for _ in range(n):
            clock.now += 1  # distinct timestamps, so a lost one cannot hide behind an equal one
            await w.circuits.record_failure("synthetic", "connection")

    await asyncio.gather(fail(writers[0], 25), fail(writers[1], 25))
    record, revision = await stored(writers[0], "synthetic")
    assert len(record.failures_ns) == 50
    assert record.state == "closed"
    assert revision >= 50  # one stored revision per failure: none overwrote another


async def test_concurrent_probes_grant_one(writers: list[Writer], clock: Clock) -> None:
    w = writers[0]
    for _ in range(3):
        clock.now += 1
        await w.circuits.record_failure("flaky", "connection")
    clock.now += 5 * S
    granted = await asyncio.gather(*(x.circuits.allow("flaky") for x in writers * 3))
    assert sum(o.result for o in granted) == 1
    assert len((await stored(w, "flaky"))[0].probes_started_ns) == 1


async def test_an_undecodable_record_is_replaced_by_the_next_change(
    writers: list[Writer], clock: Clock
) -> None:
    w = writers[0]
    await w.kv.put(names.circuit_key("broken"), b"{not json")
    assert (await w.circuits.read("broken")).state == "closed"
    outcome = await w.circuits.record_failure("broken", "connection")
    assert outcome.record.failures_ns == [clock.now]
    assert (await stored(w, "broken"))[0] == outcome.record
