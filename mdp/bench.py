"""`mdp bench`: run the benchmark suite of a source checkout, each figure beside its baseline.

Every benchmark measures its baseline in the same run and prints the ratio itself; this runs
them one after the other with this interpreter, streams what they print, and ends with a table
of what ran, how long it took and whether it succeeded. The benchmarks live in the checkout
(`benchmarks/`), not in the installed package: they read the recorded days beside it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]
BENCHMARKS = CHECKOUT / "benchmarks"
SLICE = CHECKOUT / "tests" / "data" / "lean_equity_20131008_slice.ticks.csv.gz"
FULL_DAY = CHECKOUT.parent / "shared" / "data" / "ticks" / "lean_equity_20131008.ticks.csv.gz"


@dataclass(frozen=True)
class Benchmark:
    """One script of `benchmarks/` with the arguments of a full and of a quick run."""

    name: str
    script: str
    what: str
    full: tuple[str, ...]
    quick: tuple[str, ...]


def suite(day: Path) -> list[Benchmark]:
    """The benchmarks in the order they run (the cheapest first)."""
    return [
        Benchmark(
            "engine", "bars_core.py", "bar engine vs naive (and NautilusTrader if installed)",
            (str(day), "--repeat", "5"), (str(SLICE), "--repeat", "3"),
        ),
        Benchmark(
            "replay", "e2e.py", "replay end to end vs one raw NATS hop",
            ("--file", str(day), "--repeat", "3"), ("--file", str(SLICE), "--repeat", "2"),
        ),
        Benchmark(
            "postgres", "pg_copy.py", "PostgreSQL writer vs raw asyncpg COPY",
            ("--rows", "200000", "--repeat", "5"), ("--rows", "20000", "--repeat", "3"),
        ),
        Benchmark(
            "live", "live.py", "live synthetic load: delivered bars and tick-to-bar latency",
            ("--symbols", "1000", "--rate", "50", "--seconds", "300"),
            ("--symbols", "100", "--rate", "50", "--seconds", "20"),
        ),
    ]  # fmt: skip


def run(quick: bool, only: list[str] | None) -> int:
    """Run the suite (or the benchmarks named in `only`); 0 if every one succeeded."""
    if not BENCHMARKS.is_dir():
        print(
            "mdp: `mdp bench` runs the benchmarks of a source checkout "
            f"(no {BENCHMARKS}): git clone the project and run it there",
            file=sys.stderr,
        )
        return 2
    day = FULL_DAY if FULL_DAY.is_file() and not quick else SLICE
    chosen = [b for b in suite(day) if only is None or b.name in only]
    unknown = sorted(set(only or []) - {b.name for b in suite(day)})
    if unknown:
        names = ", ".join(b.name for b in suite(day))
        print(f"mdp: unknown benchmark {', '.join(unknown)} (one of {names})", file=sys.stderr)
        return 2
    env = {**os.environ, "PYTHONPATH": str(CHECKOUT)}
    results: list[tuple[Benchmark, int, float]] = []
    for bench in chosen:
        args = bench.quick if quick else bench.full
        command = [sys.executable, str(BENCHMARKS / bench.script), *args]
        print(f"\n=== {bench.name}: {bench.what}\n$ {' '.join(command)}", flush=True)
        started = time.monotonic()
        code = subprocess.run(command, cwd=CHECKOUT, env=env).returncode
        results.append((bench, code, time.monotonic() - started))
    print("\n=== summary")
    for bench, code, seconds in results:
        verdict = "ok" if code == 0 else f"failed (exit {code})"
        print(f"{bench.name:<10} {seconds:7.1f} s  {verdict}")
    return 0 if all(code == 0 for _, code, _ in results) else 1
