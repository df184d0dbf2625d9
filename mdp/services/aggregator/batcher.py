"""The hybrid batcher: bars go to the store in batches cut by rows, bytes or age (pure, no I/O).

A batch is cut as soon as it holds `max_rows` bars or `max_bytes` bytes, or when its oldest bar
has waited `max_delay_ns`. A bar that would push a non-empty batch over `max_bytes` starts the
next batch; a single bar larger than `max_bytes` still goes out, alone. The caller measures the
bar's encoded size and supplies the clock, which keeps this module deterministic.
"""

from __future__ import annotations

from hashlib import blake2b

from mdp.shared.contract.messages import Bar, BarBatch

__all__ = ["BarBatcher", "batch_id"]


def batch_id(bars: list[Bar]) -> str:
    """A deterministic id for a batch: 16 hex chars of blake2b over its bars' ids, in order."""
    digest = blake2b(digest_size=8)
    for bar in bars:
        digest.update(bar.bar_id.encode())
        digest.update(b"\n")  # a separator, so that different splits of ids never collide
    return digest.hexdigest()


class BarBatcher:
    """Accumulates bars into `BarBatch`es cut by rows, bytes or the age of the oldest bar."""

    def __init__(self, max_rows: int, max_bytes: int, max_delay_ns: int) -> None:
        if max_rows < 1 or max_bytes < 1 or max_delay_ns < 0:
            raise ValueError("max_rows and max_bytes must be >= 1, max_delay_ns >= 0")
        self._max_rows = max_rows
        self._max_bytes = max_bytes
        self._max_delay = max_delay_ns
        self._bars: list[Bar] = []
        self._bytes = 0
        self._oldest_ns = 0  # when the first pending bar was added

    def retune(self, max_rows: int, max_bytes: int, max_delay_ns: int) -> None:
        """New limits (a policy reload); a batch already beyond them is cut at the next bar."""
        if max_rows < 1 or max_bytes < 1 or max_delay_ns < 0:
            raise ValueError("max_rows and max_bytes must be >= 1, max_delay_ns >= 0")
        self._max_rows, self._max_bytes, self._max_delay = max_rows, max_bytes, max_delay_ns

    @property
    def pending_rows(self) -> int:
        """Bars waiting in the current batch."""
        return len(self._bars)

    @property
    def pending_bytes(self) -> int:
        """Bytes (as reported by `add`) waiting in the current batch."""
        return self._bytes

    @property
    def pending(self) -> list[Bar]:
        """A copy of the bars waiting in the current batch (for checkpoints)."""
        return list(self._bars)

    @property
    def next_deadline_ns(self) -> int | None:
        """When the pending batch becomes due by age; None when nothing is pending."""
        return self._oldest_ns + self._max_delay if self._bars else None

    def add(self, bar: Bar, size_bytes: int, now_ns: int) -> list[BarBatch]:
        """Add one bar; return the batches that became full (zero, one or two)."""
        out: list[BarBatch] = []
        if self._bars and self._bytes + size_bytes > self._max_bytes:
            out.append(self._cut())
        if not self._bars:
            self._oldest_ns = now_ns
        self._bars.append(bar)
        self._bytes += size_bytes
        if len(self._bars) >= self._max_rows or self._bytes >= self._max_bytes:
            out.append(self._cut())
        return out

    def due(self, now_ns: int) -> list[BarBatch]:
        """The pending batch if its oldest bar has waited at least `max_delay_ns`."""
        if self._bars and now_ns - self._oldest_ns >= self._max_delay:
            return [self._cut()]
        return []

    def flush(self) -> list[BarBatch]:
        """Whatever is pending, as one batch (nothing when empty)."""
        return [self._cut()] if self._bars else []

    def _cut(self) -> BarBatch:
        bars = self._bars
        self._bars = []
        self._bytes = 0
        return BarBatch(batch_id=batch_id(bars), bars=bars)
