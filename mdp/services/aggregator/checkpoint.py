"""The aggregator's checkpoint: its format, and its compare-and-swap writes in the KV bucket.

A checkpoint is written only after every output of the messages it covers was acknowledged
(see the service's docstring). Writes are compare-and-swap on the revision last written: a swap
that fails because another instance wrote in between fences this one off (`Fenced`), so a zombie
that lost its lease can never overwrite the state of the instance that took over.

A checkpoint larger than one message (a thousand symbols with a minute of revisable bars is
about 1 MB compressed) is written in parts under keys of a fresh generation, and then the head
(`PartedHead`: generation, part count, size, SHA-256) is swapped in: the swap stays the one
atomic step, so a crash between parts leaves the previous checkpoint whole. The previous
generation's parts are deleted after the swap.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import uuid
import zlib

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from prometheus_client import Gauge
from structlog.typing import FilteringBoundLogger

from mdp.services.aggregator.dedup import SeenSeqs
from mdp.shared.bus.consumer import StopConsuming
from mdp.shared.contract import names
from mdp.shared.contract.messages import Bar
from mdp.shared.runtime import Context

__all__ = [
    "CHECKPOINT_MAX_PENDING",
    "Checkpoint",
    "CheckpointStore",
    "Fenced",
    "PartedHead",
    "decode_checkpoint",
    "encode_checkpoint",
    "encode_checkpoint_async",
]

CHECKPOINT_AGE = Gauge(
    "mdp_aggregator_checkpoint_age_seconds",
    "Seconds since the consumer's checkpoint was last written (or restored, by this instance)",
    ["consumer"],
)

# Past this many waiting bars a checkpoint sends the batch first, to keep checkpoints small.
CHECKPOINT_MAX_PENDING = 2000


class Checkpoint(msgspec.Struct):
    """Everything needed to resume exactly: see the service's module docstring."""

    last_seq: int
    engine: bytes
    pending: list[Bar]
    suppressed: dict[str, list[Bar]]
    sources: dict[str, SeenSeqs]
    dry_run: list[str]
    waiting_eos: dict[str, str] = {}
    gaps: bytes = b""


def encode_checkpoint(checkpoint: Checkpoint) -> bytes:
    """msgpack, compressed: the retained bars of many symbols compress several times over."""
    return zlib.compress(msgspec.msgpack.encode(checkpoint), 1)


COMPRESS_IN_THREAD_BYTES = 256 * 1024


async def encode_checkpoint_async(checkpoint: Checkpoint) -> bytes:
    """`encode_checkpoint`, compressing a large one in a thread (zlib releases the GIL there),
    so that the event loop goes on closing bars meanwhile: ~25 ms at 375 symbols' full window.
    The msgpack part stays on the loop: it must see the state as it is now."""
    raw = msgspec.msgpack.encode(checkpoint)
    if len(raw) < COMPRESS_IN_THREAD_BYTES:
        return zlib.compress(raw, 1)
    return await asyncio.to_thread(zlib.compress, raw, 1)


def decode_checkpoint(data: bytes) -> Checkpoint:
    """Inverse of `encode_checkpoint`."""
    return msgspec.msgpack.decode(zlib.decompress(data), type=Checkpoint)


class Fenced(StopConsuming):
    """Another instance owns this consumer now: stop without acking anything."""


class PartedHead(msgspec.Struct, frozen=True):
    """The stored head of a checkpoint written in parts (after `PARTED_MAGIC`)."""

    generation: str
    parts: int
    size: int
    sha256: str


# A head starts with this; an inline checkpoint is zlib data, which never does.
PARTED_MAGIC = b"MDPCK1"
# Room left in each message for the KV subject and headers.
PART_HEADROOM = 4096


class CheckpointStore:
    """One consumer's checkpoint under `key`: `load`, then compare-and-swap `save`s."""

    def __init__(self, ctx: Context, kv: KeyValue, key: str) -> None:
        self.key = key
        self.revision = 0  # of our last write (or of the checkpoint loaded); 0: none yet
        self._ctx = ctx  # stopped when fenced off or when a checkpoint cannot fit
        self._kv = kv
        self._log: FilteringBoundLogger = ctx.log
        self._attempted = b""  # the last checkpoint we tried to write
        self._generation: PartedHead | None = None  # the parts our current head names
        self.saved_at: float | None = None  # monotonic time of the last write (or load)

    async def load(self) -> Checkpoint | None:
        """The stored checkpoint (adopting its revision), or None when there is none."""
        self.revision = 0
        try:
            entry = await self._kv.get(self.key)
        except KeyNotFoundError:
            return None
        if not entry.value:
            return None
        data = entry.value
        if data.startswith(PARTED_MAGIC):
            head = msgspec.msgpack.decode(data[len(PARTED_MAGIC) :], type=PartedHead)
            data = await self._read_parts(head)
            self._generation = head
        checkpoint = decode_checkpoint(data)
        self.revision = entry.revision or 0
        self._saved()
        return checkpoint

    async def _read_parts(self, head: PartedHead) -> bytes:
        chunks = []
        for index in range(head.parts):
            entry = await self._kv.get(names.checkpoint_part_key(self.key, head.generation, index))
            chunks.append(entry.value or b"")
        data = b"".join(chunks)
        if len(data) != head.size or hashlib.sha256(data).hexdigest() != head.sha256:
            raise ValueError(f"checkpoint {self.key}: its parts do not match their head")
        return data

    def _saved(self) -> None:
        """Note a checkpoint just written or restored; its age is a gauge from then on."""
        if self.saved_at is None:
            CHECKPOINT_AGE.labels(self.key.rsplit(".", 1)[-1]).set_function(self.age)
        self.saved_at = time.monotonic()

    def age(self) -> float:
        """Seconds since the last checkpoint this instance wrote or restored (0 before one)."""
        return 0.0 if self.saved_at is None else time.monotonic() - self.saved_at

    async def save(self, checkpoint: Checkpoint) -> None:
        """Write with compare-and-swap (in parts when it does not fit one message); stop the
        service and raise Fenced if another instance wrote meanwhile."""
        data = await encode_checkpoint_async(checkpoint)
        # As the server announced it (on reconnect too).
        part_size = max(1024, self._ctx.nc.max_payload - PART_HEADROOM)
        head: PartedHead | None = None
        value = data
        if len(data) > part_size:
            head = PartedHead(uuid.uuid4().hex[:16], -(-len(data) // part_size), len(data),
                              hashlib.sha256(data).hexdigest())  # fmt: skip
            for index in range(head.parts):
                part = names.checkpoint_part_key(self.key, head.generation, index)
                await self._kv.put(part, data[index * part_size : (index + 1) * part_size])
            value = PARTED_MAGIC + msgspec.msgpack.encode(head)
        previous, self._attempted = self._attempted, value
        for _ in range(2):
            try:
                if self.revision:
                    self.revision = await self._kv.update(self.key, value, last=self.revision)
                else:
                    self.revision = await self._kv.create(self.key, value)
                self._saved()
                break
            except KeyWrongLastSequenceError as exc:
                await self._fenced_unless_ours(exc, previous)
        else:
            # Not swapped in: the stored head still names the previous parts, which must stay.
            if head is not None:
                await self._delete_parts(head)
            raise KeyWrongLastSequenceError(f"checkpoint {self.key}: not written after 2 swaps")
        old, self._generation = self._generation, head
        if old is not None and old != head:
            await self._delete_parts(old)

    async def _delete_parts(self, head: PartedHead) -> None:
        """Best effort: a part left behind is garbage, never read (no head names it)."""
        for index in range(head.parts):
            with contextlib.suppress(Exception):
                await self._kv.purge(names.checkpoint_part_key(self.key, head.generation, index))

    async def _fenced_unless_ours(self, exc: Exception, previous: bytes) -> None:
        """A failed swap is fine when the stored value is our own last write (its reply was
        lost in an outage): adopt its revision. Anything else means another instance wrote."""
        with contextlib.suppress(Exception):
            entry = await self._kv.get(self.key)
            if entry.value == previous and entry.revision:
                self.revision = entry.revision
                return
        self._log.error("fenced_off", key=self.key, error=repr(exc))
        self._ctx.stopping.set()
        raise Fenced(str(exc)) from exc
