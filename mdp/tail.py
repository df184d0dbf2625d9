"""`mdp tail quotes|bars|events [SYMBOL...]`: messages as they pass, one line each.

Pure formatting first (one line per tick, bar or event, human columns or JSON), then the edge:
core-NATS subscriptions (what passes from now on, nothing replayed), every payload decoded into
its contract struct.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Literal, TextIO

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from mdp.shared.contract import names
from mdp.shared.contract.codec import Codec, DecodeError
from mdp.shared.contract.events import Event, decode_event, event_name
from mdp.shared.contract.messages import Bar, Tick, TickBatch

Kind = Literal["quotes", "bars", "events"]
KINDS: tuple[Kind, ...] = ("quotes", "bars", "events")

_TICKS: Codec[TickBatch] = Codec(TickBatch)
_BAR: Codec[Bar] = Codec(Bar)
_json = msgspec.json.Encoder()


def clock(ns: int) -> str:
    """`09:00:01.250` (UTC) of a time in ns, or `-` for none."""
    if not ns:
        return "-"
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%H:%M:%S.%f")[:-3]


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"


def subjects(kind: Kind, symbols: Iterable[str]) -> list[str]:
    """The core subjects to subscribe to for `kind`, narrowed to `symbols` when given."""
    chosen = list(dict.fromkeys(symbols))
    if kind == "quotes":
        return [names.quotes(s) for s in chosen] or [names.QUOTES_SYMBOLS]
    if kind == "bars":
        return [f"md.bars.*.{names.escape_symbol(s)}" for s in chosen] or [names.BARS_ALL]
    return [names.EVENTS_ALL]


def tick_line(batch: TickBatch, tick: Tick) -> str:
    """`time symbol price size bid x ask provider seq` of one tick."""
    quote = f"{_num(tick.bid)} x {_num(tick.ask)}" if tick.bid or tick.ask else "-"
    return (
        f"{clock(tick.ts)}  {batch.symbol:<12} {tick.price:>12.6g} {tick.size:>10.6g}  "
        f"{quote:<23} {batch.provider} #{tick.seq}"
    )


def tick_json(batch: TickBatch, tick: Tick) -> bytes:
    """One tick as a JSON object: its fields, its symbol and provider."""
    body = msgspec.structs.asdict(tick)
    return _json.encode({"symbol": batch.symbol, "provider": batch.provider, **body})


def bar_line(bar: Bar) -> str:
    """`start interval symbol O H L C volume trades rev provider` of one bar."""
    rev = f" rev {bar.rev}" if bar.rev else ""
    return (
        f"{clock(bar.start)}  {bar.interval:<4} {bar.symbol:<12} O {bar.open:<10.6g} "
        f"H {bar.high:<10.6g} L {bar.low:<10.6g} C {bar.close:<10.6g} V {bar.volume:<10.6g} "
        f"n {bar.trade_count}{rev} {bar.provider}"
    )


def event_line(event: Event) -> str:
    """`time name key=value ...` of one event (every field but the time)."""
    fields = msgspec.structs.asdict(event)
    ts = next((fields.pop(k) for k in ("ts", "at_ns") if k in fields), 0)
    said = " ".join(f"{k}={v}" for k, v in fields.items() if v not in (None, [], {}, ""))
    return f"{clock(ts)}  {event_name(event):<10} {said}"


def event_json(event: Event) -> bytes:
    """One event as a JSON object, its name under `event`."""
    body = msgspec.json.decode(_json.encode(event))
    return _json.encode({"event": event_name(event), **body})


def event_symbols(event: Event) -> set[str]:
    """The symbols an event is about (none for job-wide events without a symbol list)."""
    symbol = getattr(event, "symbol", None)
    many = getattr(event, "symbols", None) or []
    return ({symbol} if symbol else set()) | set(many)


def lines_of(kind: Kind, msg: Msg, as_json: bool, symbols: set[str]) -> list[str | bytes]:
    """The lines one bus message prints; DecodeError/ValueError for a payload off contract."""
    if kind == "quotes":
        batch = _TICKS.decode(msg.data, msg.headers)
        if as_json:
            return [tick_json(batch, t) for t in batch.ticks]
        return [tick_line(batch, t) for t in batch.ticks]
    if kind == "bars":
        bar = _BAR.decode(msg.data, msg.headers)
        return [_json.encode(bar) if as_json else bar_line(bar)]
    event = decode_event(msg.subject, msg.data)
    if symbols and not event_symbols(event) & symbols:
        return []
    return [event_json(event) if as_json else event_line(event)]


# ---------------------------------------------------------------------------------------------
# The edge


async def tail(
    nc: NATS,
    kind: Kind,
    symbols: list[str],
    *,
    as_json: bool = False,
    count: int = 0,
    out: TextIO = sys.stdout,
    err: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> int:
    """Print what passes until cancelled (or `count` lines); return the lines printed."""
    wanted = set(symbols)
    queue: asyncio.Queue[Msg] = asyncio.Queue(maxsize=10_000)
    dropped = 0

    async def on_msg(msg: Msg) -> None:
        nonlocal dropped
        try:
            queue.put_nowait(msg)
        except asyncio.QueueFull:  # a terminal slower than the feed: drop, say so below
            dropped += 1

    subs = [await nc.subscribe(subject, cb=on_msg) for subject in subjects(kind, symbols)]
    printed = 0
    try:
        while not count or printed < count:
            msg = await queue.get()
            try:
                lines = lines_of(kind, msg, as_json, wanted)
            except (DecodeError, ValueError, msgspec.ValidationError) as exc:
                err(f"mdp: skipped a message on {msg.subject} that does not decode: {exc}")
                continue
            for line in lines[: count - printed] if count else lines:
                out.write(line.decode() if isinstance(line, bytes) else line)
                out.write("\n")
                printed += 1
            out.flush()
            if dropped:
                err(f"mdp: {dropped} message(s) dropped: the output is slower than the feed")
                dropped = 0
    finally:
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
    return printed
