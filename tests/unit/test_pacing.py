"""The Pacer shell on an in-memory KV: block sizes follow demand, failures fail closed."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from mdp.services.provider.pacing import Pacer, pacing_config
from mdp.services.provider.ratelimit import PacingConfig
from mdp.shared.config import PacingSection


@dataclass
class Entry:
    value: bytes
    revision: int


@dataclass
class MemoryKV:
    """get / create / update with revisions, as nats-py's KeyValue; `down` makes every call fail."""

    entries: dict[str, Entry] = field(default_factory=dict)
    writes: int = 0
    reads: int = 0
    down: bool = False
    revision: int = 0

    def _check(self) -> None:
        if self.down:
            raise ConnectionError("nats: no servers available")

    async def get(self, key: str) -> Entry:
        self._check()
        self.reads += 1
        if key not in self.entries:
            raise KeyNotFoundError
        return self.entries[key]

    async def create(self, key: str, value: bytes) -> int:
        self._check()
        if key in self.entries:
            raise KeyWrongLastSequenceError
        return self._put(key, value)

    async def update(self, key: str, value: bytes, last: int) -> int:
        self._check()
        if self.entries[key].revision != last:
            raise KeyWrongLastSequenceError
        return self._put(key, value)

    def _put(self, key: str, value: bytes) -> int:
        self.writes += 1
        self.revision += 1
        self.entries[key] = Entry(value, self.revision)
        return self.revision


def pacer(kv: MemoryKV, **config: Any) -> Pacer:
    return Pacer("p", kv, PacingConfig(**config))  # type: ignore[arg-type]


async def test_a_busy_process_takes_half_the_burst_per_write() -> None:
    kv = MemoryKV()
    p = pacer(kv, messages_per_s=200, message_burst=10)
    started = time.monotonic()
    for _ in range(200):
        await p.acquire()
    elapsed = time.monotonic() - started
    # 10 at once, then 190 at 200/s: about 0.95 s, and after the first few blocks (1, 2, 4)
    # every write takes 5 tokens.
    assert 0.9 <= elapsed < 1.5, elapsed
    assert kv.writes <= 3 + 200 // 5 + 1, kv.writes


async def test_a_quiet_process_takes_single_tokens_and_strands_none() -> None:
    kv = MemoryKV()
    p = pacer(kv, messages_per_s=1000, message_burst=10, block_ttl_s=0.05)
    for _ in range(4):  # grow the block to 5
        for _ in range(8):
            await p.acquire()
    writes = kv.writes
    for _ in range(4):  # then one message per block lifetime: blocks shrink to what is used
        await asyncio.sleep(0.06)
        await p.acquire()
    assert p._sizer.want == 1
    assert kv.writes == writes + 4  # every quiet acquire needed its own block


async def test_the_budget_unreachable_grants_nothing_until_it_is_back() -> None:
    kv = MemoryKV()
    p = pacer(kv, messages_per_s=1000, message_burst=10)
    await p.acquire()
    p._left = 0  # nothing in hand: the next acquire must ask the record
    kv.down = True
    waiting = asyncio.create_task(p.acquire())
    await asyncio.sleep(1.2)
    assert not waiting.done()  # fail closed
    kv.down = False
    await asyncio.wait_for(waiting, 2)


async def test_a_pacing_error_without_nats_pauses_this_process_and_returns() -> None:
    kv = MemoryKV(down=True)
    p = pacer(kv)
    started = time.monotonic()
    await asyncio.wait_for(p.pacing_error(0.3), 2)  # gives up writing once the cooldown passed
    assert time.monotonic() - started >= 0.3
    kv.down = False
    await p.pacing_error(0.4)
    started = time.monotonic()
    await p.acquire()
    assert time.monotonic() - started >= 0.35
    assert kv.writes >= 1


def test_the_yaml_section_maps_onto_the_limits() -> None:
    section = PacingSection(
        messages_per_second=7,
        message_burst=3,
        historical_requests=4,
        historical_window_seconds=5,
        identical_interval_seconds=6,
        per_contract_requests=8,
        per_contract_window_seconds=9,
        block_ttl_seconds=0.25,
    )
    assert pacing_config(section) == PacingConfig(
        messages_per_s=7,
        message_burst=3,
        historical_requests=4,
        historical_window_s=5,
        identical_interval_s=6,
        per_contract_requests=8,
        per_contract_window_s=9,
        block_ttl_s=0.25,
    )
    assert pacing_config(PacingSection()) == PacingConfig()  # IB's budgets, both sides


def test_a_budget_needs_the_bucket() -> None:
    with pytest.raises(ValueError, match="needs the KV bucket"):
        Pacer("p", None, PacingConfig())
