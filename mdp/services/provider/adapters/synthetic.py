"""The `synthetic` adapter: a deterministic, live-paced random walk of trades and quotes.

Each symbol has its own `random.Random` seeded from `(seed, symbol)`, so a symbol's path depends
only on the seed and the params, never on which other symbols run alongside it, and the sequence
of (seq, price, size, bid, ask, bid_size, ask_size) is identical across runs; only the wall-clock
times `ts`/`recv` differ. Ticks are generated in small wall-clock steps against a fixed origin,
so the rate holds over time without drift (fractions of a tick carry over to the next step).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ClassVar

from pydantic import Field

from mdp.services.provider.adapters.base import (
    AdapterError,
    AdapterParams,
    TickSink,
    check_params,
    job_symbols,
)
from mdp.shared.contract.control import JobSpec
from mdp.shared.contract.messages import Tick

DEFAULT_RATE = 100.0
DEFAULT_SEED = 1
DEFAULT_START_PRICE = 100.0
MIN_START_PRICE = 0.02
"""Two cents: a bid of at least one cent always fits below the price."""
MAX_RATE = 1_000_000.0
"""Ticks per second per symbol; more than this is a typo, not a load test."""

STEP_S = 0.025
"""Wall-clock seconds between generation steps (one `put` per symbol per step)."""

MAX_CATCH_UP_S = 1.0
"""When the sink held us back longer than this, the missed ticks are skipped, not burst out."""

FAST_FORWARD_LIMIT = 1_000_000
"""Resuming at most this many ticks into a path replays the path exactly; beyond, it restarts."""

# The walk is a mean-reverting log price: about 0.1 % volatility per square-root second and a one
# hour pull back to the start price, so prices look alive but stay near `start_price` (a few %)
# however long it runs, and whatever the rate (per-tick parameters scale with it).
_VOL_PER_SQRT_S = 0.001
_REVERSION_S = 3600.0
# Clock differences are floats: 0.025 s may come back as 0.02499999..., which must still count as
# a whole step (and its 25 ticks at 1000/s), not one tick fewer now and one more next time.
_EPSILON = 1e-6


class _Walk:
    """One symbol's generator state: its RNG and log price."""

    __slots__ = ("kappa", "log_mid", "log_start", "rng", "sigma")

    def __init__(self, seed: int, symbol: str, start_price: float, rate: float) -> None:
        # A str seed is hashed with SHA-512 by `random`: stable across processes and versions,
        # unlike hash(), and independent for every (seed, symbol) pair.
        self.rng = random.Random(f"mdp-synthetic:{seed}:{symbol}")
        self.log_start = math.log(start_price)
        self.log_mid = self.log_start
        self.sigma = _VOL_PER_SQRT_S / math.sqrt(rate)
        self.kappa = 1.0 / (_REVERSION_S * rate)

    def skip(self, count: int) -> None:
        """Advance the path by `count` ticks without building them (exact resume)."""
        rng, sigma, kappa, anchor = self.rng, self.sigma, self.kappa, self.log_start
        gauss, bits = rng.gauss, rng.getrandbits
        x = self.log_mid
        for _ in range(count):
            x += kappa * (anchor - x) + sigma * gauss(0.0, 1.0)
            bits(32)
        self.log_mid = x

    def ticks(self, first_seq: int, stamps: list[int]) -> list[Tick]:
        """One tick per timestamp in `stamps`, numbered from `first_seq`."""
        rng, sigma, kappa, anchor = self.rng, self.sigma, self.kappa, self.log_start
        gauss, bits, exp = rng.gauss, rng.getrandbits, math.exp
        x = self.log_mid
        out: list[Tick] = []
        append = out.append
        seq = first_seq
        for ts in stamps:
            x += kappa * (anchor - x) + sigma * gauss(0.0, 1.0)
            # Integer cents keep bid < price < ask exact; 2 cents is the floor so a bid of at
            # least one cent always fits below the price.
            cents = max(2, round(exp(x) * 100.0))
            r = bits(32)  # one draw feeds every discrete choice of the tick
            bid = max(1, cents - 1 - (r & 1))
            ask = cents + 1 + ((r >> 1) & 1)
            # 7 in 8 trades are a round lot of 100..800 shares, the others an odd lot of 1..64.
            size = 100 * (1 + ((r >> 5) & 7)) if r & 0x1C else 1 + ((r >> 5) & 63)
            bid_size = 100 * (1 + ((r >> 11) & 31))
            ask_size = 100 * (1 + ((r >> 16) & 31))
            append(Tick(ts, ts, seq, cents / 100, size, bid / 100, ask / 100, bid_size, ask_size))
            seq += 1
        self.log_mid = x
        return out


class SyntheticAdapter:
    """Live random-walk trades with quotes for `job.symbols` at `rate` ticks/s per symbol."""

    name: ClassVar[str] = "synthetic"
    live: ClassVar[bool] = True  # a failure is retried with backoff, not the end of the job

    class Params(AdapterParams):
        """A job's `params`, and `synthetic.params` of data_providers.yaml (None: the default)."""

        rate: float | None = Field(
            DEFAULT_RATE, gt=0, le=MAX_RATE, allow_inf_nan=False, description="ticks/s per symbol"
        )
        seed: int | None = DEFAULT_SEED
        start_price: float | None = Field(None, ge=MIN_START_PRICE, allow_inf_nan=False)
        max_ticks: int | None = Field(None, ge=1, description="per symbol, then end of stream")

    def __init__(
        self,
        job: JobSpec,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_ns: Callable[[], int] = time.time_ns,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        step_s: float = STEP_S,
    ) -> None:
        params = check_params(self.name, self.Params, job.params)
        self.symbols = job_symbols(job)
        if not self.symbols:
            raise AdapterError("synthetic: job.symbols is empty; name at least one symbol")
        self.rate = DEFAULT_RATE if params.rate is None else params.rate
        self.seed = DEFAULT_SEED if params.seed is None else params.seed
        self.start_price = DEFAULT_START_PRICE if params.start_price is None else params.start_price
        self.max_ticks = params.max_ticks
        self._clock = clock
        self._wall_ns = wall_ns
        self._sleep = sleep
        self._step_s = step_s
        self.ticks_per_symbol: dict[str, int] = {}
        """The last `seq` generated per symbol."""
        self.skipped_ticks = 0
        """Ticks per symbol not generated because the sink held the generator back too long."""

    @property
    def clock_rate(self) -> float:
        """Live data: one event-time second per wall second."""
        return 1.0

    async def run(self, sink: TickSink, resume_after: Mapping[str, int] | None = None) -> None:
        """Generate until cancelled, or until `max_ticks` per symbol and then end_of_stream."""
        resume = resume_after or {}
        limit = self.max_ticks
        walks: dict[str, _Walk] = {}
        seqs: dict[str, int] = {}  # the last seq generated per symbol
        for symbol in self.symbols:
            walks[symbol], seqs[symbol] = await self._walk(symbol, max(0, resume.get(symbol, 0)))
        self.ticks_per_symbol = seqs
        rate, step = self.rate, self._step_s
        max_debt = max(1, int(rate * MAX_CATCH_UP_S))
        origin = self._clock()
        last_ts = self._wall_ns()
        made = 0  # ticks per symbol generated since `origin`, after skips
        while True:
            if limit is not None and all(seq >= limit for seq in seqs.values()):
                await sink.end_of_stream(list(walks), dict(seqs))
                return
            now = self._clock()
            # Measure against the origin, not the previous step: rounding and late wake-ups
            # never accumulate into drift, and fractional ticks carry over by themselves.
            due = int((now - origin) * rate + _EPSILON) - made
            if due > max_debt:
                self.skipped_ticks += due - max_debt
                made += due - max_debt
                due = max_debt
            if due > 0:
                made += due
                wall = max(self._wall_ns(), last_ts)  # wall clocks may step back; ts must not
                stamps = _spread(last_ts, wall, due)
                last_ts = wall
                for symbol, walk in walks.items():
                    count = due if limit is None else min(due, limit - seqs[symbol])
                    if count <= 0:
                        continue
                    ticks = walk.ticks(seqs[symbol] + 1, stamps[:count] if count < due else stamps)
                    seqs[symbol] += count
                    await sink.put(symbol, ticks)
                if limit is not None and all(seq >= limit for seq in seqs.values()):
                    continue  # finished: end the stream now, not one step later
            # Wake at the next step boundary of the origin's grid (again: no drift).
            elapsed = self._clock() - origin
            next_step = (math.floor(elapsed / step + _EPSILON) + 1) * step
            await self._sleep(max(0.0, next_step - elapsed))

    async def _walk(self, symbol: str, resume: int) -> tuple[_Walk, int]:
        """A symbol's generator, positioned just after `resume` ticks."""
        walk = _Walk(self.seed, symbol, self.start_price, self.rate)
        if resume <= FAST_FORWARD_LIMIT:
            done = 0
            while done < resume:
                batch = min(100_000, resume - done)
                walk.skip(batch)
                done += batch
                await asyncio.sleep(0)  # a long fast-forward must not stall the event loop
        else:
            # Too far in to replay the path cheaply: a fresh path, deterministic for this resume
            # point, whose numbering continues where the last run stopped.
            walk = _Walk(self.seed, f"{symbol}@{resume}", self.start_price, self.rate)
        return walk, resume


def _spread(after: int, until: int, count: int) -> list[int]:
    """`count` non-decreasing times in `(after, until]`, the last one `until`."""
    span = until - after
    return [after + span * i // count for i in range(1, count + 1)]
