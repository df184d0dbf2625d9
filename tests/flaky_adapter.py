"""A live test adapter whose feed drops twice, then keeps delivering (loaded as module:Class)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import ClassVar

from services.provider.adapters.base import TickSink
from shared.contract.control import JobSpec
from shared.contract.messages import Tick


class FlakyAdapter:
    """Three ticks per symbol, then `RuntimeError("feed dropped")`, twice; then ticks forever."""

    name: ClassVar[str] = "flaky"
    live: ClassVar[bool] = True
    failures_left: ClassVar[int] = 2  # per process: each retry builds a new instance

    def __init__(self, job: JobSpec) -> None:
        self.job = job

    @property
    def clock_rate(self) -> float:
        """Live."""
        return 1.0

    async def run(self, sink: TickSink, resume_after: Mapping[str, int] | None = None) -> None:
        """Deliver, fail while failures are left, else deliver until cancelled."""
        seq = {s: (resume_after or {}).get(s, 0) for s in self.job.symbols}
        sent = 0
        while True:
            for symbol in self.job.symbols:
                seq[symbol] += 1
                now = time.time_ns()
                await sink.put(symbol, [Tick(now, now, seq[symbol], 100.0, 1.0)])
            sent += 1
            if sent == 3 and FlakyAdapter.failures_left > 0:
                FlakyAdapter.failures_left -= 1
                raise RuntimeError("feed dropped")
            await asyncio.sleep(0.05)
