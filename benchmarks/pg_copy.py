"""PostgreSQL writes: the store's writer beside a raw asyncpg COPY of the same rows, same run.

The store's `PostgresBarWriter.write` validates each bar, keeps the latest revision of each key,
COPYs the batch into a staging table and upserts it into `bars` (revision-aware, in one
transaction). The baseline is the least any writer can do: `copy_records_to_table` of the same
rows into a plain table with the same columns and primary key, no validation, no upsert. Both
write the same batches (`--batch` bars, as the store commits one pulled group) into empty
tables; the figure is rows/s and the ratio writer/COPY, best and spread over `--repeat` runs.

Not part of CI. Needs a PostgreSQL (default the local one, trust auth, database `test`):

    PYTHONPATH=. .venv/bin/python benchmarks/pg_copy.py --rows 200000 --repeat 5
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

import asyncpg
from msgspec.structs import astuple

from mdp.services.store.writers import COLUMNS, PostgresBarWriter
from mdp.shared.contract.messages import Bar

S = 1_000_000_000
BASELINE = "mdp_bench_copy"


def bars(n: int) -> list[Bar]:
    """`n` distinct 1-second bars over 100 symbols."""
    out = []
    for i in range(n):
        symbol, k = f"B{i % 100:03d}", i // 100
        price = 100.0 + (i % 97) * 0.01
        out.append(
            Bar(symbol, "1s", k * S, (k + 1) * S, price, price + 0.05, price - 0.05,
                price + 0.01, 10.0 + i % 7, 3 + i % 5, price, "bench", 0)
        )  # fmt: skip
    return out


async def time_writer(url: str, batches: list[list[Bar]]) -> float:
    """Seconds the store's writer takes for every batch, into an empty `bars`."""
    writer = PostgresBarWriter(url)
    await writer.open()
    try:
        pool = writer._require_pool()  # the benchmark empties the table it measures
        async with pool.acquire() as conn:
            await conn.execute("TRUNCATE bars")
        started = time.perf_counter()
        for batch in batches:
            await writer.write(batch)
        return time.perf_counter() - started
    finally:
        await writer.close()


async def time_copy(url: str, batches: list[list[Bar]]) -> float:
    """Seconds a bare COPY of the same rows takes, one transaction per batch."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f"DROP TABLE IF EXISTS {BASELINE}")
        await conn.execute(
            f"CREATE TABLE {BASELINE} (LIKE bars INCLUDING DEFAULTS INCLUDING CONSTRAINTS"
            " INCLUDING INDEXES)"
        )
        rows = [[astuple(bar) for bar in batch] for batch in batches]
        started = time.perf_counter()
        for batch in rows:
            async with conn.transaction():
                await conn.copy_records_to_table(BASELINE, records=batch, columns=COLUMNS)
        elapsed = time.perf_counter() - started
        await conn.execute(f"DROP TABLE {BASELINE}")
        return elapsed
    finally:
        await conn.close()


async def main_async(args: argparse.Namespace) -> int:
    """Run both, interleaved, `repeat` times; print rows/s and the ratio."""
    data = bars(args.rows)
    batches = [data[i : i + args.batch] for i in range(0, len(data), args.batch)]
    await time_writer(args.url, batches[:1])  # creates the schema, warms the pool
    writer_rates, copy_rates, ratios = [], [], []
    for run in range(args.repeat):
        copy_s = await time_copy(args.url, batches)
        writer_s = await time_writer(args.url, batches)
        writer_rates.append(args.rows / writer_s)
        copy_rates.append(args.rows / copy_s)
        ratios.append(copy_s / writer_s)
        print(
            f"run {run + 1}: writer {args.rows / writer_s:,.0f} rows/s, raw COPY "
            f"{args.rows / copy_s:,.0f} rows/s, ratio {copy_s / writer_s:.2f}",
            flush=True,
        )
    print(
        f"{args.rows:,} bars in batches of {args.batch}: writer best {max(writer_rates):,.0f} "
        f"rows/s (median {statistics.median(writer_rates):,.0f}), raw COPY best "
        f"{max(copy_rates):,.0f} (median {statistics.median(copy_rates):,.0f}); ratio best "
        f"{max(ratios):.2f}, median {statistics.median(ratios):.2f}, worst {min(ratios):.2f}"
    )
    return 0


def main() -> int:
    """Parse the arguments and run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=5000, help="bars per write (the policy's)")
    parser.add_argument("--repeat", type=int, default=5)
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
