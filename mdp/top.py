"""`mdp top`: per service, rates in and out, consumer lag, tick-to-bar latency, dead letters,
restarts, and a flag on a stalled stage.

Two samples `interval` apart make one snapshot: a rate is a counter's growth between them. The
pure part (`Sample` -> `Row` -> text) is tested alone; `sample()` is the only I/O: the services'
`/metrics` (through `mdp.supervisor.scrape`), JetStream consumer and stream info, the bars that
pass on `md.bars.>` meanwhile, and the services' logs for restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from mdp.shared.contract import names
from mdp.shared.contract.codec import Codec, DecodeError
from mdp.shared.contract.messages import Bar
from mdp.supervisor import scrape

SERVICES = ("provider", "router", "aggregator", "store", "control")

# Every metric `top` reads, by role, in one place: a renamed metric is a one-line change here.
# `out` is what a stage produces (ticks published, ticks routed, bars emitted, rows stored).
METRICS: dict[str, dict[str, str]] = {
    "provider": {"out": "mdp_provider_ticks_published_total"},
    "router": {"out": "mdp_router_ticks_routed_total"},
    "aggregator": {
        "out": "mdp_aggregator_bars_emitted_total",
        "ticks": "mdp_aggregator_ticks_aggregated_total",
    },
    "store": {"out": "mdp_store_rows_written_total"},
    "control": {"out": "ingest_starts_total"},
}
OUT_UNIT = {"provider": "ticks", "router": "ticks", "aggregator": "bars", "store": "rows"}

# The streams a service consumes; its durable consumers are named after it (`router`,
# `aggregator`, `aggregator-p0`, `store-writer`, `control-suppressed`, ...).
INPUTS: dict[str, tuple[str, ...]] = {
    "router": (names.STREAM_RAW,),
    "aggregator": (names.STREAM_QUOTES,),
    "store": (names.STREAM_STORE_SYNC,),
    "control": (names.STREAM_EVENTS,),
}

# Bars whose end is this far behind their arrival are event time from the past (a replay):
# their "latency" says nothing about the pipeline.
REPLAY_LAG_NS = 3_600 * 10**9


class Consumer(msgspec.Struct):
    """One durable consumer's state: not yet delivered, delivered but not acked, ack floor."""

    stream: str
    name: str
    num_pending: int
    num_ack_pending: int
    ack_floor: int
    delivered: int  # the last stream sequence delivered


class Sample(msgspec.Struct):
    """What one look at the system saw (`at`: monotonic seconds)."""

    at: float
    up: dict[str, bool]
    counters: dict[str, dict[str, float]]  # service -> role -> value
    consumers: dict[str, list[Consumer]]  # service -> its consumers
    dead_letters: dict[str, int]  # service -> messages on md.dlq.<service>
    restarts: dict[str, int | None]  # None: not known (no logs to read)


class Row(msgspec.Struct):
    """One service in a snapshot."""

    service: str
    up: bool
    rate_in: float | None  # messages/s delivered from its input stream(s)
    rate_out: float | None  # OUT_UNIT[service]/s
    pending: int | None  # not yet delivered + delivered but unacked
    ack_floor: int | None
    latency_ms: float | None  # tick-to-bar p50 (aggregator only)
    latency_max_ms: float | None
    dead_letters: int
    restarts: int | None
    stalled: bool


def _pending(consumers: Sequence[Consumer]) -> int:
    return sum(c.num_pending + c.num_ack_pending for c in consumers)


def stalled(before: Sequence[Consumer], after: Sequence[Consumer], rate_out: float | None) -> bool:
    """A stage is stalled when its input waits and grows while it produces nothing."""
    if not after or rate_out is None or rate_out > 0:
        return False
    return _pending(after) > 0 and _pending(before) <= _pending(after)


def latency(bars: Iterable[tuple[int, Bar]]) -> tuple[float | None, float | None]:
    """p50 and max in ms of `arrival - bar end` over first revisions, None when there is none
    (or when the bars are a replay's, event time from the past)."""
    lags = [arrived - bar.end for arrived, bar in bars if bar.rev == 0]
    if not lags or statistics.median(lags) > REPLAY_LAG_NS:
        return None, None
    return statistics.median(lags) / 1e6, max(lags) / 1e6


def rows(before: Sample, after: Sample, bars: Sequence[tuple[int, Bar]]) -> list[Row]:
    """The snapshot between two samples."""
    seconds = max(after.at - before.at, 1e-3)
    p50, worst = latency(bars)
    out = []
    for service in SERVICES:
        then, now = before.counters.get(service, {}), after.counters.get(service, {})
        rate_out = None
        if service in OUT_UNIT and "out" in now:
            rate_out = max(now["out"] - then.get("out", now["out"]), 0.0) / seconds
        consumers = after.consumers.get(service, [])
        old = {(c.stream, c.name): c.delivered for c in before.consumers.get(service, [])}
        rate_in = None
        if consumers:
            moved = sum(c.delivered - old.get((c.stream, c.name), c.delivered) for c in consumers)
            rate_in = max(moved, 0) / seconds
        out.append(
            Row(
                service=service,
                up=after.up.get(service, False),
                rate_in=rate_in,
                rate_out=rate_out,
                pending=_pending(consumers) if consumers else None,
                ack_floor=min(c.ack_floor for c in consumers) if consumers else None,
                latency_ms=p50 if service == "aggregator" else None,
                latency_max_ms=worst if service == "aggregator" else None,
                dead_letters=after.dead_letters.get(service, 0),
                restarts=after.restarts.get(service),
                stalled=stalled(before.consumers.get(service, []), consumers, rate_out),
            )
        )
    return out


def _n(value: float | None, fmt: str = ",.0f") -> str:
    return "-" if value is None else format(value, fmt)


def render(table: Sequence[Row]) -> str:
    """The snapshot as a table, a warning line per stalled stage."""
    lines = [
        f"{'SERVICE':<11}{'STATE':<7}{'IN msg/s':>10}{'OUT/s':>10} {'UNIT':<6}{'PENDING':>9}"
        f"{'ACK FLOOR':>11}{'TICK>BAR p50/max ms':>21}{'DLQ':>6}{'RESTARTS':>10}"
    ]
    for r in table:
        state = "STALL" if r.stalled else ("up" if r.up else "down")
        latency_text = (
            "-" if r.latency_ms is None else f"{r.latency_ms:,.0f}/{r.latency_max_ms or 0:,.0f}"
        )
        lines.append(
            f"{r.service:<11}{state:<7}{_n(r.rate_in):>10}{_n(r.rate_out):>10} "
            f"{OUT_UNIT.get(r.service, ''):<6}{_n(r.pending, ',d'):>9}{_n(r.ack_floor, 'd'):>11}"
            f"{latency_text:>21}{r.dead_letters:>6,d}{_n(r.restarts, 'd'):>10}"
        )
    for r in table:
        if r.stalled:
            lines.append(
                f"warning: {r.service} is stalled: {r.pending:,} message(s) wait on its input "
                "and it produced nothing (see its log)"
            )
    return "\n".join(lines)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60:02d}:{minutes % 60:02d}:{secs:02d}"


def progress_line(
    elapsed_s: float,
    ticks: float,
    tick_rate: float,
    bars: dict[str, float],
    rows: float,
    dead_letters: int,
    restarts: int,
    stalled_stages: Sequence[str],
) -> str:
    """The live line of `mdp up`: elapsed, ticks in, bars out per interval, rows, dead letters,
    restarts, and a warning naming a stalled stage."""
    from mdp.shared.contract.messages import interval_ns

    def width(interval: str) -> int:
        try:
            return interval_ns(interval)
        except ValueError:
            return 0

    per = " ".join(f"{i} {bars[i]:,.0f}" for i in sorted(bars, key=width)) or "0"
    line = (
        f"{_clock(elapsed_s)} | ticks in {ticks:>10,.0f} ({tick_rate:>8,.0f}/s) | bars {per} | "
        f"rows stored {rows:,.0f} | dead letters {dead_letters:,}"
    )
    if restarts:
        line += f" | restarts {restarts}"
    if stalled_stages:
        line += f" | STALLED: {', '.join(stalled_stages)}"
    return line


def restarts_in_log(lines: Iterable[str], since_ns: int = 0) -> int:
    """Restarts recorded in a service's JSON log: its `started` lines since `since_ns`, less one."""
    starts = 0
    for line in lines:
        if '"started"' not in line:  # cheap filter first: logs are long
            continue
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if record.get("event") != "started":
                continue
            stamp = str(record.get("timestamp", ""))
            if since_ns and stamp and _iso_ns(stamp) < since_ns:
                continue
            starts += 1
    return max(starts - 1, 0)


def _iso_ns(stamp: str) -> int:
    from mdp.export import parse_time

    return parse_time(stamp)


# ---------------------------------------------------------------------------------------------
# The edge


async def _consumers(nc: NATS, service: str) -> list[Consumer]:
    js = nc.jetstream()
    found = []
    for stream in INPUTS.get(service, ()):
        try:
            infos = await js.consumers_info(stream)
        except Exception:
            continue
        for info in infos:
            if info.name.split("-", 1)[0] != service or info.config.durable_name is None:
                continue  # another service's, or a client's ephemeral one
            found.append(
                Consumer(
                    stream=stream,
                    name=info.name,
                    num_pending=info.num_pending or 0,
                    num_ack_pending=info.num_ack_pending or 0,
                    ack_floor=(info.ack_floor.stream_seq or 0) if info.ack_floor else 0,
                    delivered=(info.delivered.stream_seq or 0) if info.delivered else 0,
                )
            )
    return found


async def dead_letters(nc: NATS) -> dict[str, int]:
    try:
        info = await nc.jetstream().stream_info(names.STREAM_DLQ, subjects_filter=names.DLQ_ALL)
    except Exception:
        return {}
    return {subject.rsplit(".", 1)[-1]: n for subject, n in (info.state.subjects or {}).items()}


async def _up(nc: NATS, service: str) -> bool:
    try:
        await nc.request(names.ready(service), b"", timeout=0.5)
    except Exception:
        return False
    return True


def _restarts(log_dir: Path | None, since_ns: int) -> dict[str, int | None]:
    if log_dir is None:
        return dict.fromkeys(SERVICES)
    counts: dict[str, int | None] = {}
    for service in SERVICES:
        path = log_dir / f"{service}.log"
        try:
            with path.open(errors="replace") as lines:
                counts[service] = restarts_in_log(lines, since_ns)
        except OSError:
            counts[service] = None
    return counts


async def sample(nc: NATS, log_dir: Path | None = None, since_ns: int = 0) -> Sample:
    """Look at the system once."""
    counters: dict[str, dict[str, float]] = {}
    for service, roles in METRICS.items():
        values = await scrape(nc, service, list(roles.values()))
        counters[service] = {role: values[metric] for role, metric in roles.items()}
    consumers = {s: await _consumers(nc, s) for s in INPUTS}
    up = {s: await _up(nc, s) for s in SERVICES}
    restarts = await asyncio.to_thread(_restarts, log_dir, since_ns)
    return Sample(time.monotonic(), up, counters, consumers, await dead_letters(nc), restarts)


async def bars_by_interval(
    nc: NATS, metric: str = METRICS["aggregator"]["out"]
) -> dict[str, float]:
    """The aggregator's bars emitted so far by `interval` label."""
    from mdp.supervisor import scrape_by

    return await scrape_by(nc, "aggregator", metric, "interval")


_BAR: Codec[Bar] = Codec(Bar)


async def snapshot(
    nc: NATS,
    interval: float,
    log_dir: Path | None = None,
    since_ns: int = 0,
    stop: asyncio.Event | None = None,
) -> list[Row] | None:
    """Two samples `interval` apart, and the bars that passed in between; None when `stop` is
    set meanwhile."""
    bars: list[tuple[int, Bar]] = []

    async def on_bar(msg: Msg) -> None:
        with contextlib.suppress(DecodeError):
            bars.append((time.time_ns(), _BAR.decode(msg.data, msg.headers)))
        if len(bars) > 100_000:  # bounded, whatever the rate
            del bars[:50_000]

    sub = await nc.subscribe(names.BARS_ALL, cb=on_bar)
    try:
        before = await sample(nc, log_dir, since_ns)
        stop = stop or asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
        if stop.is_set():
            return None
        after = await sample(nc, log_dir, since_ns)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return rows(before, after, bars)
