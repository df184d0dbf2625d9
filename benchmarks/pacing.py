"""Measure the rate coordinator: the KV compare-and-swap round trip, and what pacers achieve.

    PYTHONPATH=. .venv/bin/python benchmarks/pacing.py [--rate 50] [--burst 10] [--seconds 5]
                                                       [--pacers 2]

Starts a private nats-server, then (1) times 500 read + compare-and-swap round trips of one
`RateRecord` on one connection, and (2) runs `--pacers` pacers, each on its own connection
(as separate provider processes would be), acquiring one token after another for `--seconds`
on one budget, and prints the grants per second of each and together against the budget,
the record writes per second (its revision) and the compare-and-swap conflicts.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import msgspec
import nats
from nats.js.api import KeyValueConfig

from mdp.services.provider.pacing import CONFLICTS, Pacer
from mdp.services.provider.ratelimit import Budget, PacingConfig, max_in_window
from mdp.shared.contract import names
from mdp.shared.natsserver import EmbeddedNats


async def cas_round_trips(url: str, count: int) -> list[float]:
    """Seconds per get + update of one record, sequentially."""
    nc = await nats.connect(url)
    kv = await nc.jetstream().key_value(names.KV_CHECKPOINTS)
    key = names.rate_key("bench-cas")
    budget = Budget(PacingConfig())
    revision = await kv.create(key, msgspec.json.encode(budget.to_record("bench-cas", 0)))
    times = []
    for _ in range(count):
        started = time.perf_counter()
        entry = await kv.get(key)
        revision = await kv.update(key, entry.value or b"", last=entry.revision)
        times.append(time.perf_counter() - started)
    assert revision == count + 1
    await nc.close()
    return times


async def draw(url: str, provider: str, config: PacingConfig, seconds: float) -> list[int]:
    """Acquire single tokens as fast as granted for `seconds` on its own connection."""
    nc = await nats.connect(url)
    kv = await nc.jetstream().key_value(names.KV_CHECKPOINTS)
    pacer = Pacer(provider, kv, config)
    granted = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await pacer.acquire()
        granted.append(time.time_ns())
    await nc.close()
    return granted


async def main(args: argparse.Namespace) -> None:
    """Run both measurements against a private server."""
    with tempfile.TemporaryDirectory() as tmp, EmbeddedNats(Path(tmp) / "nats") as server:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        await js.create_key_value(KeyValueConfig(bucket=names.KV_CHECKPOINTS, history=1))
        times = await cas_round_trips(server.url, 500)
        ms = sorted(t * 1000 for t in times)
        print(
            f"read + compare-and-swap: mean {statistics.mean(ms):.2f} ms, "
            f"p50 {ms[len(ms) // 2]:.2f} ms, p99 {ms[int(len(ms) * 0.99)]:.2f} ms"
        )
        provider = "bench"
        config = PacingConfig(messages_per_s=args.rate, message_burst=args.burst)
        kv = await js.key_value(names.KV_CHECKPOINTS)
        before = (await js.stream_info(f"KV_{names.KV_CHECKPOINTS}")).state.last_seq
        started = time.time_ns()
        grants = await asyncio.gather(
            *(draw(server.url, provider, config, args.seconds) for _ in range(args.pacers))
        )
        writes = (await kv.get(names.rate_key(provider))).revision - before  # this key's only
        conflicts = CONFLICTS.labels(provider)._value.get()
        every = sorted(t for times in grants for t in times)
        span_s = (every[-1] - started) / 1e9
        # The bucket starts full: beyond the burst, the rate is what the run can have.
        steady = (len(every) - args.burst) / span_s
        print(
            f"{args.pacers} pacers, {args.rate}/s burst {args.burst}, {span_s:.2f} s: granted "
            f"{[len(g) for g in grants]} = {len(every)}, {steady:.1f}/s after the burst "
            f"({100 * steady / args.rate:.1f}% of the rate); busiest 1 s window "
            f"{max_in_window(every, 1_000_000_000)} (bucket bound {args.burst + args.rate:.0f}); "
            f"{writes / span_s:.1f} record writes/s, {conflicts / span_s:.1f} conflicts/s"
        )
        await nc.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=50)
    parser.add_argument("--burst", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--pacers", type=int, default=2)
    asyncio.run(main(parser.parse_args()))
