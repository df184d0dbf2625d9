"""`mdp bars export`: stored bars out as CSV, JSON lines or Parquet, streamed in chunks.

Pure row formatting first, the writers (which touch a file) after. Every format carries the
bar's start as integer ns *and* as a UTC ISO 8601 time, its end, `rev` and `provider`. The CSV
keeps the columns it always had first (`CSV_HEADER`), so a reader that took the first ten
columns by position still works; the new ones follow.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import IO, Any, Literal

import msgspec
from msgspec.structs import asdict

from mdp.services.store.writers import CSV_HEADER
from mdp.shared.contract.messages import Bar

Format = Literal["csv", "jsonl", "parquet"]
FORMATS: tuple[Format, ...] = ("csv", "jsonl", "parquet")
CSV_COLUMNS = (*CSV_HEADER, "bar_end_ns", "start_utc", "rev", "provider")

# Exit code of `mdp bars export` when nothing matched (an unknown symbol or an empty range).
NOTHING_MATCHED = 4

_NS = 1_000_000_000
_ISO = re.compile(
    r"^\d{4}-\d{2}-\d{2}([T ]\d{2}(:\d{2}(:\d{2}(\.\d{1,9})?)?)?)?(Z|[+-]\d{2}:?\d{2})?$"
)


class MissingExtra(RuntimeError):
    """An optional dependency is not installed; the message says which extra brings it."""


def parse_time(text: str) -> int:
    """ns since the epoch of `2024-08-08`, `2024-08-08T09:00Z`, `...T09:00:00.5+02:00` or an
    integer of ns; a time without an offset is UTC. ValueError otherwise."""
    text = text.strip()
    if re.fullmatch(r"-?\d{10,}", text):
        return int(text)
    match = _ISO.match(text)
    if not match:
        raise ValueError(f"{text!r} is neither an ISO 8601 time (2024-08-08T09:00Z) nor ns")
    fraction = match.group(4) or ""
    # datetime keeps microseconds: parse without the fraction, then add it back exactly in ns.
    plain = text.replace(fraction, "", 1) if fraction else text
    if plain.endswith("Z"):
        plain = plain[:-1] + "+00:00"
    try:
        when = datetime.fromisoformat(plain)
    except ValueError as exc:
        raise ValueError(f"{text!r}: {exc}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    seconds = int(when.timestamp())
    extra = int(fraction[1:].ljust(9, "0")) if fraction else 0
    return seconds * _NS + extra


def iso_utc(ns: int) -> str:
    """`2024-08-08T09:00:00Z` (with `.fffffffff` only when the time has a fraction of a second)."""
    seconds, rest = divmod(ns, _NS)
    text = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{text}.{rest:09d}Z" if rest else f"{text}Z"


def csv_row(bar: Bar) -> tuple[object, ...]:
    """One CSV row in `CSV_COLUMNS` order; floats as `repr` so they round-trip exactly."""
    vwap = "" if bar.vwap is None else repr(bar.vwap)
    return (
        bar.symbol, bar.interval, bar.start, repr(bar.open), repr(bar.high), repr(bar.low),
        repr(bar.close), repr(bar.volume), bar.trade_count, vwap,
        bar.end, iso_utc(bar.start), bar.rev, bar.provider,
    )  # fmt: skip


class JsonBar(Bar, gc=False):
    """A bar as one JSON line: the `Bar` fields (wire names), then its start and end in UTC."""

    start_utc: str = ""
    end_utc: str = ""


def json_bar(bar: Bar) -> JsonBar:
    """The JSON-lines record of a bar."""
    fields: dict[str, Any] = asdict(bar)
    return JsonBar(**fields, start_utc=iso_utc(bar.start), end_utc=iso_utc(bar.end))


def require(module: str, extra: str) -> Any:
    """Import an optional dependency, or raise MissingExtra naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".", 1)[0]
        raise MissingExtra(
            f"{package} is not installed: pip install 'mdp[{extra}]' (or pip install {package})"
        ) from None


def arrow_schema() -> Any:
    """The Parquet schema: the CSV's columns, with `start_utc` a real UTC timestamp."""
    pa = require("pyarrow", "parquet")
    return pa.schema(
        [
            ("symbol", pa.string()),
            ("interval", pa.string()),
            ("bar_start_ns", pa.int64()),
            ("open", pa.float64()),
            ("high", pa.float64()),
            ("low", pa.float64()),
            ("close", pa.float64()),
            ("volume", pa.float64()),
            ("trade_count", pa.int64()),
            ("vwap", pa.float64()),
            ("bar_end_ns", pa.int64()),
            ("start_utc", pa.timestamp("ns", tz="UTC")),
            ("rev", pa.int64()),
            ("provider", pa.string()),
        ]
    )


def columns(bars: list[Bar]) -> dict[str, list[Any]]:
    """A chunk of bars as columns (the Parquet and DataFrame layout; `start_utc` in ns)."""
    return {
        "symbol": [b.symbol for b in bars],
        "interval": [b.interval for b in bars],
        "bar_start_ns": [b.start for b in bars],
        "open": [b.open for b in bars],
        "high": [b.high for b in bars],
        "low": [b.low for b in bars],
        "close": [b.close for b in bars],
        "volume": [b.volume for b in bars],
        "trade_count": [b.trade_count for b in bars],
        "vwap": [b.vwap for b in bars],
        "bar_end_ns": [b.end for b in bars],
        "start_utc": [b.start for b in bars],
        "rev": [b.rev for b in bars],
        "provider": [b.provider for b in bars],
    }


# ---------------------------------------------------------------------------------------------
# The edge: writing chunks to a binary file


async def write_bars(
    chunks: AsyncIterator[list[Bar]], fmt: Format, open_out: Callable[[], IO[bytes]]
) -> int:
    """Write every chunk in `fmt` as it arrives; return the rows written. `open_out` is called
    at the first row: with none, nothing is opened or written (not even a header)."""
    writer = _WRITERS[fmt]
    rows = 0
    sink: Any = None
    async for bars in chunks:
        if not bars:
            continue
        if sink is None:
            sink = writer.open(open_out())
        writer.write(sink, bars)
        rows += len(bars)
    if sink is not None:
        writer.close(sink)
    return rows


class _Csv:
    @staticmethod
    def open(out: IO[bytes]) -> Any:
        text = io.TextIOWrapper(out, encoding="utf-8", newline="", write_through=True)
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        return (text, writer)

    @staticmethod
    def write(sink: Any, bars: list[Bar]) -> None:
        sink[1].writerows(csv_row(b) for b in bars)

    @staticmethod
    def close(sink: Any) -> None:
        sink[0].flush()
        sink[0].detach()  # the caller owns `out`


class _Jsonl:
    _encoder = msgspec.json.Encoder()

    @staticmethod
    def open(out: IO[bytes]) -> Any:
        return out

    @classmethod
    def write(cls, sink: Any, bars: list[Bar]) -> None:
        buffer = bytearray()
        for bar in bars:
            cls._encoder.encode_into(json_bar(bar), buffer, len(buffer))
            buffer += b"\n"
        sink.write(buffer)

    @staticmethod
    def close(sink: Any) -> None:
        sink.flush()


class _Parquet:
    @staticmethod
    def open(out: IO[bytes]) -> Any:
        pq = require("pyarrow.parquet", "parquet")
        return pq.ParquetWriter(out, arrow_schema(), compression="zstd")

    @staticmethod
    def write(sink: Any, bars: list[Bar]) -> None:
        pa = require("pyarrow", "parquet")
        # One row group per chunk: what is held in memory is one chunk, whatever the range.
        sink.write_batch(pa.record_batch(columns(bars), schema=arrow_schema()))

    @staticmethod
    def close(sink: Any) -> None:
        sink.close()


_WRITERS: dict[str, Any] = {"csv": _Csv, "jsonl": _Jsonl, "parquet": _Parquet}


def check_format(fmt: Format) -> None:
    """Fail before any I/O when `fmt` needs a dependency that is missing."""
    if fmt == "parquet":
        require("pyarrow.parquet", "parquet")
