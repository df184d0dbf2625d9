"""Event-time OHLCV bars: the aggregator's pure core (no I/O, no asyncio, no clock reads).

The bar definition is the one in `shared/data/README.md`: one bar per (symbol, interval) over the
half-open interval `[start, start + width)`, `start = ts - ts % width`, labelled by its start.
`open` is the first trade by event time and `close` the last, equal timestamps keeping their
arrival order; `high`/`low` are the extremes; `trade_count` counts every tick, zero-size ones
included (they also set OHLC); `vwap = sum(price * size) / volume`, `None` when the volume is 0.

Volume is exact: every size is converted once to an integer number of 1e-9 units
(`round(size * 1e9)`), the units are summed as Python ints and the bar's volume is
`units / 1e9`, which Python rounds correctly. The volume is therefore the float64 nearest to the
exact decimal sum of the sizes, as long as sizes have at most 9 decimals (the size resolution of
this engine is 1e-9) and are below ~9e6 (where `size * 1e9` stops being an exact float64).

Time is event time. Each symbol has a watermark: the largest event time seen for it, advanced by
the wall-clock time elapsed since the tick that set it arrived, scaled by `clock_rate`
(`wm(now) = max_ts + clock_rate * (now - arrival)`; 0 = event time alone, for replays at full
speed; 1 = live; N = a replay paced at N times the recorded speed). The watermark never goes
backwards: a tick older than the current watermark does not pull it back. A bar closes (is
emitted with `rev=0`) when the watermark passes `end + grace`; closing is checked at the start and
at the end of every `on_ticks` call for that symbol, and for every symbol on `advance()`.

Two sources of lateness are kept apart, because only one of them is in event time:
- Disorder in the data (a tick older than one that arrived before it) is event time: a bar waits
  `grace` of event time past its end for its symbol's own ticks, at any clock rate.
- Transport delay (ticks in flight between the source and this engine) is wall-clock time; the
  transport keeps a symbol's ticks in order, so only the wall-clock part of the watermark can
  overtake them. That part is held back by `grace` of wall-clock time, which is
  `grace * clock_rate` of event time: a paced replay at 1000x waits as long in wall-clock terms
  for its in-flight ticks as live does, instead of closing bars 1000 times too early. At rates
  up to 1 this is the plain `grace`, so live behaviour is exactly "wm >= end + grace".

A tick whose bar has already closed is late. Lateness is measured against the largest event time
seen for the symbol (its event-time watermark, never the wall-clock extrapolation): within
`revise_window` of it, the tick revises the bar (re-emitted with `rev + 1`; a bar created for an
interval that was empty when it closed is emitted with `rev=0`); beyond the window it is reported
in `Emitted.late` and touches nothing. A tick delayed in transport, but in order in its symbol's
data, therefore always revises and is never dropped, whatever the clock rate. Lateness is judged
per interval. Closed bars are kept only while `end + revise_window >= max_ts`, so memory stays
bounded (about `revise_window / width` closed bars per symbol and interval).

Ticks with a non-finite price or size, or whose `price * size` overflows, are left out and
reported in `Emitted.invalid`. Sums stay representable: volume is an exact integer of units at
any magnitude (checkpoints encode units beyond 64 bits as decimal strings), and a tick that
would make its bar's volume or `price * size` sum overflow a float64 is reported invalid
instead of folded (`volume overflow`), so no bar ever carries an infinite or NaN value.

No outlier moves a watermark (`max_jump_ns`, 0 turns it off). A tick is *suspect* when its
symbol has no tick folded yet, or when it lies more than `max_jump_ns` ahead of the symbol's
watermark (its wall-clock advance included, so a live feed resuming after a halt is no jump).
A suspect is held, not folded, and each later tick of the symbol judges it: one at or beyond
`suspect.ts - max_jump_ns` confirms it (time really moved there: a halt, a weekend, an open;
it is folded, before that later tick), one behind that contradicts it; after `REJECT_AFTER`
contradictions it is reported invalid as `unconfirmed jump` and never touches a bar. At the end
of a stream an uncontradicted suspect is folded (nothing says it is wrong) and a contradicted
one is reported. A live symbol (`clock_rate == 1`) also confirms on `advance()` a suspect whose
time the wall clock has reached (`ts <= now + max_jump_ns`). So a single outlier followed by
any tick leaves every other bar exactly as the stream without it (the property tests prove it).

Every call is deterministic: the same sequence of calls with the same arguments (`now_ns`
included) produces the same output. The bars of one call are ordered by
(interval width, interval, symbol, start, rev); late ticks by interval width, then arrival.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import Literal, cast

import msgspec

from mdp.shared.contract.messages import Bar, Tick, interval_ns

__all__ = ["SIZE_UNITS", "BarEngine", "Emitted", "InvalidTick", "LateTick", "PriceType"]

SIZE_UNITS = 1_000_000_000
"""Sizes are accumulated as integers of 1/SIZE_UNITS (1e-9), which makes volume sums exact."""

PriceType = Literal["LAST", "MID"]

_FAR_PAST = -(1 << 62)  # "nothing closed yet": below any event time
_SNAPSHOT_VERSION = 2  # 2: held suspects; units beyond 64 bits as strings

REJECT_AFTER = 3
"""A suspect tick contradicted by this many later ticks is rejected as an unconfirmed jump."""

_MAX_FLOAT = 1.7976931348623157e308
_MAX_UNITS = int(_MAX_FLOAT) * SIZE_UNITS  # beyond, `units / SIZE_UNITS` is not a float
# A batch whose sums stay below these cannot overflow a bar, so it skips the per-tick check.
_BIG_PV = 1e300
_BIG_UNITS = 10**300

# One prepared tick: (ts, price, size units, price * size, the tick itself).
_Row = tuple[int, float, int, float, Tick]


class LateTick(msgspec.Struct, frozen=True):
    """A tick that arrived after its bar closed and beyond the revise window; it changed nothing."""

    symbol: str
    interval: str
    tick: Tick
    reason: str
    provider: str = ""
    lag_ns: int = 0


class InvalidTick(msgspec.Struct, frozen=True):
    """A tick with a non-finite price or size: it would poison its bars, so it is left out.

    Negative sizes are the schema's to refuse (`Tick.size` is validated `>= 0` on decode).
    """

    symbol: str
    tick: Tick
    reason: str
    provider: str = ""


class Emitted:
    """What one engine call produced: bars to publish, late and invalid ticks to dead-letter."""

    __slots__ = ("bars", "invalid", "late")

    def __init__(
        self,
        bars: list[Bar] | None = None,
        late: list[LateTick] | None = None,
        invalid: list[InvalidTick] | None = None,
    ) -> None:
        self.bars: list[Bar] = bars if bars is not None else []
        self.late: list[LateTick] = late if late is not None else []
        self.invalid: list[InvalidTick] = invalid if invalid is not None else []

    def __bool__(self) -> bool:
        return bool(self.bars or self.late or self.invalid)

    def __repr__(self) -> str:
        return f"Emitted(bars={self.bars!r}, late={self.late!r}, invalid={self.invalid!r})"

    def extend(self, other: Emitted) -> None:
        """Append another call's output (keeps each part's own order)."""
        self.bars.extend(other.bars)
        self.late.extend(other.late)
        self.invalid.extend(other.invalid)


class _Acc:
    """The mutable accumulator of one bar; converted to a `Bar` only when emitted."""

    __slots__ = (
        "close",
        "close_ts",
        "count",
        "encoded",
        "end",
        "high",
        "low",
        "open",
        "open_ts",
        "provider",
        "pv",
        "rev",
        "start",
        "units",
    )

    def __init__(
        self, start: int, end: int, ts: int, price: float, units: int, pv: float, provider: str
    ) -> None:
        self.start = start
        self.end = end
        self.open = self.high = self.low = self.close = price
        self.open_ts = self.close_ts = ts
        self.units = units
        self.pv = pv
        self.count = 1
        self.rev = -1  # -1: never emitted
        self.provider = provider
        # A closed bar's snapshot form, kept until a late tick revises it: a checkpoint then
        # re-encodes only what changed, not the whole revise window of every symbol.
        self.encoded: msgspec.Raw | None = None

    def add(self, ts: int, price: float, units: int, pv: float) -> None:
        """Fold one tick in (the slow path; `BarEngine._fold` inlines the same logic)."""
        self.encoded = None
        if price > self.high:
            self.high = price
        elif price < self.low:
            self.low = price
        if ts >= self.close_ts:  # >=: among equal timestamps the later arrival closes
            self.close = price
            self.close_ts = ts
        elif ts < self.open_ts:  # <: among equal timestamps the earlier arrival opens
            self.open = price
            self.open_ts = ts
        self.units += units
        self.pv += pv
        self.count += 1


class _Series:
    """The bars of one (symbol, interval): open ones, recently closed ones, and the close line."""

    __slots__ = ("closed", "closed_end", "cur", "interval", "open", "order", "width")

    def __init__(self, interval: str, width: int) -> None:
        self.interval = interval
        self.width = width
        # Every bar with end <= closed_end is closed (emitted, or empty when its time passed).
        self.closed_end = _FAR_PAST
        self.open: dict[int, _Acc] = {}
        self.closed: dict[int, _Acc] = {}
        self.order: deque[int] = deque()  # closed starts in closing order, for pruning
        self.cur: _Acc | None = None  # the open bar the last tick went to: the fast path


class _Suspect:
    """A tick held back as a possible outlier, with how many later ticks contradicted it."""

    __slots__ = ("behind", "provider", "row")

    def __init__(self, row: _Row, provider: str, behind: int = 0) -> None:
        self.row = row
        self.provider = provider
        self.behind = behind


class _Symbol:
    """Per-symbol state: the watermark, one series per interval, the suspects held back."""

    __slots__ = ("anchor_now", "anchor_ts", "held", "max_ts", "rate", "series", "symbol", "wm")

    def __init__(self, symbol: str, series: list[_Series], now_ns: int, rate: float) -> None:
        self.symbol = symbol
        self.series = series
        self.max_ts = 0
        # wm(now) = max(wm, anchor_ts + rate * (now - anchor_now)): anchor is the tick that set
        # the watermark (or the moment the rate changed); `wm` keeps it monotonic.
        self.wm = 0
        self.anchor_ts = 0
        self.anchor_now = now_ns
        self.rate = rate
        self.held: list[_Suspect] = []

    def peek(self, now_ns: int) -> int:
        """The watermark at `now_ns`, without recording it."""
        if self.rate:
            advanced = self.anchor_ts + int(self.rate * (now_ns - self.anchor_now))
            if advanced > self.wm:
                return advanced
        return self.wm

    def watermark(self, now_ns: int) -> int:
        """The watermark at `now_ns`, recorded so that it never goes backwards."""
        self.wm = wm = self.peek(now_ns)
        return wm


# Snapshot layout (msgpack, positional arrays to keep checkpoints small).


class _AccState(msgspec.Struct, array_like=True):
    start: int
    open: float
    high: float
    low: float
    close: float
    open_ts: int
    close_ts: int
    units: int | str  # a str beyond 64 bits (msgpack integers stop there)
    pv: float
    count: int
    rev: int
    provider: str


class _SuspectState(msgspec.Struct, array_like=True):
    tick: Tick
    provider: str
    behind: int


class _SeriesState(msgspec.Struct, array_like=True):
    interval: str
    closed_end: int
    open: list[_AccState]
    closed: list[_AccState]  # in closing order


class _SeriesOut(msgspec.Struct, array_like=True):
    """`_SeriesState` as written: the closed bars as their cached encodings (same bytes)."""

    interval: str
    closed_end: int
    open: list[_AccState]
    closed: list[msgspec.Raw]


class _SymbolState(msgspec.Struct, array_like=True):
    symbol: str
    wm: int
    anchor_ts: int
    anchor_now: int
    rate: float
    max_ts: int
    series: list[_SeriesState]
    held: list[_SuspectState] = []


class _EngineState(msgspec.Struct):
    version: int
    intervals: list[str]
    grace_ns: int
    revise_window_ns: int
    price_type: str
    symbols: list[_SymbolState]
    max_jump_ns: int = 0


_EXACT_LIMIT = 2**53 / SIZE_UNITS  # above this, size * 1e9 is no longer an exact integer


def _units(size: float) -> int:
    """`size` in 1e-9 units, exact at any magnitude; 0 for a non-finite size (rejected later)."""
    if not math.isfinite(size):
        return 0
    if size < _EXACT_LIMIT:
        return round(size * SIZE_UNITS)
    whole = int(size)  # split so neither part loses digits in the multiplication
    return whole * SIZE_UNITS + round((size - whole) * SIZE_UNITS)


def _acc_state(acc: _Acc) -> _AccState:
    return _AccState(
        acc.start, acc.open, acc.high, acc.low, acc.close, acc.open_ts, acc.close_ts,
        acc.units if acc.units < 2**63 else str(acc.units), acc.pv, acc.count, acc.rev,
        acc.provider,
    )  # fmt: skip


_encode = msgspec.msgpack.Encoder().encode


def _closed_state(acc: _Acc) -> msgspec.Raw:
    """A closed bar's snapshot form, encoded once per change."""
    encoded = acc.encoded
    if encoded is None:
        encoded = acc.encoded = msgspec.Raw(_encode(_acc_state(acc)))
    return encoded


def _acc_from_state(state: _AccState, width: int) -> _Acc:
    acc = _Acc(state.start, state.start + width, state.open_ts, state.open, 0, 0.0, state.provider)
    acc.high = state.high
    acc.low = state.low
    acc.close = state.close
    acc.close_ts = state.close_ts
    acc.units = int(state.units)
    acc.pv = state.pv
    acc.count = state.count
    acc.rev = state.rev
    return acc


class BarEngine:
    """Event-time bars for many symbols and intervals, with grace, late ticks and revisions."""

    def __init__(
        self,
        intervals: Sequence[str],
        grace_ns: int,
        revise_window_ns: int,
        price_type: PriceType = "LAST",
        max_jump_ns: int = 0,
    ) -> None:
        if not intervals:
            raise ValueError("at least one interval is needed")
        if grace_ns < 0 or revise_window_ns < 0 or max_jump_ns < 0:
            raise ValueError("grace_ns, revise_window_ns and max_jump_ns must be >= 0")
        if price_type not in ("LAST", "MID"):
            raise ValueError(f"price_type must be LAST or MID, not {price_type!r}")
        widths = {interval: interval_ns(interval) for interval in intervals}
        # Narrowest first: this is also the order of emitted bars.
        self._intervals: list[str] = sorted(widths, key=lambda i: (widths[i], i))
        self._widths: dict[str, int] = widths
        self._grace = int(grace_ns)
        self._window = int(revise_window_ns)
        self._price_type: PriceType = price_type
        self._jump = int(max_jump_ns)
        self._symbols: dict[str, _Symbol] = {}

    # -- introspection ------------------------------------------------------------------------

    @property
    def intervals(self) -> list[str]:
        """The intervals, narrowest first."""
        return list(self._intervals)

    @property
    def symbols(self) -> list[str]:
        """Symbols with state, in first-seen order."""
        return list(self._symbols)

    def watermark(self, symbol: str, now_ns: int) -> int | None:
        """The symbol's watermark at `now_ns` (None for an unknown symbol); changes no state."""
        state = self._symbols.get(symbol)
        return None if state is None else state.peek(now_ns)

    def open_bars(self) -> int:
        """How many bars are open (not yet emitted) over all symbols and intervals."""
        return sum(len(s.open) for st in self._symbols.values() for s in st.series)

    def retained_bars(self) -> int:
        """How many closed bars are kept for revisions over all symbols and intervals."""
        return sum(len(s.closed) for st in self._symbols.values() for s in st.series)

    def forget(self, symbol: str) -> None:
        """Drop all state of a symbol (e.g. after its end of stream, before a new replay)."""
        self._symbols.pop(symbol, None)

    # -- the engine ----------------------------------------------------------------------------

    def on_ticks(
        self,
        symbol: str,
        provider: str,
        ticks: Sequence[Tick],
        now_ns: int,
        clock_rate: float = 1.0,
    ) -> Emitted:
        """Fold one batch of a symbol's ticks (arrival order) received at `now_ns`."""
        if clock_rate < 0:
            raise ValueError("clock_rate must be >= 0")
        state = self._symbols.get(symbol)
        if state is None:
            series_list = [_Series(i, self._widths[i]) for i in self._intervals]
            state = self._symbols[symbol] = _Symbol(symbol, series_list, now_ns, clock_rate)
        bars: list[Bar] = []
        late: list[LateTick] = []

        wm0 = state.watermark(now_ns)
        if clock_rate != state.rate:
            # Re-anchor so that the time elapsed so far keeps the rate it had.
            state.anchor_ts = wm0
            state.anchor_now = now_ns
            state.rate = clock_rate
        # Bars whose deadline passed before these ticks arrived close first: their ticks are late.
        self._close_due(state, self._line(state, wm0), bars)
        max_ts0 = state.max_ts  # lateness is judged against the event time seen before the batch

        invalid: list[InvalidTick] = []
        rows, big = self._rows(ticks)
        if rows:
            magnitude = sum([abs(row[3]) for row in rows])  # the cheap test of a whole batch
            if not math.isfinite(magnitude):  # NaN or infinity somewhere, or a huge sum
                rows = self._valid_rows(symbol, provider, rows, invalid)
                big = True
            if big or magnitude > _BIG_PV:
                rows = self._bounded_rows(state, provider, rows, invalid)
        if (
            rows
            and self._jump
            and (state.held or not state.max_ts or max([row[0] for row in rows]) > wm0 + self._jump)
        ):
            rows = self._screen(state, provider, rows, wm0, invalid)
        if rows:
            self._fold_rows(state, provider, rows, now_ns, max_ts0, bars, late)

        if len(bars) > 1:
            widths = self._widths
            bars.sort(key=lambda b: (widths[b.interval], b.interval, b.start, b.rev))
        return Emitted(bars, late, invalid)

    def advance(self, now_ns: int) -> Emitted:
        """Close the bars that the wall clock made due (idle symbols, `clock_rate > 0`)."""
        bars: list[Bar] = []
        late: list[LateTick] = []
        for state in self._symbols.values():
            if not state.rate:  # at rate 0 the watermark only moves with ticks
                continue
            wm = state.watermark(now_ns)
            if state.held:
                self._confirm_by_clock(state, wm, now_ns, bars, late)
            self._close_due(state, self._line(state, state.watermark(now_ns)), bars)
        if len(bars) > 1:
            widths = self._widths
            bars.sort(key=lambda b: (widths[b.interval], b.interval, b.symbol, b.start, b.rev))
        return Emitted(bars, late)

    def end_of_stream(self, symbol: str, now_ns: int = 0) -> Emitted:
        """Close every open bar of `symbol` now, whatever its watermark.

        Held suspects are settled first: an uncontradicted one is folded, a contradicted one
        reported invalid.
        """
        state = self._symbols.get(symbol)
        bars: list[Bar] = []
        if state is None:
            return Emitted(bars)
        late: list[LateTick] = []
        invalid: list[InvalidTick] = []
        if state.held:
            held, state.held = state.held, []
            for suspect in held:
                if suspect.behind:
                    invalid.append(self._unconfirmed(state.symbol, suspect))
            keep = [suspect.row for suspect in held if not suspect.behind]
            if keep:
                provider = next(s.provider for s in held if not s.behind)
                self._fold_rows(state, provider, keep, now_ns, state.max_ts, bars, late)
        for series in state.series:
            if not series.open:
                continue
            for start in sorted(series.open):
                self._emit_closed(state, series, series.open[start], bars)
            last_end = max(series.open) + series.width
            series.open.clear()
            series.cur = None
            # Later ticks for these bars are revisions, never a second rev 0 of the same bar.
            if last_end > series.closed_end:
                series.closed_end = last_end
        if len(bars) > 1:
            widths = self._widths
            bars.sort(key=lambda b: (widths[b.interval], b.interval, b.start, b.rev))
        return Emitted(bars, late, invalid)

    # -- outliers and overflow -----------------------------------------------------------------

    def _screen(
        self, state: _Symbol, provider: str, rows: list[_Row], wm: int, invalid: list[InvalidTick]
    ) -> list[_Row]:
        """The rows to fold now, in order: suspects held, judged by each later row (see top)."""
        jump = self._jump
        out: list[_Row] = []
        ref: int | None = wm if state.max_ts else None  # None: nothing folded yet
        for row in rows:
            ts = row[0]
            if state.held:
                kept: list[_Suspect] = []
                for suspect in state.held:
                    suspect_ts = suspect.row[0]
                    if ts >= suspect_ts - jump:  # time really moved there: confirmed
                        out.append(suspect.row)
                        ref = suspect_ts if ref is None else max(ref, suspect_ts)
                        continue
                    suspect.behind += 1
                    if suspect.behind >= REJECT_AFTER:
                        invalid.append(self._unconfirmed(state.symbol, suspect))
                    else:
                        kept.append(suspect)
                state.held = kept
            if ref is None or ts > ref + jump:
                state.held.append(_Suspect(row, provider))
            else:
                out.append(row)
                if ts > ref:
                    ref = ts
        return out

    def _confirm_by_clock(
        self, state: _Symbol, wm: int, now_ns: int, bars: list[Bar], late: list[LateTick]
    ) -> None:
        """Fold the suspects whose time the clock has reached (live symbols, on `advance`)."""
        if state.max_ts:
            ref = wm
        elif state.rate == 1.0:
            ref = now_ns  # live and nothing folded yet: event time is wall-clock time
        else:
            return
        due = [s for s in state.held if s.row[0] <= ref + self._jump]
        if not due:
            return
        state.held = [s for s in state.held if s.row[0] > ref + self._jump]
        rows = [s.row for s in due]
        self._fold_rows(state, due[0].provider, rows, now_ns, state.max_ts, bars, late)

    def _unconfirmed(self, symbol: str, suspect: _Suspect) -> InvalidTick:
        reason = (
            f"unconfirmed jump: {suspect.behind} later ticks stayed more than "
            f"{self._jump / 1e9:g} s behind its event time"
        )
        return InvalidTick(symbol, suspect.row[4], reason, suspect.provider)

    def _bounded_rows(
        self, state: _Symbol, provider: str, rows: list[_Row], invalid: list[InvalidTick]
    ) -> list[_Row]:
        """Drop the rows that would overflow their bars' volume or `price * size` sum."""
        pending: dict[tuple[int, int], tuple[int, float]] = {}
        out: list[_Row] = []
        for row in rows:
            ts, _, units, pv, tick = row
            if not math.isfinite(pv):
                invalid.append(
                    InvalidTick(state.symbol, tick, "price * size overflows a float64", provider)
                )
                continue
            sums = []
            for i, series in enumerate(state.series):
                start = ts - ts % series.width
                acc = series.open.get(start) or series.closed.get(start)
                base = pending.get((i, start)) or ((acc.units, acc.pv) if acc else (0, 0.0))
                sums.append(((i, start), (base[0] + units, base[1] + pv)))
            if any(u > _MAX_UNITS or not math.isfinite(v) for _, (u, v) in sums):
                reason = "volume overflow: its bar's volume or price * size sum would pass 1.8e308"
                invalid.append(InvalidTick(state.symbol, tick, reason, provider))
                continue
            pending.update(sums)
            out.append(row)
        return out

    # -- internals -----------------------------------------------------------------------------

    def _fold_rows(
        self,
        state: _Symbol,
        provider: str,
        rows: list[_Row],
        now_ns: int,
        max_ts0: int,
        bars: list[Bar],
        late: list[LateTick],
    ) -> None:
        """Fold rows into every series, advance the watermark, emit revisions and due bars."""
        dirty: dict[tuple[str, int], tuple[_Series, _Acc]] = {}
        for series in state.series:
            self._fold(state, series, rows, max_ts0, provider, dirty, late)
        batch_max = max([row[0] for row in rows])
        if batch_max > state.max_ts:
            state.max_ts = batch_max
        if batch_max > state.wm:
            state.wm = state.anchor_ts = batch_max
            state.anchor_now = now_ns
        for series, acc in dirty.values():
            acc.rev += 1  # -1 (created for an interval empty at close) becomes 0
            acc.encoded = None
            bars.append(self._bar(state.symbol, series.interval, acc))
        self._close_due(state, self._line(state, state.wm), bars)

    def _rows(self, ticks: Sequence[Tick]) -> tuple[list[_Row], bool]:
        """Prepare each tick once for all intervals: price, size units and price * size.

        A non-finite price or size gives a non-finite `price * size` (its units are then 0, as
        `round` cannot take them), which `on_ticks` detects on the whole batch at once. The
        flag says a size was huge (its bars' sums must be checked for overflow).
        """
        if self._price_type == "LAST":
            try:
                fast = [
                    (t.ts, t.price, round(t.size * SIZE_UNITS), t.price * t.size, t) for t in ticks
                ]
            except (ValueError, OverflowError):  # a NaN or infinite size: the slow way
                return [(t.ts, t.price, _units(t.size), t.price * t.size, t) for t in ticks], True
            if max((r[2] for r in fast), default=0) >= 2**53:  # a huge size: redo it exactly
                return [(t.ts, t.price, _units(t.size), t.price * t.size, t) for t in ticks], True
            return fast, False
        rows: list[_Row] = []
        for t in ticks:
            bid = t.bid
            ask = t.ask
            if bid is None or ask is None:  # a MID bar needs both sides of the quote
                continue
            mid = (bid + ask) / 2
            rows.append((t.ts, mid, _units(t.size), mid * t.size, t))
        return rows, any(row[2] >= 2**53 for row in rows)

    @staticmethod
    def _valid_rows(
        symbol: str, provider: str, rows: list[_Row], invalid: list[InvalidTick]
    ) -> list[_Row]:
        """Drop and report the rows that would poison a bar."""
        valid: list[_Row] = []
        for row in rows:
            _, price, _, _, tick = row
            if not math.isfinite(price):
                invalid.append(InvalidTick(symbol, tick, f"non-finite price {price}", provider))
            elif not math.isfinite(tick.size):
                invalid.append(InvalidTick(symbol, tick, f"non-finite size {tick.size}", provider))
            else:
                valid.append(row)
        return valid

    def _fold(
        self,
        state: _Symbol,
        series: _Series,
        rows: list[_Row],
        max_ts0: int,
        provider: str,
        dirty: dict[tuple[str, int], tuple[_Series, _Acc]],
        late: list[LateTick],
    ) -> None:
        """Fold a batch into one series; the hot loop, hence the locals mirroring `cur`."""
        width = series.width
        closed_end = series.closed_end
        opened = series.open
        cur = series.cur
        if cur is None:
            cs = ce = 0  # an empty range: every tick takes the slow path
            o = h = lo = c = pvs = 0.0
            ots = cts = units = n = 0
        else:
            cs = cur.start
            ce = cur.end
            o, h, lo, c = cur.open, cur.high, cur.low, cur.close
            ots, cts, units, pvs, n = cur.open_ts, cur.close_ts, cur.units, cur.pv, cur.count
        for ts, p, u, pv, tick in rows:
            if cs <= ts < ce:
                # Fast path: the tick belongs to the bar the previous tick went to.
                if p > h:
                    h = p
                elif p < lo:
                    lo = p
                if ts >= cts:
                    c = p
                    cts = ts
                elif ts < ots:
                    o = p
                    ots = ts
                units += u
                pvs += pv
                n += 1
                continue
            if cur is not None:
                cur.open, cur.high, cur.low, cur.close = o, h, lo, c
                cur.open_ts, cur.close_ts, cur.units, cur.pv, cur.count = ots, cts, units, pvs, n
            start = ts - ts % width
            if start + width <= closed_end:
                self._late(state, series, start, ts, p, u, pv, tick, max_ts0, provider, dirty, late)
                continue
            acc = opened.get(start)
            if acc is None:
                acc = opened[start] = _Acc(start, start + width, ts, p, u, pv, provider)
            else:
                acc.add(ts, p, u, pv)
            cur = acc
            cs = cur.start
            ce = cur.end
            o, h, lo, c = cur.open, cur.high, cur.low, cur.close
            ots, cts, units, pvs, n = cur.open_ts, cur.close_ts, cur.units, cur.pv, cur.count
        if cur is not None:
            cur.open, cur.high, cur.low, cur.close = o, h, lo, c
            cur.open_ts, cur.close_ts, cur.units, cur.pv, cur.count = ots, cts, units, pvs, n
        series.cur = cur

    def _late(
        self,
        state: _Symbol,
        series: _Series,
        start: int,
        ts: int,
        price: float,
        units: int,
        pv: float,
        tick: Tick,
        max_ts0: int,
        provider: str,
        dirty: dict[tuple[str, int], tuple[_Series, _Acc]],
        late: list[LateTick],
    ) -> None:
        """A tick whose bar already closed: revise the bar, or report it beyond the window."""
        lag = max_ts0 - ts
        if lag > self._window:
            reason = (
                f"beyond revise window: {lag / 1e9:.1f} s behind the symbol's latest event time "
                f"(window {self._window / 1e9:g} s)"
            )
            late.append(LateTick(state.symbol, series.interval, tick, reason, provider, lag))
            return
        # Within the window the bar cannot have been pruned: pruning keeps every bar with
        # start >= max_ts - window - width, and here start > ts - width >= max_ts0 - window - width.
        acc = series.closed.get(start)
        if acc is None:  # the interval was empty when it closed
            acc = series.closed[start] = _Acc(start, start + series.width, ts, price, units, pv,
                                              provider)  # fmt: skip
            series.order.append(start)
        else:
            acc.add(ts, price, units, pv)
        dirty[(series.interval, start)] = (series, acc)

    def _line(self, state: _Symbol, wm: int) -> int:
        """The closing line for watermark `wm`: every bar with `end <= line` is due.

        The event-time part closes `grace` after the symbol's own ticks pass the end; the
        wall-clock part waits `grace` of wall-clock time, i.e. `grace * rate` of event time when
        the clock runs faster than real time (a paced replay), since in-flight ticks are late by
        wall-clock time. At rates up to 1 both reduce to `wm - grace`, as `wm >= max_ts`.
        """
        rate = state.rate
        if rate <= 1.0:
            return wm - self._grace
        return max(state.max_ts - self._grace, wm - int(self._grace * rate))

    def _close_due(self, state: _Symbol, limit: int, bars: list[Bar]) -> None:
        """Emit the open bars with `end <= limit` and prune closed bars out of the window."""
        for series in state.series:
            width = series.width
            close_end = limit - limit % width  # the last bar end that is due
            if close_end <= series.closed_end:
                continue
            series.closed_end = close_end
            opened = series.open
            if opened:
                for start in sorted([s for s in opened if s + width <= close_end]):
                    self._emit_closed(state, series, opened.pop(start), bars)
                if series.cur is not None and series.cur.end <= close_end:
                    series.cur = None
            # Keep closed bars while end + window >= max_ts, i.e. prune start < max_ts - window -
            # width: exactly the bars a late tick within the window can still revise.
            horizon = state.max_ts - self._window - width
            order = series.order
            closed = series.closed
            while order and order[0] < horizon:
                del closed[order.popleft()]

    def _emit_closed(self, state: _Symbol, series: _Series, acc: _Acc, bars: list[Bar]) -> None:
        acc.rev = 0
        acc.encoded = None
        series.closed[acc.start] = acc
        series.order.append(acc.start)
        bars.append(self._bar(state.symbol, series.interval, acc))

    @staticmethod
    def _bar(symbol: str, interval: str, acc: _Acc) -> Bar:
        units = acc.units
        vwap: float | None
        if units:
            volume = units / SIZE_UNITS  # int / int: correctly rounded, so exact to the 1e-9 sum
            vwap = acc.pv / volume
            # Rounding in the price * size sum must not push the average outside the range.
            if vwap > acc.high:
                vwap = acc.high
            elif vwap < acc.low:
                vwap = acc.low
        else:
            volume = 0.0
            vwap = None
        return Bar(
            symbol=symbol,
            interval=interval,
            start=acc.start,
            end=acc.end,
            open=acc.open,
            high=acc.high,
            low=acc.low,
            close=acc.close,
            volume=volume,
            trade_count=acc.count,
            vwap=vwap,
            provider=acc.provider,
            rev=acc.rev,
        )

    # -- checkpoints ---------------------------------------------------------------------------

    def snapshot(self) -> bytes:
        """The full state as msgpack bytes, for a crash checkpoint; see `restore`."""
        symbols = [
            _SymbolState(
                symbol=state.symbol,
                wm=state.wm,
                anchor_ts=state.anchor_ts,
                anchor_now=state.anchor_now,
                rate=state.rate,
                max_ts=state.max_ts,
                # _SeriesOut encodes to the very bytes of _SeriesState, which restore decodes.
                series=cast(
                    list[_SeriesState],
                    [
                        _SeriesOut(
                            interval=series.interval,
                            closed_end=series.closed_end,
                            open=[_acc_state(series.open[s]) for s in sorted(series.open)],
                            closed=[_closed_state(series.closed[s]) for s in series.order],
                        )
                        for series in state.series
                    ],
                ),
                held=[_SuspectState(h.row[4], h.provider, h.behind) for h in state.held],
            )
            for state in self._symbols.values()
        ]
        return msgspec.msgpack.encode(
            _EngineState(
                version=_SNAPSHOT_VERSION,
                intervals=self._intervals,
                grace_ns=self._grace,
                revise_window_ns=self._window,
                price_type=self._price_type,
                symbols=symbols,
                max_jump_ns=self._jump,
            )
        )

    @classmethod
    def restore(
        cls,
        data: bytes,
        *,
        intervals: Sequence[str] | None = None,
        grace_ns: int | None = None,
        revise_window_ns: int | None = None,
        price_type: PriceType | None = None,
        max_jump_ns: int | None = None,
    ) -> BarEngine:
        """Rebuild an engine from `snapshot()` bytes; settings default to the snapshot's.

        A changed grace or window applies from now on; an interval added starts empty and one
        removed is dropped. A different price type is refused: it would mix prices in open bars.
        """
        try:
            state = msgspec.msgpack.decode(data, type=_EngineState)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ValueError(f"not a bar engine snapshot: {exc}") from exc
        if state.version not in (1, _SNAPSHOT_VERSION):  # 1: the same without suspects
            raise ValueError(f"unsupported bar engine snapshot version {state.version}")
        if price_type is not None and price_type != state.price_type:
            raise ValueError(
                f"snapshot price type {state.price_type} differs from requested {price_type}"
            )
        if state.price_type not in ("LAST", "MID"):
            raise ValueError(f"snapshot has an invalid price type {state.price_type!r}")
        snap_price: PriceType = "MID" if state.price_type == "MID" else "LAST"
        engine = cls(
            intervals if intervals is not None else state.intervals,
            state.grace_ns if grace_ns is None else grace_ns,
            state.revise_window_ns if revise_window_ns is None else revise_window_ns,
            snap_price,
            state.max_jump_ns if max_jump_ns is None else max_jump_ns,
        )
        for sym in state.symbols:
            saved = {s.interval: s for s in sym.series}
            series_list = []
            for interval in engine._intervals:
                width = engine._widths[interval]
                series = _Series(interval, width)
                snap = saved.get(interval)
                if snap is not None:
                    series.closed_end = snap.closed_end
                    for a in snap.open:
                        series.open[a.start] = _acc_from_state(a, width)
                    for a in snap.closed:
                        series.closed[a.start] = _acc_from_state(a, width)
                        series.order.append(a.start)
                series_list.append(series)
            restored = _Symbol(sym.symbol, series_list, sym.anchor_now, sym.rate)
            restored.wm = sym.wm
            restored.anchor_ts = sym.anchor_ts
            restored.max_ts = sym.max_ts
            for held in sym.held:
                [row], _ = engine._rows([held.tick])
                restored.held.append(_Suspect(row, held.provider, held.behind))
            engine._symbols[sym.symbol] = restored
        return engine
