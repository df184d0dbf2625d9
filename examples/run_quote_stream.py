"""Start the synthetic provider for two symbols, print a few quote batches and the status, stop.

Usage: python examples/run_quote_stream.py [NATS_URL]   (default: $MDP_NATS_URL or localhost)
Needs a running system, e.g. `mdp up` in another terminal.
"""

from __future__ import annotations

import asyncio
import os
import sys

from mdp.client import PipelineRuntime

SYMBOLS = ["AAPL", "BRK.B"]
JOB = "example"
BATCHES = 5


async def main(url: str) -> int:
    """Run the example against the system at `url`; return the exit code."""
    async with PipelineRuntime(url) as rt:
        started = await rt.start("synthetic", symbols=SYMBOLS, params={"rate": 50}, job=JOB)
        print(f"started job {started.job.job} (run {started.job.run}) for {started.job.symbols}")
        try:
            seen = 0
            async with asyncio.timeout(30):
                async for batch in rt.stream_quotes(SYMBOLS):
                    last = batch.ticks[-1]
                    print(f"{batch.symbol:8} {len(batch.ticks):4} ticks, last {last.price:.4f}")
                    seen += 1
                    if seen >= BATCHES:
                        break
            status = await rt.status()
            for job in status.jobs:
                print(f"status: job {job.job} {job.state} ({job.provider}, {job.symbols})")
        finally:
            stopped = await rt.stop(JOB, reason="example_done")
            print(f"stop: {stopped.status}")
    return 0


if __name__ == "__main__":
    nats_url = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("MDP_NATS_URL", "")
    sys.exit(asyncio.run(main(nats_url or "nats://127.0.0.1:4222")))
