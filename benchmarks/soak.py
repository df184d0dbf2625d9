"""Soak: the synthetic provider at a fixed rate for minutes; no service's memory may grow.

Starts a private nats-server and the five services (SQLite store in a temporary directory),
starts the synthetic provider through the control service for `--symbols` symbols at `--rate`
ticks/s each, and samples every service process's resident memory (VmRSS, and its peak VmHWM,
from /proc/<pid>/status) every `--sample-s` seconds. At the end it prints, per service, RSS
(mean, max) and peak RSS over the first minute and over the last minute, the growth, the trend
after the first minute (least squares, MB/min: a slow leak shows here before it crosses the
threshold), its CPU use, and a verdict; then the throughput: ticks in, bars out, rows stored,
and what each consumer still had pending once the job stopped. Exit code 1 if any service's
mean RSS grew by more than both `--max-growth-pct` and `--max-growth-mb` between the two
minutes, if one restarted, or if the pipeline fell behind.

The first minute includes the warm-up (the aggregator fills its 60 s revise window and the
1-minute bars in progress; allocator arenas and client buffers reach their working size): about
1-2 MB per service, well under the threshold. `--warmup-s 60` compares the second minute
instead. The nats-server is sampled too, for information only: it holds the streams (their
retention is shortened here to bound the disk), so it grows until they reach their max age.

Not part of CI. The issue's run, 10 minutes, 20 symbols x 500 ticks/s:

    python benchmarks/soak.py
    python benchmarks/soak.py --minutes 3          # a quick check
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import nats
from nats.aio.client import Client as NATS

from mdp.cli import control_request
from mdp.services.registry import SERVICES
from mdp.supervisor import Supervisor, scrape

MB = 1024 * 1024
WINDOW_S = 60.0
STREAMS = ("MD_RAW", "MD_QUOTES", "MD_BARS", "STORE_SYNC")
COUNTERS = {
    "provider": "mdp_provider_ticks_published_total",
    "router": "mdp_router_ticks_routed_total",
    "aggregator": "mdp_aggregator_bars_emitted_total",
    "store": "mdp_store_rows_written_total",
}


@dataclass
class Sample:
    """One reading of a process's memory, `t` seconds after the provider started."""

    t: float
    rss: int
    hwm: int


@dataclass
class Process:
    """A sampled process and its readings."""

    name: str
    pid: int
    samples: list[Sample] = field(default_factory=list)
    restarted: bool = False
    cpu_start: float | None = None
    cpu_end: float | None = None


def read_memory(pid: int) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) of `pid` in bytes, or None when it is gone."""
    values: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    values[key] = int(rest.split()[0]) * 1024  # reported in kB
    except (OSError, ValueError):
        return None
    if len(values) < 2:
        return None
    return values["VmRSS"], values["VmHWM"]


def read_cpu_s(pid: int) -> float | None:
    """User plus system CPU seconds `pid` has used, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # After the command: state is field 3, utime and stime are fields 14 and 15 (in ticks).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def window(samples: list[Sample], start: float, end: float) -> list[Sample]:
    """The samples taken in `[start, end]`."""
    return [s for s in samples if start <= s.t <= end]


def slope_mb_per_min(samples: list[Sample]) -> float:
    """Least-squares RSS trend in MB per minute (0 with fewer than two samples)."""
    if len(samples) < 2:
        return 0.0
    ts = [s.t for s in samples]
    rs = [s.rss / MB for s in samples]
    mt, mr = statistics.fmean(ts), statistics.fmean(rs)
    var = sum((t - mt) ** 2 for t in ts)
    if var == 0:
        return 0.0
    return sum((t - mt) * (r - mr) for t, r in zip(ts, rs, strict=True)) / var * 60


async def totals(nc: NATS) -> dict[str, float]:
    """The pipeline's counters, one per stage (summed over instances)."""
    out: dict[str, float] = {}
    for service, metric in COUNTERS.items():
        out[service] = (await scrape(nc, service, [metric]))[metric]
    return out


async def consumer_lag(nc: NATS) -> dict[str, tuple[int, int]]:
    """Per `stream/consumer`: messages not yet delivered and delivered but not acknowledged."""
    js = nc.jetstream()
    lag: dict[str, tuple[int, int]] = {}
    for stream in STREAMS:
        with contextlib.suppress(Exception):
            for info in await js.consumers_info(stream):
                if info.config.durable_name:
                    lag[f"{stream}/{info.name}"] = (
                        info.num_pending or 0,
                        info.num_ack_pending or 0,
                    )
    return lag


async def drain(nc: NATS, timeout: float) -> dict[str, tuple[int, int]]:
    """Wait until no consumer has anything pending and every bar is stored; return the lag."""
    deadline = time.monotonic() + timeout
    while True:
        lag = await consumer_lag(nc)
        now = await totals(nc)
        idle = not any(pending or unacked for pending, unacked in lag.values())
        if idle and now["store"] >= now["aggregator"]:
            return lag
        if time.monotonic() > deadline:
            return lag
        await asyncio.sleep(0.5)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long the provider runs")
    parser.add_argument("--rate", type=float, default=500.0, help="ticks/s per symbol")
    parser.add_argument("--symbols", type=int, default=20, help="how many symbols")
    parser.add_argument("--sample-s", type=float, default=5.0, help="seconds between samples")
    parser.add_argument(
        "--warmup-s", type=float, default=0.0, help="start the first window this late"
    )
    parser.add_argument("--max-growth-pct", type=float, default=20.0)
    parser.add_argument("--max-growth-mb", type=float, default=20.0)
    parser.add_argument(
        "--min-throughput", type=float, default=0.9, help="share of the offered ticks to reach"
    )
    parser.add_argument("--data-dir", type=Path, help="keep NATS, logs and the store here")
    args = parser.parse_args(argv)
    if args.minutes * 60 < args.warmup_s + 2 * WINDOW_S:
        parser.error(
            f"--minutes {args.minutes:g} leaves no separate start and end minute after a "
            f"{args.warmup_s:g} s warm-up (need {(args.warmup_s + 2 * WINDOW_S) / 60:g})"
        )
    return args


async def soak(args: argparse.Namespace, data_dir: Path) -> int:
    """Run the soak in `data_dir`; return the exit code."""
    sup = Supervisor(
        data_dir=data_dir,
        store_url=f"sqlite:///{data_dir / 'mdp.db'}",
        services=tuple(SERVICES),
        # Shorter retention than the defaults (1 h raw, 24 h quotes): a soak must not fill the
        # disk, and the services' memory does not depend on it. Not below the duplicate window
        # (300 s), which the server refuses.
        env={"MDP_STREAM__RAW_MAX_AGE_S": "300", "MDP_STREAM__QUOTES_MAX_AGE_S": "300"},
        say=lambda line: print(line, file=sys.stderr, flush=True),
    )
    symbols = [f"SOAK{i:03d}" for i in range(args.symbols)]
    duration = args.minutes * 60
    offered = args.rate * len(symbols)
    print(
        f"soak: {len(symbols)} symbols x {args.rate:g} ticks/s = {offered:,.0f} ticks/s for "
        f"{args.minutes:g} min; RSS every {args.sample_s:g} s; data in {data_dir}",
        flush=True,
    )
    procs: dict[str, Process] = {}
    nc: NATS | None = None
    try:
        sup.start()
        await sup.wait_ready(timeout=60)
        assert sup.nats_url and sup.nats_server is not None and sup.nats_server.proc is not None
        nc = await nats.connect(sup.nats_url)
        for name in SERVICES:
            proc = sup.children[name].proc
            assert proc is not None
            procs[name] = Process(name, proc.pid)
        procs["nats-server"] = Process("nats-server", sup.nats_server.proc.pid)
        reply = await control_request(
            nc,
            "start",
            {"provider": "synthetic", "job": "soak", "symbols": symbols,
             "params": {"rate": args.rate}},
        )  # fmt: skip
        if not reply.get("ok"):
            print(f"start refused: {reply.get('error')}", file=sys.stderr)
            return 2
        started = time.monotonic()
        first = await totals(nc)
        for p in procs.values():
            p.cpu_start = read_cpu_s(p.pid)
        next_report = 0.0
        while (elapsed := time.monotonic() - started) < duration:
            sup.check()  # a crashed service is restarted, and the run is then a failure
            for p in procs.values():
                child = sup.children.get(p.name)
                if child is not None and child.proc is not None and child.proc.pid != p.pid:
                    p.restarted = True
                memory = read_memory(p.pid)
                if memory is not None:
                    p.samples.append(Sample(elapsed, *memory))
                else:
                    p.restarted = True
            if elapsed >= next_report:
                now = await totals(nc)
                rate = (now["provider"] - first["provider"]) / max(elapsed, 1e-3)
                rss = "  ".join(
                    f"{p.name} {p.samples[-1].rss / MB:.0f}" for p in procs.values() if p.samples
                )
                print(
                    f"{elapsed:6.0f} s  ticks {now['provider']:>11,.0f} ({rate:,.0f}/s)  "
                    f"bars {now['aggregator']:>9,.0f}  rows {now['store']:>9,.0f}  "
                    f"RSS MB: {rss}",
                    flush=True,
                )
                next_report += 30.0
            await asyncio.sleep(min(args.sample_s, max(0.0, duration - elapsed)))
        elapsed = time.monotonic() - started
        for p in procs.values():
            p.cpu_end = read_cpu_s(p.pid)
        stop = await control_request(nc, "stop", {"job": "soak", "reason": "soak_done"})
        end = await totals(nc)
        # What was published must drain through every stage; a backlog means it fell behind.
        lag = await drain(nc, timeout=30.0)
        drained = await totals(nc)
    finally:
        if nc is not None:
            await nc.close()
        codes = sup.stop()
    return report(args, procs, elapsed, offered, first, end, drained, lag, codes, stop)


def report(
    args: argparse.Namespace,
    procs: dict[str, Process],
    elapsed: float,
    offered: float,
    first: dict[str, float],
    end: dict[str, float],
    drained: dict[str, float],
    lag: dict[str, tuple[int, int]],
    codes: dict[str, int],
    stop_reply: dict[str, object],
) -> int:
    """Print the figures and the verdict; return the exit code."""
    failed = False
    start_w = (args.warmup_s, args.warmup_s + WINDOW_S)
    end_w = (elapsed - WINDOW_S, elapsed)
    print()
    print(
        f"RSS in MB: first = {start_w[0]:.0f}-{start_w[1]:.0f} s, last = {end_w[0]:.0f}-"
        f"{end_w[1]:.0f} s after the provider started; peak = VmHWM at the window's end; "
        f"trend over {start_w[1]:.0f}-{elapsed:.0f} s; cpu = share of one core over the run"
    )
    header = (
        f"{'service':<12}{'first mean':>11}{'max':>8}{'peak':>8}  {'last mean':>9}{'max':>8}"
        f"{'peak':>8}  {'growth':>8}{'%':>7}{'MB/min':>8}{'cpu':>6}  verdict"
    )
    print(header)
    print("-" * len(header))
    for p in procs.values():
        a, b = window(p.samples, *start_w), window(p.samples, *end_w)
        if not a or not b:
            print(f"{p.name:<12}  no samples in a window (process gone?)")
            failed = failed or p.name != "nats-server"
            continue
        mean_a = statistics.fmean(s.rss for s in a) / MB
        mean_b = statistics.fmean(s.rss for s in b) / MB
        growth = mean_b - mean_a
        pct = 100 * growth / mean_a
        trend = slope_mb_per_min([s for s in p.samples if s.t >= start_w[1]])
        cpu = (
            f"{100 * (p.cpu_end - p.cpu_start) / elapsed:>5.0f}%"
            if p.cpu_start is not None and p.cpu_end is not None
            else "    ?"
        )
        if p.name == "nats-server":
            verdict = "info (holds the streams)"
        elif p.restarted:
            verdict, failed = "FAIL: restarted", True
        elif growth > args.max_growth_mb and pct > args.max_growth_pct:
            verdict, failed = "FAIL: grew", True
        else:
            verdict = "ok"
        print(
            f"{p.name:<12}{mean_a:>11.1f}{max(s.rss for s in a) / MB:>8.1f}"
            f"{a[-1].hwm / MB:>8.1f}  {mean_b:>9.1f}{max(s.rss for s in b) / MB:>8.1f}"
            f"{b[-1].hwm / MB:>8.1f}  {growth:>+8.1f}{pct:>+7.1f}{trend:>+8.2f}{cpu:>6}  {verdict}"
        )
    ticks = end["provider"] - first["provider"]
    achieved = ticks / elapsed
    print()
    print(
        f"ticks in {end['provider']:,.0f} ({achieved:,.0f}/s of {offered:,.0f}/s offered) | "
        f"routed {end['router']:,.0f} | bars out {drained['aggregator']:,.0f} | "
        f"rows stored {drained['store']:,.0f} | stop: {stop_reply.get('status')}"
    )
    behind = {k: v for k, v in lag.items() if v != (0, 0)}
    print(
        "consumers pending (undelivered, unacked) 30 s after the stop: "
        + (", ".join(f"{k} {v}" for k, v in sorted(behind.items())) if behind else "none")
    )
    if achieved < args.min_throughput * offered:
        print(f"FAIL: the provider published {achieved / offered:.0%} of the offered rate")
        failed = True
    if behind:
        print("FAIL: a consumer had not caught up 30 s after the stop")
        failed = True
    unclean = {name: code for name, code in codes.items() if code != 0}
    if unclean:
        print(f"FAIL: services exited uncleanly: {unclean}")
        failed = True
    print(
        f"verdict: {'FAIL' if failed else 'PASS'} (a service fails if its mean RSS grew by more "
        f"than {args.max_growth_mb:g} MB and {args.max_growth_pct:g}%)"
    )
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, run in a temporary (or the given) directory, clean up."""
    args = parse_args(argv)
    if args.data_dir is not None:
        args.data_dir.mkdir(parents=True, exist_ok=True)
        return asyncio.run(soak(args, args.data_dir))
    data_dir = Path(tempfile.mkdtemp(prefix="mdp-soak-"))
    try:
        return asyncio.run(soak(args, data_dir))
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
