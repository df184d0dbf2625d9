"""Per-symbol tick batching for the provider: full batches at once, partial ones after a delay.

Pure logic, no I/O and no clock of its own: the caller passes `now_ns` (a monotonic clock such
as `time.monotonic_ns()`), so it is tested without sleeping.
"""

from __future__ import annotations

from collections.abc import Sequence

from mdp.shared.contract.messages import Tick
from mdp.shared.settings import ProviderSettings

Batch = tuple[str, list[Tick]]


class TickBatcher:
    """Collects ticks per symbol into batches of at most `max_ticks`, none older than the delay.

    `add` hands back every batch that reached `max_ticks` (exactly that many ticks each); the
    remainder waits until it fills up or its oldest tick has waited `delay_ns`, which `due`
    reports. Ticks of one symbol leave in the order they came in, each exactly once.

    The delay is `max_delay_ns`, stretched under a message budget: with `messages_per_s` set,
    N symbols waiting wait N / `messages_per_s` seconds (never less than `max_delay_ns`, never
    more than `stretch_max_ns`), so a feed of many symbols sends about `messages_per_s`
    batches per second instead of one per symbol per `max_delay_ns`. Every message costs each
    hop of the pipeline far more than a tick inside it does.
    """

    __slots__ = (
        "_buffers",
        "_max_delay_ns",
        "_max_ticks",
        "_messages_per_s",
        "_pending",
        "_since",
        "_stretch_max_ns",
    )

    def __init__(
        self,
        max_ticks: int,
        max_delay_ns: int,
        *,
        messages_per_s: float = 0.0,
        stretch_max_ns: int = 0,
    ) -> None:
        if max_ticks < 1:
            raise ValueError(f"max_ticks must be >= 1, got {max_ticks}")
        if max_delay_ns < 0:
            raise ValueError(f"max_delay_ns must be >= 0, got {max_delay_ns}")
        if messages_per_s < 0 or stretch_max_ns < 0:
            raise ValueError("messages_per_s and stretch_max_ns must be >= 0")
        self._max_ticks = max_ticks
        self._max_delay_ns = max_delay_ns
        self._messages_per_s = messages_per_s
        self._stretch_max_ns = max(stretch_max_ns, max_delay_ns)
        self._buffers: dict[str, list[Tick]] = {}
        # Symbol -> when its buffered ticks started waiting. Buffers only ever start waiting at
        # "now", and a symbol is (re)inserted at the end whenever that happens, so with a
        # monotonic now_ns this dict is ordered by deadline: the oldest entry is always first.
        self._since: dict[str, int] = {}
        self._pending = 0

    @classmethod
    def from_settings(cls, settings: ProviderSettings) -> TickBatcher:
        """A batcher with the provider's `batch_max_ticks`, `batch_max_delay_ms`,
        `batch_messages_per_s` and `batch_stretch_max_ms`."""
        return cls(
            settings.batch_max_ticks,
            settings.batch_max_delay_ms * 1_000_000,
            messages_per_s=settings.batch_messages_per_s,
            stretch_max_ns=settings.batch_stretch_max_ms * 1_000_000,
        )

    @property
    def max_ticks(self) -> int:
        """The size of a full batch."""
        return self._max_ticks

    @property
    def max_delay_ns(self) -> int:
        """How long the oldest buffered tick of a symbol waits without a message budget."""
        return self._max_delay_ns

    @property
    def delay_ns(self) -> int:
        """How long the oldest buffered tick of a symbol waits now (stretched by the budget)."""
        if not self._messages_per_s:
            return self._max_delay_ns
        stretched = int(len(self._since) * 1e9 / self._messages_per_s)
        return min(self._stretch_max_ns, max(self._max_delay_ns, stretched))

    @property
    def pending(self) -> int:
        """Ticks buffered across all symbols."""
        return self._pending

    def __len__(self) -> int:
        return self._pending

    @property
    def next_deadline_ns(self) -> int | None:
        """When the oldest buffer becomes due (`now_ns` scale), or None when nothing is buffered."""
        since = next(iter(self._since.values()), None)
        return None if since is None else since + self.delay_ns

    def add(self, symbol: str, ticks: Sequence[Tick], now_ns: int) -> list[Batch]:
        """Buffer `ticks` of `symbol` and return the batches that are now full."""
        if not ticks:
            return []
        max_ticks = self._max_ticks
        buffer = self._buffers.get(symbol)
        if buffer is None:
            if len(ticks) < max_ticks:
                # The common case (a quiet symbol or a small input): just start a buffer.
                self._buffers[symbol] = list(ticks)
                self._since[symbol] = now_ns
                self._pending += len(ticks)
                return []
            buffer = []
        out: list[Batch] = []
        start = 0
        if buffer:
            need = max_ticks - len(buffer)
            if len(ticks) < need:
                buffer.extend(ticks)
                self._pending += len(ticks)
                return out
            buffer.extend(ticks[:need])
            out.append((symbol, buffer))
            self._pending -= len(buffer) - need
            start = need
        end = len(ticks)
        while end - start >= max_ticks:
            out.append((symbol, list(ticks[start : start + max_ticks])))
            start += max_ticks
        # Whatever remains arrived now: it starts a fresh wait at the end of the deadline order.
        self._since.pop(symbol, None)
        if start < end:
            self._buffers[symbol] = list(ticks[start:end])
            self._since[symbol] = now_ns
            self._pending += end - start
        else:
            self._buffers.pop(symbol, None)
        return out

    def due(self, now_ns: int) -> list[Batch]:
        """Remove and return the buffers whose oldest tick has waited at least `delay_ns`."""
        out: list[Batch] = []
        limit = now_ns - self.delay_ns
        since = self._since
        while since:
            symbol = next(iter(since))
            if since[symbol] > limit:
                break
            del since[symbol]
            out.append((symbol, self._take(symbol)))
        return out

    def pop(self, symbol: str) -> list[Tick]:
        """Remove and return the buffered ticks of one symbol (e.g. before its end of stream)."""
        if self._since.pop(symbol, None) is None:
            return []
        return self._take(symbol)

    def flush(self) -> list[Batch]:
        """Remove and return every buffered tick, oldest buffer first."""
        out = [(symbol, self._buffers[symbol]) for symbol in self._since]
        self._buffers.clear()
        self._since.clear()
        self._pending = 0
        return out

    def _take(self, symbol: str) -> list[Tick]:
        buffer = self._buffers.pop(symbol)
        self._pending -= len(buffer)
        return buffer
