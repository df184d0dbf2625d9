"""End-to-end throughput: a full-speed replay through the running services into SQLite.

Reports ticks/s from the start request until the store has committed every bar, and, measured
in the same run on the same server, the ceiling: one nats-py publisher to one subscriber moving
the same batched TickBatch payloads (core NATS, no processing). Run:

    python benchmarks/e2e.py [--file PATH] [--repeat N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import nats

from mdp.cli import replay_file
from mdp.services.store.writers import read_bars
from mdp.shared.contract import names
from mdp.shared.contract.codec import encode
from mdp.shared.contract.messages import Tick, TickBatch
from mdp.shared.settings import ProviderSettings
from mdp.supervisor import Supervisor
from tests.reference import load_ticks

DEFAULT_FILE = (
    Path(__file__).resolve().parents[2] / "shared/data/ticks/lean_equity_20131008.ticks.csv.gz"
)


def batched_payloads(path: Path, batch: int) -> tuple[list[tuple[str, bytes]], int]:
    """The file as the provider publishes it: per-symbol TickBatch JSON of `batch` ticks."""
    buffers: dict[str, list[Tick]] = defaultdict(list)
    out: list[tuple[str, bytes]] = []
    ticks = 0
    for symbol, tick in load_ticks(path):
        ticks += 1
        buf = buffers[symbol]
        buf.append(tick)
        if len(buf) == batch:
            out.append((names.raw("replay", symbol), encode(TickBatch(symbol, "replay", buf))))
            buffers[symbol] = []
    for symbol, buf in buffers.items():
        if buf:
            out.append((names.raw("replay", symbol), encode(TickBatch(symbol, "replay", buf))))
    return out, ticks


async def ceiling(url: str, payloads: list[tuple[str, bytes]], ticks: int) -> float:
    """Ticks/s of one publisher to one subscriber moving the payloads over core NATS."""
    pub = await nats.connect(url, pending_size=256 * 1024 * 1024)
    sub_nc = await nats.connect(url)
    done = asyncio.Event()
    received = 0

    async def on_msg(msg: object) -> None:
        nonlocal received
        received += 1
        if received == len(payloads):
            done.set()

    await sub_nc.subscribe("bench.>", cb=on_msg, pending_msgs_limit=1_000_000)
    await sub_nc.flush()
    started = time.perf_counter()
    for subject, data in payloads:
        await pub.publish("bench." + subject, data)
    await pub.flush()
    await asyncio.wait_for(done.wait(), timeout=120)
    elapsed = time.perf_counter() - started
    await pub.close()
    await sub_nc.close()
    return ticks / elapsed


async def run(path: Path, repeat: int) -> dict[str, object]:
    """Measure both figures against one private server."""
    workdir = Path(tempfile.mkdtemp(prefix="mdp-bench-"))
    store_url = f"sqlite:///{workdir / 'bench.db'}"
    # No NATS URL: the supervisor runs its own server beside the services, as `mdp up` does.
    roots = os.path.dirname(os.path.abspath(path))  # noqa: ASYNC240 (no I/O)
    env = {"MDP_LOG_LEVEL": "WARNING", "MDP_REPLAY__ROOTS": roots}
    sup = Supervisor(data_dir=workdir, store_url=store_url, env=env)
    results: dict[str, object] = {"file": str(path)}
    try:
        sup.start()
        url = sup.start_nats()  # the URL of the server it started
        await sup.wait_ready(60)
        nc = await nats.connect(url)
        e2e_rates = []
        for _ in range(repeat):
            outcome = await replay_file(nc, path, "max", timeout=900)
            e2e_rates.append(outcome["ticks"] / outcome["seconds"])
            results["ticks"] = outcome["ticks"]
        await nc.close()
        results["bars_stored"] = len(await read_bars(store_url))
        payloads, ticks = batched_payloads(path, ProviderSettings().batch_max_ticks)
        ceilings = [await ceiling(url, payloads, ticks) for _ in range(repeat)]
    finally:
        sup.stop()
    best_e2e, best_ceiling = max(e2e_rates), max(ceilings)
    results.update(
        e2e_ticks_per_s=round(best_e2e),
        ceiling_ticks_per_s=round(best_ceiling),
        ratio=round(best_e2e / best_ceiling, 3),
        e2e_runs=[round(r) for r in e2e_rates],
        ceiling_runs=[round(r) for r in ceilings],
    )
    return results


def main() -> None:
    """Parse arguments, run, print a summary and the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", type=Path, default=DEFAULT_FILE)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if not args.file.is_file():
        sys.exit(f"{args.file}: not found (the full files live in ../shared/data/ticks/)")
    results = asyncio.run(run(args.file, args.repeat))
    print(
        f"end to end: {results['e2e_ticks_per_s']:,} ticks/s | ceiling (1 pub -> 1 sub, same "
        f"payloads): {results['ceiling_ticks_per_s']:,} ticks/s | ratio {results['ratio']}"
    )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
