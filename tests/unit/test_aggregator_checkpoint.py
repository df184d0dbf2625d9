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

from mdp.services.aggregator.checkpoint import (
    PART_HEADROOM,
    PARTED_MAGIC,
    Checkpoint,
    CheckpointStore,
    Fenced,
    decode_checkpoint,
    encode_checkpoint,
)
from mdp.services.aggregator.dedup import SeenSeqs
from mdp.shared.contract.messages import Bar

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
    parts: dict[str, bytes] = field(default_factory=dict)  # every other key: plain puts

    async def get(self, key: str) -> Any:
        if key != KEY:
            if key not in self.parts:
                raise KeyNotFoundError()
            return SimpleNamespace(value=self.parts[key], revision=1)
        if self.value is None:
            raise KeyNotFoundError()
        return SimpleNamespace(value=self.value, revision=self.revision)

    async def put(self, key: str, data: bytes) -> int:
        assert key != KEY, "the head is only ever swapped"
        self.parts[key] = data
        return 1

    async def purge(self, key: str) -> None:
        self.parts.pop(key, None)

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


async def test_a_checkpoint_larger_than_a_message_is_written_in_parts_and_swapped_in() -> None:
    big = checkpoint(1)
    big.pending = [
        Bar(f"S{i}", "1s", i * 10**9, (i + 1) * 10**9, 1.0 + i, 2.0 + i, 0.5, 1.5, float(i),
            i, 1.2, "p", 0)
        for i in range(3000)
    ]  # fmt: skip
    kv = FakeKV()
    s, ctx = store(kv, max_payload=8192)
    await s.save(big)
    assert kv.value is not None and kv.value.startswith(PARTED_MAGIC)
    first = dict(kv.parts)
    assert len(first) >= 2 and all(len(v) <= 8192 - PART_HEADROOM for v in first.values())
    loaded, _ = store(kv, max_payload=8192)
    assert await loaded.load() == big
    big.last_seq = 2
    await s.save(big)  # a new generation; the old one's parts are gone
    assert not set(first) & set(kv.parts) and kv.parts
    await s.save(checkpoint(3))  # small again: inline, and no part left
    assert kv.parts == {} and decode_checkpoint(kv.value or b"").last_seq == 3
    assert not ctx.stopping.is_set() and not ctx.crashed
    await s.save(big)
    kv.parts.pop(sorted(kv.parts)[0])  # a part lost: the head never loads a partial state
    with pytest.raises(KeyNotFoundError):
        await store(kv)[0].load()


async def test_a_parted_checkpoint_that_is_never_swapped_in_keeps_the_stored_one_whole() -> None:
    big = checkpoint(1)
    big.pending = [
        Bar(f"S{i}", "1s", i * 10**9, (i + 1) * 10**9, 1.0 + i, 2.0 + i, 0.5, 1.5, float(i),
            i, 1.2, "p", 0)
        for i in range(3000)
    ]  # fmt: skip
    kv = FakeKV()
    s, _ = store(kv, max_payload=8192)
    await s.save(big)
    stored_parts = dict(kv.parts)

    async def always_refused(key: str, data: bytes, last: int) -> int:
        raise KeyWrongLastSequenceError("wrong last sequence")

    kv.update = always_refused  # type: ignore[method-assign]
    s._attempted = kv.value or b""  # the stored head reads as our own write: adopted, not fenced
    big.last_seq = 2
    with pytest.raises(KeyWrongLastSequenceError):
        await s.save(big)
    assert kv.parts == stored_parts  # the new parts are gone, the stored head's all there
    assert (await store(kv, max_payload=8192)[0].load()) is not None
