"""The aggregator's checkpoint: its bytes format, and compare-and-swap writes with fencing."""

from __future__ import annotations

import asyncio
import zlib
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest
import structlog
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from services.aggregator.checkpoint import (
    Checkpoint,
    CheckpointStore,
    CheckpointTooLarge,
    Fenced,
    decode_checkpoint,
    encode_checkpoint,
)
from services.aggregator.dedup import SeenSeqs
from shared.contract.messages import Bar

KEY = "aggregator.aggregator"


def checkpoint(last_seq: int = 7) -> Checkpoint:
    bar = Bar("AAPL", "1s", 0, 1_000_000_000, 1.0, 2.0, 0.5, 1.5, 10.0, 3, 1.2, "t")
    return Checkpoint(
        last_seq=last_seq,
        engine=b"engine",
        pending=[bar],
        suppressed={"dry_run": [bar]},
        sources={"AAPL": SeenSeqs("r1", 3, [5])},
        dry_run=["AAPL"],
        waiting_eos={"AAPL": "{}"},
        gaps=b"gaps",
    )


def test_encoding_is_zlib_over_msgpack_and_round_trips() -> None:
    cp = checkpoint()
    data = encode_checkpoint(cp)
    assert data == zlib.compress(msgspec.msgpack.encode(cp), 1)
    assert msgspec.msgpack.decode(zlib.decompress(data))["engine"] == b"engine"
    assert decode_checkpoint(data) == cp


def test_an_old_checkpoint_without_eos_and_gaps_decodes() -> None:
    old = {
        "last_seq": 1,
        "engine": b"",
        "pending": [],
        "suppressed": {},
        "sources": {},
        "dry_run": [],
    }
    cp = decode_checkpoint(zlib.compress(msgspec.msgpack.encode(old)))
    assert cp.waiting_eos == {} and cp.gaps == b""


@dataclass
class FakeKV:
    """A KV bucket with one key's revisions, as nats-py's KeyValue answers."""

    value: bytes | None = None
    revision: int = 0
    lose_reply: bool = False  # write, then fail as a lost reply would
    writes: list[bytes] = field(default_factory=list)

    async def get(self, key: str) -> Any:
        if self.value is None:
            raise KeyNotFoundError()
        return SimpleNamespace(value=self.value, revision=self.revision)

    async def create(self, key: str, data: bytes) -> int:
        if self.value is not None:
            raise KeyWrongLastSequenceError("exists")
        return self._write(data)

    async def update(self, key: str, data: bytes, last: int) -> int:
        if last != self.revision:
            raise KeyWrongLastSequenceError("wrong last sequence")
        return self._write(data)

    def _write(self, data: bytes) -> int:
        self.value, self.revision = data, self.revision + 1
        self.writes.append(data)
        if self.lose_reply:
            self.lose_reply = False
            raise TimeoutError
        return self.revision


def store(kv: FakeKV, max_payload: int = 1 << 20) -> tuple[CheckpointStore, Any]:
    ctx = SimpleNamespace(
        nc=SimpleNamespace(max_payload=max_payload),
        log=structlog.get_logger(),
        stopping=asyncio.Event(),
        crashed=False,
    )
    return CheckpointStore(ctx, kv, KEY), ctx  # type: ignore[arg-type]


async def test_load_adopts_the_stored_revision() -> None:
    s, _ = store(FakeKV())
    assert await s.load() is None and s.revision == 0
    kv = FakeKV(value=encode_checkpoint(checkpoint()), revision=4)
    s, _ = store(kv)
    assert await s.load() == checkpoint()
    assert s.revision == 4
    await s.save(checkpoint(8))
    assert kv.revision == 5 and decode_checkpoint(kv.writes[-1]).last_seq == 8


async def test_save_creates_then_swaps() -> None:
    kv = FakeKV()
    s, ctx = store(kv)
    await s.save(checkpoint(1))
    await s.save(checkpoint(2))
    assert s.revision == kv.revision == 2
    assert not ctx.stopping.is_set()


async def test_our_own_write_whose_reply_was_lost_is_adopted() -> None:
    kv = FakeKV()
    s, ctx = store(kv)
    await s.save(checkpoint(1))
    kv.lose_reply = True
    with pytest.raises(TimeoutError):
        await s.save(checkpoint(2))
    assert s.revision == 1 and kv.revision == 2
    await s.save(checkpoint(3))  # the swap on 1 fails, but 2 is ours: adopt it, then swap
    assert kv.revision == 3 and decode_checkpoint(kv.writes[-1]).last_seq == 3
    assert not ctx.stopping.is_set()


async def test_another_writer_fences_us_off() -> None:
    kv = FakeKV()
    s, ctx = store(kv)
    await s.save(checkpoint(1))
    other, _ = store(kv)
    await other.load()
    await other.save(checkpoint(9))
    with pytest.raises(Fenced):
        await s.save(checkpoint(2))
    assert ctx.stopping.is_set() and not ctx.crashed
    assert decode_checkpoint(kv.value or b"").last_seq == 9


async def test_a_checkpoint_over_max_payload_crashes_the_service() -> None:
    kv = FakeKV()
    s, ctx = store(kv, max_payload=10)
    with pytest.raises(CheckpointTooLarge, match="exceeds the server's max_payload"):
        await s.save(checkpoint())
    assert ctx.crashed and ctx.stopping.is_set()
    assert kv.writes == []
