"""Live load: the synthetic provider at N symbols x R ticks/s through the five services.

Starts a private nats-server and the five services (SQLite store in a temporary directory),
starts the synthetic provider for `--symbols` symbols at `--rate` ticks/s each, and listens to
`md.bars.1s.*` like any subscriber. For every first emission (`rev` 0) of a 1-second bar that
opens after the warm-up and closes before the job stops, the **tick-to-bar latency** is the
wall-clock time the bar arrived minus its end (the synthetic source stamps ticks with the wall
clock, so a bar can close no earlier than its end plus the grace). It prints delivered/expected
bars, latency p50/p99/max beside the grace (the floor: p99 <= grace + 100 ms is the target),
and per service its CPU (share of one core) and RSS at the start and the end of the run.

Not part of CI. Examples (2-core machine):

    PYTHONPATH=. .venv/bin/python benchmarks/live.py --symbols 50 --rate 200 --seconds 30
    PYTHONPATH=. .venv/bin/python benchmarks/live.py --symbols 1000 --rate 50 --seconds 300
    PYTHONPATH=. .venv/bin/python benchmarks/live.py --symbols 500 --rate 100 --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import nats
from nats.aio.msg import Msg

from benchmarks.soak import read_cpu_s, read_memory
from mdp.cli import control_request
from mdp.services.registry import SERVICES
from mdp.shared.config import local_policy
from mdp.shared.contract import names
from mdp.shared.contract.messages import Bar, TickBatch
from mdp.supervisor import Supervisor, scrape

MB = 1024 * 1024
SECOND = 1_000_000_000
TICKS = "mdp_provider_ticks_published_total"
# The services' own latency histograms (all intervals, both store modes): means over the run.
TICK_TO_BAR = ("aggregator", "mdp_aggregator_tick_to_bar_seconds")
PUBLISH_TO_STORE = ("store", "mdp_store_publish_to_store_seconds")


@dataclass
class Run:
    """What one run measured."""

    symbols: int
    rate: float
    seconds: float
    expected: int = 0
    delivered: int = 0
    ticks_per_s: float = 0.0  # what the provider published while measuring
    latencies_ms: list[float] = field(default_factory=list)
    quote_ms: list[float] = field(default_factory=list)  # newest tick of a batch to md.quotes
    cpu: dict[str, float] = field(default_factory=dict)  # share of one core
    rss_mb: dict[str, tuple[float, float]] = field(default_factory=dict)  # start, end
    exported_ms: dict[str, float] = field(default_factory=dict)  # the histograms' means
    rss_peak_mb: dict[str, float] = field(default_factory=dict)  # sampled every 10 s
    worst_by_second: dict[int, float] = field(default_factory=dict)  # bar start -> max latency
    rss_trace_mb: dict[str, list[float]] = field(default_factory=dict)  # every 10 s

    def percentile(self, q: float, of: list[float] | None = None) -> float:
        """The q-th percentile of a latency list in ms (the bars' by default; nan if empty)."""
        values = self.latencies_ms if of is None else of
        if not values:
            return float("nan")
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


async def run_once(
    symbols: int,
    rate: float,
    seconds: float,
    warmup: float,
    grace_ms: int,
    keep: bool = False,
    settings: dict[str, str] | None = None,
) -> Run:
    """One live run in a fresh directory (kept, with the services' logs, with `keep`)."""
    workdir = Path(tempfile.mkdtemp(prefix="mdp-live-"))
    env = {
        "MDP_LOG_LEVEL": "WARNING",
        "MDP_STREAM__RAW_MAX_AGE_S": "300",
        "MDP_STREAM__QUOTES_MAX_AGE_S": "300",
        **(settings or {}),
    }
    sup = Supervisor(data_dir=workdir, store_url=f"sqlite:///{workdir / 'bars.db'}", env=env)
    result = Run(symbols, rate, seconds)
    names_ = [f"L{i:04d}" for i in range(symbols)]
    first_seen: dict[tuple[str, int], float] = {}
    try:
        sup.start()
        await sup.wait_ready(60)
        assert sup.nats_url and sup.nats_server is not None and sup.nats_server.proc
        nc = await nats.connect(sup.nats_url)

        async def on_bar(msg: Msg) -> None:
            arrived = time.time_ns()
            bar = msgspec.json.decode(msg.data, type=Bar)
            if bar.rev == 0:
                first_seen.setdefault((bar.symbol, bar.start), (arrived - bar.end) / 1e6)

        await nc.subscribe(names.bars_of("1s"), cb=on_bar, pending_msgs_limit=10_000_000)
        measuring = False

        async def on_quotes(msg: Msg) -> None:
            arrived = time.time_ns()
            if measuring:
                batch = msgspec.json.decode(msg.data, type=TickBatch)
                result.quote_ms.append((arrived - batch.ticks[-1].ts) / 1e6)

        for symbol in names_[:: max(1, symbols // 20)]:  # a sample: the transit, not a load
            await nc.subscribe(names.quotes(symbol), cb=on_quotes)
        pids = {name: sup.children[name].proc.pid for name in SERVICES}  # type: ignore[union-attr]
        pids["nats-server"] = sup.nats_server.proc.pid
        reply = await control_request(
            nc, "start",
            {"provider": "synthetic", "job": "live", "symbols": names_, "params": {"rate": rate}},
        )  # fmt: skip
        if not reply.get("ok"):
            raise SystemExit(f"start refused: {reply.get('error')}")
        await asyncio.sleep(warmup)
        ticks0 = (await scrape(nc, "provider", [TICKS]))[TICKS]
        hist0 = {h: await histogram(nc, *h) for h in (TICK_TO_BAR, PUBLISH_TO_STORE)}
        cpu0 = {name: read_cpu_s(pid) or 0.0 for name, pid in pids.items()}
        rss0 = {name: (read_memory(pid) or (0, 0))[0] for name, pid in pids.items()}
        t0 = time.monotonic()
        measure_from = time.time_ns()
        measuring = True
        while (left := seconds - (time.monotonic() - t0)) > 0:
            await asyncio.sleep(min(10.0, left))
            for name, pid in pids.items():
                rss = (read_memory(pid) or (0, 0))[0] / MB
                result.rss_peak_mb[name] = max(result.rss_peak_mb.get(name, 0.0), rss)
                result.rss_trace_mb.setdefault(name, []).append(rss)
        measuring = False
        measure_to = time.time_ns()
        elapsed = time.monotonic() - t0
        cpu1 = {name: read_cpu_s(pid) or 0.0 for name, pid in pids.items()}
        rss1 = {name: (read_memory(pid) or (0, 0))[0] for name, pid in pids.items()}
        result.ticks_per_s = ((await scrape(nc, "provider", [TICKS]))[TICKS] - ticks0) / elapsed
        for h, (sum0, count0) in hist0.items():
            total, count = await histogram(nc, *h)
            if count > count0:
                result.exported_ms[h[1]] = (total - sum0) / (count - count0) * 1000
        # Bars that closed before the stop may still be on their way: wait for them.
        await asyncio.sleep(grace_ms / 1000 + 3.0)
        await control_request(nc, "stop", {"job": "live", "reason": "bench_done"})
        await nc.close()
        first_start = (measure_from // SECOND + 1) * SECOND
        last_end = measure_to // SECOND * SECOND
        starts = range(first_start, last_end, SECOND)
        result.expected = len(starts) * symbols
        wanted = set(starts)
        for (_, start), latency in first_seen.items():
            if start in wanted:
                result.delivered += 1
                result.latencies_ms.append(latency)
                worst = result.worst_by_second
                worst[start] = max(worst.get(start, 0.0), latency)
        result.cpu = {name: (cpu1[name] - cpu0[name]) / elapsed for name in pids}
        result.rss_mb = {name: (rss0[name] / MB, rss1[name] / MB) for name in pids}
    finally:
        sup.stop()
        if keep:
            print(f"logs and store kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return result


async def histogram(nc: nats.NATS, service: str, name: str) -> tuple[float, float]:
    """(sum, count) of a histogram the service exports, over all its labels."""
    got = await scrape(nc, service, [f"{name}_sum", f"{name}_count"])
    return got[f"{name}_sum"], got[f"{name}_count"]


def report(run: Run, grace_ms: int) -> str:
    """One run as text."""
    lines = [
        f"{run.symbols} symbols x {run.rate:g} ticks/s = {run.symbols * run.rate:,.0f} ticks/s "
        f"offered, {run.ticks_per_s:,.0f} published, for {run.seconds:g} s: "
        f"bars {run.delivered:,}/{run.expected:,} "
        f"({100 * run.delivered / max(run.expected, 1):.2f} %); tick-to-bar latency p50 "
        f"{run.percentile(50):.0f} ms, p99 {run.percentile(99):.0f} ms, max "
        f"{max(run.latencies_ms, default=float('nan')):.0f} ms (grace {grace_ms} ms: p99 - grace "
        f"= {run.percentile(99) - grace_ms:.0f} ms)",
        f"  tick to md.quotes (newest tick of a batch, sampled symbols): p50 "
        f"{run.percentile(50, run.quote_ms):.0f} ms, p99 {run.percentile(99, run.quote_ms):.0f} ms",
        "  as the services measure it (mean): "
        + "  ".join(f"{k} {v:.0f} ms" for k, v in run.exported_ms.items()),
        "  slowest seconds (bar start, second of the minute: max latency): "
        + "  ".join(
            f":{start // SECOND % 60:02d} {ms:.0f} ms"
            for start, ms in sorted(run.worst_by_second.items(), key=lambda kv: -kv[1])[:6]
        ),
        "  CPU (cores): " + "  ".join(f"{k} {v:.2f}" for k, v in run.cpu.items()),
        "  RSS MB start->end (peak): "
        + "  ".join(
            f"{k} {a:.0f}->{b:.0f} ({run.rss_peak_mb.get(k, b):.0f})"
            for k, (a, b) in run.rss_mb.items()
        ),
        *(
            f"  {name} RSS MB every 10 s: " + " ".join(f"{mb:.0f}" for mb in trace)
            for name, trace in run.rss_trace_mb.items()
        ),
    ]
    return "\n".join(lines)


def main() -> int:
    """Run the benchmark; exit 1 when a run missed bars or the latency target."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--symbols", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=50.0, help="ticks/s per symbol")
    parser.add_argument("--seconds", type=float, default=60.0, help="measured duration")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds before measuring")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="also print each run as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the run's directory and logs")
    parser.add_argument(
        "--set", action="append", default=[], metavar="MDP_X=VALUE",
        help="a setting for every service (repeatable), e.g. MDP_STREAM__RAW_MAX_AGE_S=60",
    )  # fmt: skip
    args = parser.parse_args()
    # The grace is the policy's (mdp/configs/ingestion_policy.yaml, bars.grace_ms), as the services
    # read it: the run reports against it.
    args.grace_ms = local_policy("aggregator").bars.grace_ms
    settings: dict[str, str] = {}
    for item in args.set:
        key, equals, value = item.partition("=")
        if not (key.startswith("MDP_") and equals):
            parser.error(f"--set {item!r}: expected MDP_<SETTING>=VALUE")
        settings[key] = value  # the last of a key given twice wins, as in a shell
    ok = True
    p99s = []
    for i in range(args.repeat):
        run = asyncio.run(
            run_once(
                args.symbols, args.rate, args.seconds, args.warmup, args.grace_ms, args.keep,
                settings,
            )
        )  # fmt: skip
        print(f"run {i + 1}/{args.repeat}: " + report(run, args.grace_ms), flush=True)
        if args.json:
            print(json.dumps({**run.__dict__, "latencies_ms": None, "quote_ms": None,
                              "worst_by_second": None, "rss_trace_mb": run.rss_trace_mb,
                              "p50": run.percentile(50),
                              "p99": run.percentile(99)}))  # fmt: skip
        p99s.append(run.percentile(99))
        ok &= run.delivered == run.expected and run.percentile(99) <= args.grace_ms + 100
    if args.repeat > 1:
        print(
            f"p99 over {args.repeat} runs: best {min(p99s):.0f} ms, median "
            f"{statistics.median(p99s):.0f} ms, worst {max(p99s):.0f} ms"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
