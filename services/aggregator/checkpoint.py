"""The aggregator's checkpoint: its format, and its compare-and-swap writes in the KV bucket.

A checkpoint is written only after every output of the messages it covers was acknowledged
(see the service's docstring). Writes are compare-and-swap on the revision last written: a swap
that fails because another instance wrote in between fences this one off (`Fenced`), so a zombie
that lost its lease can never overwrite the state of the instance that took over.
"""

from __future__ import annotations

import contextlib
import time
import zlib

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from prometheus_client import Gauge
from structlog.typing import FilteringBoundLogger

from services.aggregator.dedup import SeenSeqs
from shared.bus.consumer import StopConsuming
from shared.contract.messages import Bar
from shared.runtime import Context

__all__ = [
    "CHECKPOINT_MAX_PENDING",
    "Checkpoint",
    "CheckpointStore",
    "CheckpointTooLarge",
    "Fenced",
    "decode_checkpoint",
    "encode_checkpoint",
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


def decode_checkpoint(data: bytes) -> Checkpoint:
    """Inverse of `encode_checkpoint`."""
    return msgspec.msgpack.decode(zlib.decompress(data), type=Checkpoint)


class Fenced(StopConsuming):
    """Another instance owns this consumer now: stop without acking anything."""


class CheckpointTooLarge(StopConsuming):
    """A checkpoint larger than the server's max_payload: retrying cannot help."""


class CheckpointStore:
    """One consumer's checkpoint under `key`: `load`, then compare-and-swap `save`s."""

    def __init__(self, ctx: Context, kv: KeyValue, key: str) -> None:
        self.key = key
        self.revision = 0  # of our last write (or of the checkpoint loaded); 0: none yet
        self._ctx = ctx  # stopped when fenced off or when a checkpoint cannot fit
        self._kv = kv
        self._log: FilteringBoundLogger = ctx.log
        self._attempted = b""  # the last checkpoint we tried to write
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
        checkpoint = decode_checkpoint(entry.value)
        self.revision = entry.revision or 0
        self._saved()
        return checkpoint

    def _saved(self) -> None:
        """Note a checkpoint just written or restored; its age is a gauge from then on."""
        if self.saved_at is None:
            CHECKPOINT_AGE.labels(self.key.rsplit(".", 1)[-1]).set_function(self.age)
        self.saved_at = time.monotonic()

    def age(self) -> float:
        """Seconds since the last checkpoint this instance wrote or restored (0 before one)."""
        return 0.0 if self.saved_at is None else time.monotonic() - self.saved_at

    async def save(self, checkpoint: Checkpoint) -> None:
        """Write with compare-and-swap; stop the service and raise Fenced if another instance
        wrote meanwhile, or CheckpointTooLarge (the service crashed) if it cannot fit."""
        data = encode_checkpoint(checkpoint)
        max_payload = self._ctx.nc.max_payload  # as the server announced it (on reconnect too)
        if len(data) > max_payload:
            # Retrying cannot help: say what to change, and stop instead of spinning.
            problem = (
                f"checkpoint of {len(data)} bytes exceeds the server's max_payload "
                f"({max_payload}): raise max_payload, shorten the revise window, or "
                "split the symbols over more partitions (MDP_STREAM__QUOTE_PARTITIONS)"
            )
            self._log.error("checkpoint_too_large", problem=problem)
            self._ctx.crashed = True
            self._ctx.stopping.set()
            raise CheckpointTooLarge(problem)
        previous, self._attempted = self._attempted, data
        for _ in range(2):
            try:
                if self.revision:
                    self.revision = await self._kv.update(self.key, data, last=self.revision)
                else:
                    self.revision = await self._kv.create(self.key, data)
                self._saved()
                return
            except KeyWrongLastSequenceError as exc:
                await self._fenced_unless_ours(exc, previous)

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
