"""The `replay` adapter: feeds a recorded `ts_ns,ts_utc,symbol,price,size,...` CSV (or .csv.gz).

Rows are replayed in file order (the recorded arrival order), with `seq` per symbol from 1, as
fast as possible (`speed: "max"`) or paced by event time (`speed: 10` is ten times the recorded
pace). Bad rows are collected with their line number and reason, never fatal and never silently
dropped; the good rows around them flow on.

Parsing is the provider's hot path, so the common case works on whole blocks of bytes with
C-level loops: one `split` of a block into fields, columns taken as strided slices, numbers
converted with `map(int, ...)`/`map(float, ...)`, validated with `min`/`sum`, grouped by symbol
with one stable sort, and ticks built with `map(Tick, ...)`. Any block that does not fit that
shape (a bad value, a short row, quoting, blank lines) goes through a per-row path that finds and
reports exactly the bad rows.
"""

from __future__ import annotations

import asyncio
import csv
import gzip
import math
import os
import re
import time
import zlib
from bisect import bisect_right
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate, compress
from operator import itemgetter
from pathlib import Path
from typing import IO, Any, ClassVar, Literal, cast

from pydantic import Field, field_validator

from mdp.services.provider.adapters.base import (
    AdapterError,
    AdapterParams,
    TickSink,
    check_params,
    job_symbols,
)
from mdp.shared.config import DEFAULT_SYMBOL_PATTERN
from mdp.shared.contract.control import JobSpec
from mdp.shared.contract.messages import Tick

MAX_BAD_ROWS = 1000
"""How many bad-row reasons are kept; `bad_row_count` counts them all."""

MAX_LINE_BYTES = 1 << 20
"""The longest line read as a row (1 MiB); a longer one is a bad row, skipped unread."""

REQUIRED_COLUMNS = ("ts_ns", "symbol", "price", "size")
RECV_COLUMN = "recv_ns"

_GZIP_MAGIC = b"\x1f\x8b"
_MAX_HEADER_BYTES = MAX_LINE_BYTES
_NAME_CACHE_LIMIT = 100_000
_SYMBOL = re.compile(DEFAULT_SYMBOL_PATTERN)
SYMBOL_RULE = "empty, over 64 characters, not UTF-8, or has control or edge blank characters"

# Decoded symbols by their raw bytes (None: empty or not UTF-8), and the per-row path's symbols,
# which are already `str`, map to themselves.
_Names = Mapping[Any, str | None]


@dataclass(frozen=True, slots=True)
class _Layout:
    """Where the columns are, from the header."""

    gzipped: bool
    fields: int  # columns in the header: rows of the fast path have exactly this many
    ts: int
    symbol: int
    price: int
    size: int
    recv: int  # -1 when the file has no recv_ns column
    needed: int  # a row shorter than this lacks a required column


@dataclass(slots=True)
class _Columns:
    """The good rows of one block, in file order, column by column."""

    symbols: list[Any]  # raw bytes (fast path) or str (per-row path), decoded through `names`
    names: _Names
    unique: _Names | None  # exactly the symbols of these rows in order of appearance, if known
    ts: list[int]
    recv: list[int]  # the very same list as `ts` when the file has no recv_ns
    price: list[float]
    size: list[float]

    def __getitem__(self, span: slice) -> _Columns:
        ts = self.ts[span]
        recv = ts if self.recv is self.ts else self.recv[span]
        symbols = self.symbols[span]
        return _Columns(symbols, self.names, None, ts, recv, self.price[span], self.size[span])


class ReplayAdapter:
    """Replays a recorded tick CSV in file order; a bounded source that ends with end_of_stream."""

    name: ClassVar[str] = "replay"

    class Params(AdapterParams):
        """A job's `params`, and `replay.params` of data_providers.yaml (which may omit `path`)."""

        path: str | None = Field(None, description="the recorded .csv or .csv.gz file")
        speed: Literal["max"] | float = "max"

        @field_validator("speed")
        @classmethod
        def _speed_positive(cls, value: str | float) -> str | float:
            if not isinstance(value, str) and not (value > 0 and math.isfinite(value)):
                raise ValueError('must be "max" or a number > 0 (1 = recorded pace)')
            return value

        def check_job(self, adapter: str) -> None:
            """A job needs the file to replay."""
            if not self.path:
                raise AdapterError(
                    f"{adapter}: params.path is required (the .csv or .csv.gz file to replay)"
                )

        def check_roots(self, roots: Sequence[Path]) -> None:
            """Refuse (`PathNotAllowed`) a path that resolves outside every root; opens nothing."""
            if self.path:
                confine(self.path, roots)

    def __init__(
        self,
        job: JobSpec,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        chunk_bytes: int = 256 * 1024,
        pacing_quantum_s: float = 0.01,
        max_line_bytes: int = MAX_LINE_BYTES,
    ) -> None:
        params = check_params(self.name, self.Params, job.params)
        assert params.path  # check_job
        self.path = _path_param(params.path)
        self.speed: float | None = None if params.speed == "max" else float(params.speed)
        symbols = job_symbols(job)
        self.symbols_filter: frozenset[str] | None = frozenset(symbols) if symbols else None
        self._job_symbols = symbols
        self._layout = _read_layout(self.path)
        # Blocks of about 256 KiB (a few thousand rows) keep the working set in cache, which
        # measured faster than bigger blocks, and keep each pause of the event loop short. A
        # chunk no longer than a line may be keeps every line but a block's first within limit.
        self._max_line = max(1, max_line_bytes)
        self._chunk_bytes = max(1, min(chunk_bytes, self._max_line))
        self._clock = clock
        self._sleep = sleep
        self._quantum_s = pacing_quantum_s
        self._names: dict[bytes, str | None] = {}
        self.bad_rows: list[tuple[int, str]] = []
        """The first `MAX_BAD_ROWS` rejected rows: (line number, reason); the header is line 1."""
        self.bad_row_count = 0
        self.ticks_per_symbol: dict[str, int] = {}
        """Good rows per symbol so far (the last `seq`), in order of first appearance."""
        self._reset()

    @property
    def clock_rate(self) -> float:
        """0.0 when replaying as fast as possible, else the speed factor."""
        return 0.0 if self.speed is None else self.speed

    async def run(self, sink: TickSink, resume_after: Mapping[str, int] | None = None) -> None:
        """Replay the whole file into `sink`, then call `sink.end_of_stream` once."""
        self._reset()
        resume = {sym: seq for sym, seq in (resume_after or {}).items() if seq > 0} or None
        try:
            stream = _open(self.path, self._layout.gzipped)
        except OSError as exc:
            raise AdapterError(
                f"replay: params.path {str(self.path)!r} cannot be opened: {exc}"
            ) from exc
        with stream:
            for line_no, block, lines in self._blocks(stream):
                columns = self._parse(line_no, block, lines)
                if columns is not None:
                    if self.speed is None:
                        for symbol, ticks in self._group(columns, resume):
                            await sink.put(symbol, ticks)
                    else:
                        await self._paced(columns, resume, sink)
                # Let the sink's publisher (acks, timers) run between blocks.
                await asyncio.sleep(0)
        counts = self.ticks_per_symbol
        # Requested symbols absent from the file still get their (empty) end of stream, so
        # whoever waits for every symbol of the job is not left waiting.
        symbols = [*counts, *(sym for sym in self._job_symbols if sym not in counts)]
        await sink.end_of_stream(symbols, {sym: counts.get(sym, 0) for sym in symbols})

    # -----------------------------------------------------------------------------------------
    # Reading

    def _reset(self) -> None:
        self.bad_rows = []
        self.bad_row_count = 0
        self.ticks_per_symbol = {}
        self._ts0: int | None = None  # event time of the first replayed row (pacing origin)
        self._t0 = 0.0  # clock() when it was replayed
        self._max_ts = 0  # largest event time replayed so far (pacing never goes backwards)

    def _blocks(self, stream: IO[bytes]) -> Iterator[tuple[int, bytes, int]]:
        """Blocks of whole data lines: (number of the first line, block, lines in it).

        A line longer than `max_line_bytes` is one bad row, read past chunk by chunk and never
        held whole: memory stays within a chunk and a line of the limit, whatever the file.
        """
        limit = self._max_line
        carry = b""  # the start of the line numbered `line_no`, no newline yet
        line_no = 1
        header = True  # line 1, checked by `_read_layout`, is no row
        skipping = False  # inside a line over the limit, looking for its end

        def drop_line() -> None:
            nonlocal header, line_no
            if not header:
                self._bad(line_no, f"the line is longer than {limit} bytes (the row limit)")
            header = False
            line_no += 1

        try:
            while chunk := stream.read(self._chunk_bytes):
                if skipping:
                    end = chunk.find(b"\n")
                    if end < 0:
                        continue
                    skipping = False
                    drop_line()
                    chunk = chunk[end + 1 :]
                data = carry + chunk if carry else chunk
                cut = data.rfind(b"\n")
                if cut < 0:
                    carry = data
                    if len(carry) > limit:
                        skipping, carry = True, b""
                    continue
                block: bytes | None = data[:cut]
                carry = data[cut + 1 :]
                # Only the first line can be over the limit: it alone may span chunks, and a
                # chunk is no longer than the limit.
                first = data.find(b"\n", 0, cut)
                if header or (first if first >= 0 else cut) > limit:
                    drop_line()
                    block = None if first < 0 else data[first + 1 : cut]
                if block is not None:
                    lines = block.count(b"\n") + 1
                    yield line_no, block, lines
                    line_no += lines
                if len(carry) > limit:
                    skipping, carry = True, b""
        except (OSError, EOFError, zlib.error) as exc:
            where = f"after line {max(line_no - 1, 1)}"
            raise AdapterError(
                f"replay: params.path {str(self.path)!r} could not be read {where}: {exc}"
            ) from exc
        if skipping:
            drop_line()  # the last line, over the limit, had no newline
        elif carry and not header:
            yield line_no, carry, carry.count(b"\n") + 1  # the last line had no newline

    def _parse(self, line_no: int, block: bytes, rows: int) -> _Columns | None:
        """The good (and wanted) rows of a block; None when there are none."""
        if b"\r" in block:
            # CRLF files: blocks are cut at "\n", so the last line may still end in "\r".
            block = block.replace(b"\r\n", b"\n").removesuffix(b"\r")
        if b'"' in block:
            return self._parse_rows(line_no, block)
        lay = self._layout
        width = lay.fields
        fields = block.replace(b"\n", b",").split(b",")
        if len(fields) != rows * width:
            return self._parse_rows(line_no, block)  # short/long rows or blank lines
        symbols = fields[lay.symbol :: width]
        cache = self._names
        unique = dict.fromkeys(symbols)
        names: dict[bytes, str | None] = {}
        for raw in unique:
            name = cache[raw] if raw in cache else self._name(raw)
            if name is None:
                return self._parse_rows(line_no, block)  # an empty or undecodable symbol
            names[raw] = name
        ts_raw = fields[lay.ts :: width]
        price_raw = fields[lay.price :: width]
        size_raw = fields[lay.size :: width]
        recv_raw = fields[lay.recv :: width] if lay.recv >= 0 else None
        wanted = self.symbols_filter
        unique_kept: Mapping[bytes, str | None] | None = names
        if wanted is not None:
            keep = {raw for raw in unique if names[raw] in wanted}
            if not keep:
                return None
            if len(keep) < len(unique):
                unique_kept = None
                mask = list(map(keep.__contains__, symbols))
                symbols = list(compress(symbols, mask))
                ts_raw = list(compress(ts_raw, mask))
                price_raw = list(compress(price_raw, mask))
                size_raw = list(compress(size_raw, mask))
                if recv_raw is not None:
                    recv_raw = list(compress(recv_raw, mask))
        try:
            ts = list(map(int, ts_raw))
            price = list(map(float, price_raw))
            size = list(map(float, size_raw))
            recv = ts if recv_raw is None else list(map(int, recv_raw))
        except ValueError:
            return self._parse_rows(line_no, block)
        # A NaN or inf anywhere makes the sum non-finite; a finite sum that overflows only
        # costs a detour through the exact per-row check.
        if (
            min(ts) <= 0
            or not math.isfinite(sum(price))
            or not math.isfinite(sum(size))
            or min(size) < 0
            or min(price) < 0
        ):
            return self._parse_rows(line_no, block)
        return _Columns(symbols, names, unique_kept, ts, recv, price, size)

    def _parse_rows(self, line_no: int, block: bytes) -> _Columns | None:
        """The per-row path: every row checked on its own, bad ones recorded with a reason."""
        lay = self._layout
        wanted = self.symbols_filter
        quoted = b'"' in block
        symbols: list[str] = []
        ts_col: list[int] = []
        recv_col: list[int] = []
        price_col: list[float] = []
        size_col: list[float] = []
        bad = self._bad
        for offset, line in enumerate(block.split(b"\n")):
            number = line_no + offset
            if not line.strip():
                continue  # a blank line is not a row
            fields: Sequence[bytes | str]
            if quoted:
                try:
                    fields = next(csv.reader([line.decode("utf-8")]), [])
                except UnicodeDecodeError:
                    bad(number, "a quoted row that is not UTF-8 text")
                    continue
                except csv.Error:
                    bad(number, "a row whose quoting is not valid CSV")
                    continue
            else:
                fields = line.split(b",")
            if len(fields) < lay.needed:
                bad(
                    number,
                    f"missing fields: {len(fields)} of the {lay.needed} needed to reach "
                    f"every required column ({', '.join(REQUIRED_COLUMNS)})",
                )
                continue
            raw_symbol = fields[lay.symbol]
            if isinstance(raw_symbol, bytes):
                symbol = self._names.get(raw_symbol) or self._name(raw_symbol)
            else:
                symbol = raw_symbol if _is_symbol(raw_symbol) else None
            if symbol is None:
                bad(number, f"symbol is {SYMBOL_RULE}")
                continue
            if wanted is not None and symbol not in wanted:
                continue
            raw = fields[lay.ts]
            try:
                ts = int(raw)
            except ValueError:
                bad(number, "ts_ns is not an integer")
                continue
            if ts <= 0:
                bad(number, "ts_ns is not positive")
                continue
            price = _number(fields[lay.price], "price", number, bad)
            if price is None:
                continue
            size = _number(fields[lay.size], "size", number, bad)
            if size is None:
                continue
            recv = ts
            if lay.recv >= 0 and lay.recv < len(fields) and fields[lay.recv].strip():
                raw = fields[lay.recv]
                try:
                    recv = int(raw)
                except ValueError:
                    bad(number, "recv_ns is not an integer")
                    continue
            symbols.append(symbol)
            ts_col.append(ts)
            recv_col.append(recv)
            price_col.append(price)
            size_col.append(size)
        if not symbols:
            return None
        names = {symbol: symbol for symbol in dict.fromkeys(symbols)}
        recv_col = recv_col if lay.recv >= 0 else ts_col
        return _Columns(symbols, names, names, ts_col, recv_col, price_col, size_col)

    def _name(self, raw: bytes) -> str | None:
        """Decode (and cache) a raw symbol; None when it is not a symbol (`_is_symbol`)."""
        try:
            name: str | None = raw.decode("utf-8")
        except UnicodeDecodeError:
            name = None
        if name is not None and not _is_symbol(name):
            name = None
        if len(self._names) >= _NAME_CACHE_LIMIT:
            self._names.clear()  # a file of countless distinct symbols must not grow it forever
        self._names[raw] = name
        return name

    def _bad(self, line: int, reason: str) -> None:
        self.bad_row_count += 1
        if len(self.bad_rows) < MAX_BAD_ROWS:
            self.bad_rows.append((line, reason))

    # -----------------------------------------------------------------------------------------
    # Ticks

    def _group(
        self, cols: _Columns, resume: Mapping[str, int] | None
    ) -> list[tuple[str, list[Tick]]]:
        """Ticks per symbol (file order kept within a symbol), numbered and resume-filtered."""
        symbols, names = cols.symbols, cols.names
        counts = self.ticks_per_symbol
        unique = cols.unique if cols.unique is not None else dict.fromkeys(symbols)
        for raw in unique:
            counts.setdefault(names[raw] or "", 0)  # first appearance order, in file order
        same_recv = cols.recv is cols.ts
        groups: list[tuple[Any, Sequence[int], Sequence[int], Sequence[float], Sequence[float]]]
        if len(unique) == 1:
            groups = [(symbols[0], cols.ts, cols.recv, cols.price, cols.size)]
        else:
            # One stable sort of row positions by symbol puts each symbol's rows together, still
            # in file order; every column is then reordered by one C-level itemgetter call.
            pick = itemgetter(*sorted(range(len(symbols)), key=symbols.__getitem__))
            ordered = pick(symbols)
            ts: Sequence[int] = pick(cols.ts)
            recv: Sequence[int] = ts if same_recv else pick(cols.recv)
            price: Sequence[float] = pick(cols.price)
            size: Sequence[float] = pick(cols.size)
            groups = []
            start = 0
            for raw in sorted(unique):
                end = bisect_right(ordered, raw, start)
                groups.append(
                    (
                        raw,
                        ts[start:end],
                        ts[start:end] if same_recv else recv[start:end],
                        price[start:end],
                        size[start:end],
                    )
                )
                start = end
        out: list[tuple[str, list[Tick]]] = []
        for raw, g_ts, g_recv, g_price, g_size in groups:
            symbol = names[raw] or ""
            first = counts[symbol]
            count = len(g_ts)
            counts[symbol] = first + count
            if resume is not None:
                skip = min(count, max(0, resume.get(symbol, 0) - first))
                if skip == count:
                    continue
                if skip:
                    g_ts, g_recv = g_ts[skip:], g_recv[skip:]
                    g_price, g_size = g_price[skip:], g_size[skip:]
                    first += skip
            seqs = range(first + 1, first + len(g_ts) + 1)
            out.append((symbol, list(map(Tick, g_ts, g_recv, seqs, g_price, g_size))))
        return out

    async def _paced(
        self, cols: _Columns, resume: Mapping[str, int] | None, sink: TickSink
    ) -> None:
        """Deliver a block at `speed` times the recorded pace, in slices of about one quantum."""
        assert self.speed is not None
        ns_per_s = self.speed * 1e9  # event-time ns replayed per wall-clock second
        times: list[int] = cols.ts
        if resume is not None and any(
            self.ticks_per_symbol.get(symbol, 0) < seq for symbol, seq in resume.items()
        ):
            # Rows a resumed run skips must not be waited for: they count as time 0, which
            # makes them due at once and keeps them out of the pacing origin.
            kept = self._kept(cols, resume)
            times = [t if keep else 0 for t, keep in zip(times, kept, strict=True)]
        if self._ts0 is None:
            first = next((t for t in times if t), 0)
            if not first:
                for symbol, ticks in self._group(cols, resume):  # all skipped: numbering only
                    await sink.put(symbol, ticks)
                return
            self._ts0, self._t0, self._max_ts = first, self._clock(), first
        ts0, t0 = self._ts0, self._t0
        # Rows are due at their running maximum event time: file order is kept, and a row whose
        # time goes backwards (merged feeds) is simply due at once.
        due_ts = list(accumulate(times, max, initial=self._max_ts))[1:]
        self._max_ts = due_ts[-1]
        quantum_ns = self._quantum_s * ns_per_s
        i, n = 0, len(due_ts)
        while i < n:
            now = self._clock()
            j = bisect_right(due_ts, ts0 + (now - t0) * ns_per_s, i)
            if j == i:
                # Ahead of schedule: wait for the next quantum of rows, then send it at once.
                j = bisect_right(due_ts, due_ts[i] + quantum_ns, i)
                await self._sleep(t0 + (due_ts[j - 1] - ts0) / ns_per_s - now)
            for symbol, ticks in self._group(cols[i:j], resume):
                await sink.put(symbol, ticks)
            i = j

    def _kept(self, cols: _Columns, resume: Mapping[str, int]) -> list[bool]:
        """Per row of `cols`, whether a run resuming after `resume` delivers it."""
        counts = self.ticks_per_symbol
        names = cols.names
        running: dict[str, int] = {}
        keep: list[bool] = []
        for raw in cols.symbols:
            symbol = names[raw] or ""
            seq = running.get(symbol, counts.get(symbol, 0)) + 1
            running[symbol] = seq
            keep.append(seq > resume.get(symbol, 0))
        return keep


# ---------------------------------------------------------------------------------------------
# Params and header


class PathNotAllowed(AdapterError):
    """A replay path outside every configured root (`MDP_REPLAY__ROOTS`): `path_not_allowed`."""


def confine(value: str, roots: Sequence[Path]) -> Path:
    """`value` resolved (`~`, `..`, symlinks), or `PathNotAllowed` if it is under no root.

    Only names are resolved, nothing is opened: a refused path is never read. `roots` must be
    resolved already (`Settings.replay_roots`).
    """
    resolved = Path(os.path.realpath(Path(value).expanduser()))
    if any(resolved.is_relative_to(root) for root in roots):
        return resolved
    shown = repr(value) if str(resolved) == value else f"{value!r} (resolves to {str(resolved)!r})"
    allowed = ", ".join(str(root) for root in roots) or "none"
    raise PathNotAllowed(
        f"replay: params.path {shown} is outside the replay roots ({allowed}); "
        "MDP_REPLAY__ROOTS (colon- or comma-separated) sets the directories a replay may read"
    )


def _path_param(value: str) -> Path:
    path = Path(value).expanduser()
    if not path.exists():
        raise AdapterError(f"replay: params.path {value!r} does not exist")
    if not path.is_file():
        raise AdapterError(f"replay: params.path {value!r} is not a regular file")
    return path


def _open(path: Path, gzipped: bool) -> IO[bytes]:
    if gzipped:
        return cast(IO[bytes], gzip.open(path, "rb"))
    return open(path, "rb")  # the caller closes it


def _read_layout(path: Path) -> _Layout:
    """Open the file once to find its compression and the required columns in its header."""
    shown = repr(str(path))
    try:
        with open(path, "rb") as raw:
            gzipped = raw.read(2) == _GZIP_MAGIC or path.name.lower().endswith(".gz")
        with _open(path, gzipped) as stream:
            head = b""
            while b"\n" not in head and len(head) < _MAX_HEADER_BYTES:
                more = stream.read(64 * 1024)
                if not more:
                    break
                head += more
    except PermissionError as exc:
        raise AdapterError(f"replay: params.path {shown} is not readable: {exc}") from exc
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise AdapterError(f"replay: params.path {shown} is not a valid gzip file: {exc}") from exc
    except OSError as exc:
        raise AdapterError(f"replay: params.path {shown} cannot be read: {exc}") from exc
    line, newline, _ = head.partition(b"\n")
    if not newline and len(head) >= _MAX_HEADER_BYTES:
        raise AdapterError(
            f"replay: params.path {shown} has no line break in its first "
            f"{_MAX_HEADER_BYTES} bytes: not a CSV file with a header"
        )
    try:
        text = line.decode("utf-8-sig").rstrip("\r")
    except UnicodeDecodeError as exc:
        raise AdapterError(f"replay: params.path {shown} has a header that is not UTF-8") from exc
    if not text.strip():
        raise AdapterError(
            f"replay: params.path {shown} has no header line; it must start with "
            f"{','.join(REQUIRED_COLUMNS)} (any order, extra columns allowed)"
        )
    columns = [name.strip().lower() for name in next(csv.reader([text]))]
    index: dict[str, int] = {}
    for i, name in enumerate(columns):
        index.setdefault(name, i)  # the first of duplicate names wins
    for name in REQUIRED_COLUMNS:
        if name not in index:
            # The header's own names are not shown: the file may be anything (`/etc/shadow`).
            raise AdapterError(
                f"replay: params.path {shown}: line 1 (the header, {len(columns)} "
                f"column{'s' if len(columns) != 1 else ''}) has no column {name!r}; required: "
                f"{', '.join(REQUIRED_COLUMNS)} (any order, extra columns allowed)"
            )
    required = [index[name] for name in REQUIRED_COLUMNS]
    return _Layout(
        gzipped=gzipped,
        fields=len(columns),
        ts=index["ts_ns"],
        symbol=index["symbol"],
        price=index["price"],
        size=index["size"],
        recv=index.get(RECV_COLUMN, -1),
        needed=max(required) + 1,
    )


def _number(
    raw: bytes | str, column: str, line: int, bad: Callable[[int, str], None]
) -> float | None:
    """A finite, non-negative price or size; else None, the row reported (never its text)."""
    try:
        value = float(raw)
    except ValueError:
        bad(line, f"{column} is not a number")
        return None
    if not math.isfinite(value):
        bad(line, f"{column} is not finite (NaN or infinity)")
        return None
    if value < 0:
        bad(line, f"{column} is negative")
        return None
    return value


def _is_symbol(name: str) -> bool:
    """Whether a file's symbol is one the pipeline can carry (`DEFAULT_SYMBOL_PATTERN`)."""
    # A field of half a megabyte would become a subject the server refuses with the connection.
    return _SYMBOL.match(name) is not None
