"""A live test adapter that asks the provider's pacer before every tick (loaded as module:Class).

Each tick is stamped with the instant its token was granted (`ts` and `recv`), so a test that
collects every tick from md.raw sees every grant of every process, and when it happened.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import ClassVar

from mdp.services.provider.adapters.base import TickSink, job_symbols
from mdp.shared.contract.control import JobSpec
from mdp.shared.contract.messages import Tick


class PacedAdapter:
    """One tick per granted token, round-robin over the job's symbols, until cancelled."""

    name: ClassVar[str] = "paced"
    live: ClassVar[bool] = True

    def __init__(self, job: JobSpec) -> None:
        self.job = job
        self.symbols = job_symbols(job)

    @property
    def clock_rate(self) -> float:
        """Live."""
        return 1.0

    async def run(self, sink: TickSink, resume_after: Mapping[str, int] | None = None) -> None:
        """Acquire a token, then publish a tick stamped with the grant time; forever."""
        seq = {s: (resume_after or {}).get(s, 0) for s in self.symbols}
        while True:
            for symbol in self.symbols:
                await sink.pacer.acquire()
                granted = time.time_ns()
                seq[symbol] += 1
                await sink.put(symbol, [Tick(granted, granted, seq[symbol], 100.0, 1.0)])
