"""Live test adapters, loaded as module:Class: one whose feed drops twice, then keeps
delivering; one that files in a directory switch on and off (failing, silent, pacing)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from mdp.services.provider.adapters.base import TickSink
from mdp.shared.contract.control import JobSpec
from mdp.shared.contract.messages import Tick


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


class SwitchAdapter:
    """A live feed that files in `params.dir` control, read on every step.

    `fail` present: a start fails at once (ConnectionRefusedError), a running feed drops
    (ConnectionResetError). `silent` present: the feed stays up but delivers nothing.
    `pacing` present: the adapter reports one pacing error through the sink and removes it.
    Each start appends its time (ns) to `starts`, so a test sees every attempt made.
    """

    name: ClassVar[str] = "switch"
    live: ClassVar[bool] = True

    def __init__(self, job: JobSpec) -> None:
        self.job = job
        self.dir = Path(str(job.params["dir"]))

    @property
    def clock_rate(self) -> float:
        """Live."""
        return 1.0

    async def run(self, sink: Any, resume_after: Mapping[str, int] | None = None) -> None:
        """Deliver one tick per symbol every 50 ms while the switches allow."""
        with (self.dir / "starts").open("a") as starts:
            starts.write(f"{time.time_ns()}\n")
        if (self.dir / "fail").exists():
            raise ConnectionRefusedError("gateway refused the connection")
        seq = {s: (resume_after or {}).get(s, 0) for s in self.job.symbols}
        while True:
            if (self.dir / "fail").exists():
                raise ConnectionResetError("feed dropped")
            pacing = self.dir / "pacing"
            if pacing.exists():
                pacing.unlink()
                await sink.failure("pacing")  # JobSink.failure: the pacing error hook
            if not (self.dir / "silent").exists():
                for symbol in self.job.symbols:
                    seq[symbol] += 1
                    now = time.time_ns()
                    await sink.put(symbol, [Tick(now, now, seq[symbol], 100.0, 1.0)])
            await asyncio.sleep(0.05)


class QuietSwitchAdapter(SwitchAdapter):
    """The same switches under another provider name (so its own breaker)."""

    name: ClassVar[str] = "quiet"
