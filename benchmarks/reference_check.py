"""Replay the full recorded datasets through the running services and count mismatching bars.

    PYTHONPATH=. python benchmarks/reference_check.py [--data DIR] [--speed max|N] [STEM ...]

Starts a private nats-server and the five services (SQLite store in a temporary directory),
replays each `<stem>.ticks.csv.gz` of `../shared/data/ticks/` in turn, reads the stored bars and
compares them with `<stem>.bars_1s.csv` and `<stem>.bars_1m.csv` (exact prices, volumes and
counts; VWAP to 1e-9 relative; missing and extra bars count too). Prints the number of
mismatching bars per file and interval, the aggregator's late and dead-lettered ticks, and exits
1 if any bar mismatches. Run on demand, not in CI (about a minute on two cores).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nats
from nats.js.errors import NotFoundError

from mdp.cli import replay_file
from mdp.services.store.writers import read_bars
from mdp.supervisor import Supervisor, scrape
from tests.reference import compare_bars, load_reference

DATA = Path(__file__).resolve().parents[2] / "shared/data/ticks"
STEMS = ("lean_equity_20131008", "binance_20240808_09")
INTERVALS = ("1s", "1m")


async def dead_letters(nc: nats.NATS, subject: str) -> int:
    """How many messages `subject` holds in the MD_DLQ stream."""
    js = nc.jetstream()
    try:
        info = await js.stream_info("MD_DLQ", subjects_filter=subject)
    except NotFoundError:  # nothing was ever dead-lettered
        return 0
    return sum((info.state.subjects or {}).values())


async def check(data: Path, stems: list[str], speed: str) -> list[dict[str, Any]]:
    """Replay every file, then compare the store with the references; one row per interval."""
    workdir = Path(tempfile.mkdtemp(prefix="mdp-refcheck-"))
    store_url = f"sqlite:///{workdir / 'bars.db'}"
    # No NATS URL: the supervisor runs its own server beside the services, as `mdp up` does.
    roots = os.path.abspath(data)  # noqa: ASYNC240 (no I/O)
    env = {"MDP_LOG_LEVEL": "WARNING", "MDP_REPLAY__ROOTS": roots}
    sup = Supervisor(data_dir=workdir, store_url=store_url, env=env)
    rows: list[dict[str, Any]] = []
    try:
        sup.start()
        url = sup.start_nats()  # the URL of the server it started
        await sup.wait_ready(60)
        nc = await nats.connect(url)
        replays = {}
        for stem in stems:
            started = time.perf_counter()
            outcome = await replay_file(nc, data / f"{stem}.ticks.csv.gz", speed, timeout=1800)
            replays[stem] = (outcome["ticks"], time.perf_counter() - started)
        late = await scrape(nc, "aggregator", ["mdp_aggregator_late_ticks_total"])
        letters = await dead_letters(nc, "md.dlq.aggregator")
        await nc.close()
        stored = await read_bars(store_url)
    finally:
        sup.stop()

    for stem in stems:
        ticks, seconds = replays[stem]
        for interval in INTERVALS:
            reference = load_reference(data / f"{stem}.bars_{interval}.csv", interval)
            symbols = {symbol for symbol, _, _ in reference}
            # both files share one store: compare each with the bars of its own symbols
            mine = [b for b in stored if b.symbol in symbols and b.interval == interval]
            problems = compare_bars(mine, reference, interval)
            rows.append(
                {
                    "file": stem,
                    "interval": interval,
                    "ticks": ticks,
                    "replay_s": round(seconds, 2),
                    "reference_bars": len(reference),
                    "stored_bars": len(mine),
                    "revised_bars": sum(1 for b in mine if b.rev > 0),
                    "mismatching_bars": len(problems),
                    "first_problems": problems[:5],
                }
            )
    for row in rows:
        row["mdp_aggregator_late_ticks_total"] = late["mdp_aggregator_late_ticks_total"]
        row["aggregator_dead_letters"] = letters
    return rows


def main() -> None:
    """Parse arguments, run, print the table and the JSON, exit 1 on any mismatch."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stems", nargs="*", default=list(STEMS), help="file stems to replay")
    parser.add_argument("--data", type=Path, default=DATA, help="directory of the datasets")
    parser.add_argument("--speed", default="max", help="'max' (default) or a pace factor")
    args = parser.parse_args()
    missing = [s for s in args.stems if not (args.data / f"{s}.ticks.csv.gz").is_file()]
    if missing:
        sys.exit(f"not found in {args.data}: {', '.join(missing)}")
    rows = asyncio.run(check(args.data, args.stems, args.speed))
    print(json.dumps(rows, indent=2))
    print(
        f"{'file':<24} {'interval':<8} {'ticks':>9} {'bars':>7} {'revised':>7} {'mismatching':>11}"
    )
    for r in rows:
        print(
            f"{r['file']:<24} {r['interval']:<8} {r['ticks']:>9,} {r['reference_bars']:>7,} "
            f"{r['revised_bars']:>7,} {r['mismatching_bars']:>11,}"
        )
    print(
        f"late ticks: {rows[0]['mdp_aggregator_late_ticks_total']:.0f}, "
        f"aggregator dead letters: {rows[0]['aggregator_dead_letters']}"
    )
    total = sum(r["mismatching_bars"] for r in rows)
    print(f"mismatching bars: {total}")
    sys.exit(1 if total else 0)


if __name__ == "__main__":
    main()
