"""Feed gaps: subscribed symbols that stop ticking (pure: no I/O, no clock reads).

A symbol with an active subscription that has had no tick for `missing_intervals` whole intervals
of wall-clock time is in a gap: `check()` reports it once as `opened`, and the first tick after
that reports it as `closed`, with the silence's start, end and length. Nothing is invented for the
silent intervals: no flat bars, only these events (published on `ingest.events.gap`).

Silence is measured in wall-clock time, from the last tick's arrival (or from the subscription,
for a symbol that never ticked). The caller passes `now_ns` everywhere, from one clock (the
aggregator uses the wall clock it gives the bar engine), so that the same calls give the same
events; a clock stepping backwards never makes a silence shorter than zero.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from mdp.shared.contract.events import Gap
from mdp.shared.contract.messages import interval_ns

__all__ = ["GapDetector"]

_SNAPSHOT_VERSION = 1


class _Watch(msgspec.Struct, array_like=True):
    """One subscribed symbol: when it was last heard of, and whether its gap is open."""

    symbol: str
    last_ns: int
    gap_open: bool = False


class _DetectorState(msgspec.Struct):
    version: int
    interval: str
    missing_intervals: int
    watches: list[_Watch]


class GapDetector:
    """Reports subscribed symbols silent for `missing_intervals` intervals, and their return."""

    def __init__(self, interval: str, missing_intervals: int) -> None:
        if missing_intervals < 1:
            raise ValueError(f"missing_intervals must be >= 1, not {missing_intervals}")
        self._interval = interval
        self._width = interval_ns(interval)  # ValueError for a malformed interval
        self._missing = int(missing_intervals)
        self._watches: dict[str, _Watch] = {}

    @property
    def interval(self) -> str:
        """The interval silence is counted in."""
        return self._interval

    @property
    def threshold_ns(self) -> int:
        """How long a symbol may be silent before its gap opens."""
        return self._width * self._missing

    @property
    def symbols(self) -> list[str]:
        """The subscribed symbols, sorted."""
        return sorted(self._watches)

    def open_gaps(self) -> list[str]:
        """The subscribed symbols whose gap is open, sorted."""
        return sorted(s for s, w in self._watches.items() if w.gap_open)

    def subscribe(self, symbol: str, now_ns: int) -> None:
        """Start watching `symbol`; its silence counts from now. Already watched: no change."""
        if symbol not in self._watches:
            self._watches[symbol] = _Watch(symbol, now_ns)

    def unsubscribe(self, symbol: str, now_ns: int | None = None) -> list[Gap]:
        """Stop watching `symbol`; an open gap is closed (`reason="unsubscribed"`) if `now_ns`."""
        watch = self._watches.pop(symbol, None)
        if watch is None or not watch.gap_open or now_ns is None:
            return []
        return [self._closed(watch, now_ns, "unsubscribed")]

    def sync(self, symbols: Iterable[str], now_ns: int) -> list[Gap]:
        """Make the subscriptions exactly `symbols` (e.g. the union of every job's symbols)."""
        wanted = set(symbols)
        events: list[Gap] = []
        for symbol in sorted(self._watches.keys() - wanted):
            events.extend(self.unsubscribe(symbol, now_ns))
        for symbol in sorted(wanted):
            self.subscribe(symbol, now_ns)
        return events

    def on_ticks(self, symbol: str, now_ns: int) -> list[Gap]:
        """Ticks of `symbol` arrived at `now_ns`: closes its gap if one is open."""
        watch = self._watches.get(symbol)
        if watch is None:  # not subscribed: its silences are nobody's concern
            return []
        events = [self._closed(watch, now_ns, "ticks")] if watch.gap_open else []
        watch.gap_open = False
        if now_ns > watch.last_ns:
            watch.last_ns = now_ns
        return events

    def check(self, now_ns: int) -> list[Gap]:
        """Open the gaps of subscribed symbols silent for the threshold; sorted by symbol."""
        events: list[Gap] = []
        threshold = self.threshold_ns
        for symbol in sorted(self._watches):
            watch = self._watches[symbol]
            silent = now_ns - watch.last_ns
            if not watch.gap_open and silent >= threshold:
                watch.gap_open = True
                events.append(
                    Gap(
                        symbol=symbol,
                        state="opened",
                        interval=self._interval,
                        since_ns=watch.last_ns,
                        missing_intervals=silent // self._width,
                        at_ns=now_ns,
                    )
                )
        return events

    def next_check_ns(self) -> int | None:
        """The earliest time at which `check` can open a gap (None: nothing to wait for)."""
        deadlines = [w.last_ns for w in self._watches.values() if not w.gap_open]
        return min(deadlines) + self.threshold_ns if deadlines else None

    def _closed(self, watch: _Watch, now_ns: int, reason: str) -> Gap:
        until = max(now_ns, watch.last_ns)
        duration = until - watch.last_ns
        return Gap(
            symbol=watch.symbol,
            state="closed",
            interval=self._interval,
            since_ns=watch.last_ns,
            missing_intervals=duration // self._width,
            at_ns=now_ns,
            until_ns=until,
            duration_ns=duration,
            reason=reason,
        )

    # -- checkpoints ---------------------------------------------------------------------------

    def snapshot(self) -> bytes:
        """The state as msgpack bytes (open gaps survive a restart without a second `opened`)."""
        watches = [msgspec.structs.replace(self._watches[s]) for s in sorted(self._watches)]
        state = _DetectorState(_SNAPSHOT_VERSION, self._interval, self._missing, watches)
        return msgspec.msgpack.encode(state)

    @classmethod
    def restore(
        cls, data: bytes, *, interval: str | None = None, missing_intervals: int | None = None
    ) -> GapDetector:
        """Rebuild a detector from `snapshot()` bytes; settings default to the snapshot's."""
        try:
            state = msgspec.msgpack.decode(data, type=_DetectorState)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ValueError(f"not a gap detector snapshot: {exc}") from exc
        if state.version != _SNAPSHOT_VERSION:
            raise ValueError(f"unsupported gap detector snapshot version {state.version}")
        detector = cls(
            interval if interval is not None else state.interval,
            missing_intervals if missing_intervals is not None else state.missing_intervals,
        )
        for watch in state.watches:
            detector._watches[watch.symbol] = watch
        return detector
