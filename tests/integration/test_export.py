"""`mdp bars export` and `mdp.client.read_bars` against real stores (SQLite, PostgreSQL)."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mdp.client import read_bars_async
from mdp.export import CSV_COLUMNS, NOTHING_MATCHED, iso_utc, parse_time
from mdp.services.store.writers import CSV_HEADER, open_writer, read_bars
from mdp.shared.contract.messages import Bar

pytestmark = pytest.mark.integration

T0 = parse_time("2024-08-08T09:00Z")
S = 1_000_000_000


def sample_bars() -> list[Bar]:
    """Two symbols, two intervals, a revised bar and a bar without volume (vwap None)."""
    bars = []
    for symbol in ("AAPL", "BRK.B"):
        for i in range(120):
            price = 100.0 + i / 7
            vwap = None if i == 5 else price + 0.01
            volume = 0.0 if i == 5 else 1.5 * i
            start = T0 + i * S
            bars.append(
                Bar(symbol, "1s", start, start + S, price, price + 1, price - 1, price + 0.1,
                    volume, i, vwap, "synthetic", 1 if i == 7 else 0)
            )  # fmt: skip
        for m in range(2):
            start = T0 + m * 60 * S
            bars.append(
                Bar(symbol, "1m", start, start + 60 * S, 100.0, 120.0, 99.0, 110.0, 9.0, 60,
                    105.0, "synthetic")
            )  # fmt: skip
    return bars


async def fill(url: str, bars: list[Bar]) -> None:
    writer = open_writer(url)
    await writer.open()
    try:
        for i in range(0, len(bars), 20_000):
            await writer.write(bars[i : i + 20_000])
    finally:
        await writer.close()


@pytest.fixture(params=["sqlite_url", "postgres_url"])
def store_url(request: pytest.FixtureRequest) -> str:
    """An empty store of each back end (PostgreSQL skipped when unreachable)."""
    url: str = request.getfixturevalue(request.param)
    return url


@pytest.fixture
async def store(store_url: str) -> str:
    """`store_url` holding `sample_bars()`."""
    await fill(store_url, sample_bars())
    return store_url


def mdp(*args: str, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MDP_")}
    return subprocess.run(
        [sys.executable, "-m", "mdp.cli", *args], cwd=cwd, env=clean, capture_output=True,
        timeout=120,
    )  # fmt: skip


def from_csv_row(row: dict[str, str]) -> Bar:
    return Bar(
        row["symbol"], row["interval"], int(row["bar_start_ns"]), int(row["bar_end_ns"]),
        float(row["open"]), float(row["high"]), float(row["low"]), float(row["close"]),
        float(row["volume"]), int(row["trade_count"]),
        float(row["vwap"]) if row["vwap"] else None, row["provider"], int(row["rev"]),
    )  # fmt: skip


async def test_every_format_round_trips_the_stored_bars(store: str, tmp_path: Path) -> None:
    stored = await read_bars(store)
    assert len(stored) == 244

    out = mdp("bars", "export", "--store", store, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    text = out.stdout.decode()
    header = text.splitlines()[0].split(",")
    assert tuple(header[: len(CSV_HEADER)]) == CSV_HEADER  # the old columns, first
    assert tuple(header) == CSV_COLUMNS
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [from_csv_row(r) for r in rows] == stored
    assert all(r["start_utc"] == iso_utc(int(r["bar_start_ns"])) for r in rows)
    assert rows[0]["start_utc"] == "2024-08-08T09:00:00Z"

    out = mdp("bars", "export", "--store", store, "--format", "jsonl", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.decode().splitlines()]
    fields = Bar.__struct_fields__
    assert [Bar(*(line[f] for f in fields)) for line in lines] == stored
    assert lines[0]["start_utc"] == "2024-08-08T09:00:00Z"
    assert lines[0]["interval"] == "1m" and lines[0]["end_utc"] == "2024-08-08T09:01:00Z"

    import pyarrow.parquet as pq

    path = tmp_path / "bars.parquet"
    out = mdp("bars", "export", "--store", store, "--format", "parquet", "--out", str(path),
              cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert b"244 bars written" in out.stderr
    table = pq.read_table(path)
    assert table.column_names == list(CSV_COLUMNS)
    assert str(table.schema.field("start_utc").type) == "timestamp[ns, tz=UTC]"
    got = [
        Bar(r["symbol"], r["interval"], r["bar_start_ns"], r["bar_end_ns"], r["open"],
            r["high"], r["low"], r["close"], r["volume"], r["trade_count"], r["vwap"],
            r["provider"], r["rev"])
        for r in table.to_pylist()
    ]  # fmt: skip
    assert got == stored
    first = table.slice(0, 1).to_pylist()[0]["start_utc"]
    assert first.isoformat() == "2024-08-08T09:00:00+00:00"


async def test_time_range_symbol_and_interval_filter(store: str, tmp_path: Path) -> None:
    args = ("bars", "export", "--store", store, "--format", "jsonl", "--symbol", "BRK.B",
            "--interval", "1s", "--from", "2024-08-08T09:00:10Z",
            "--to", "2024-08-08T09:00:20Z")  # fmt: skip
    out = mdp(*args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.decode().splitlines()]
    assert [(x["symbol"], x["interval"]) for x in lines] == [("BRK.B", "1s")] * 10
    assert [x["start"] for x in lines] == [T0 + i * S for i in range(10, 20)]  # [from, to)
    frame = await read_bars_async(store, "BRK.B", "1s", "2024-08-08T09:00:10Z", T0 + 20 * S)
    assert list(frame["bar_start_ns"]) == [x["start"] for x in lines]
    assert str(frame["start_utc"].dtype) == "datetime64[ns, UTC]"
    assert frame["start_utc"].iloc[0].isoformat() == "2024-08-08T09:00:10+00:00"
    everything = await read_bars_async(store)
    assert len(everything) == 244 and everything["vwap"].isna().sum() == 2


async def test_an_unknown_symbol_or_an_empty_range_says_so_and_exits_4(
    store: str, tmp_path: Path
) -> None:
    out = mdp("bars", "export", "--store", store, "--symbol", "NOPE", cwd=tmp_path)
    assert out.returncode == NOTHING_MATCHED == 4
    assert out.stdout == b""
    assert b"no bars of symbol 'NOPE'" in out.stderr
    path = tmp_path / "none.csv"
    out = mdp("bars", "export", "--store", store, "--symbol", "AAPL", "--from", "2030-01-01",
              "--out", str(path), cwd=tmp_path)  # fmt: skip
    assert out.returncode == 4
    assert b"no bars match --symbol AAPL --from 2030-01-01" in out.stderr
    assert not path.exists()  # nothing matched, nothing written
    bad = mdp("bars", "export", "--store", store, "--from", "yesterday", cwd=tmp_path)
    assert bad.returncode == 2 and b"--from: 'yesterday'" in bad.stderr


# The child's own high-water mark (VmHWM): ru_maxrss would include the pytest process it was
# forked from, since Linux carries that over exec.
_MEASURED = """
import atexit, sys
from mdp.cli import main
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            print("VmHWM", int(line.split()[1]), file=sys.stderr)
atexit.register(hwm)
sys.argv[0] = "mdp"
main(sys.argv[1:])
"""


def peak_rss_mb(*args: str, cwd: Path) -> tuple[float, float]:
    """Run `mdp ARGS`; its peak RSS in MB and its wall time in s."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MDP_")}
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", _MEASURED, *args], cwd=cwd, env=clean,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=120,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    kb = next(int(line.split()[1]) for line in result.stderr.splitlines() if "VmHWM" in line)
    return kb / 1024, seconds


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
async def test_export_streams_in_constant_memory(fmt: str, tmp_path: Path) -> None:
    big, small = f"sqlite:///{tmp_path / 'big.db'}", f"sqlite:///{tmp_path / 'small.db'}"
    bars = [
        Bar(f"S{i % 50}", "1s", T0 + (i // 50) * S, T0 + (i // 50 + 1) * S, 1.0 + i, 2.0 + i,
            0.5 + i, 1.5 + i, 10.0, 3, 1.2 + i, "synthetic")
        for i in range(200_000)
    ]  # fmt: skip
    await fill(big, bars)
    await fill(small, bars[:2_000])
    out = ["--format", fmt, "--out", str(tmp_path / f"out.{fmt}")]
    base, _ = peak_rss_mb("bars", "export", "--store", small, *out, cwd=tmp_path)
    peak, seconds = peak_rss_mb("bars", "export", "--store", big, *out, cwd=tmp_path)
    print(f"{fmt}: 200k rows in {seconds:.2f} s, peak RSS {peak:.0f} MB (2k rows: {base:.0f} MB)")
    # Loading 200k Bars at once costs > 60 MB; streamed, the two runs differ by a few MB.
    assert peak - base < 20, (peak, base)


async def test_the_reader_yields_chunks_before_the_query_is_exhausted(store: str) -> None:
    """A cursor / fetchmany, not one fetch of everything: chunks arrive one by one."""
    from mdp.services.store.writers import stream_bars

    sizes = []
    async for chunk in stream_bars(store, chunk=50):
        sizes.append(len(chunk))
    assert sizes == [50, 50, 50, 50, 44]
    gen = stream_bars(store, symbol="AAPL", chunk=10)
    first = await anext(gen)  # the rest is still in the database
    await gen.aclose()  # and leaving early releases the cursor and connection
    assert len(first) == 10 and first[0].symbol == "AAPL"


def test_a_missing_optional_dependency_is_one_clear_line(tmp_path: Path) -> None:
    """Without pyarrow / matplotlib (shadowed by packages that fail to import)."""
    shadow = tmp_path / "shadow"
    for module in ("pyarrow", "matplotlib"):
        (shadow / module).mkdir(parents=True)
        (shadow / module / "__init__.py").write_text(f"raise ImportError('no {module} here')\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MDP_")}
    env["PYTHONPATH"] = f"{shadow}{os.pathsep}{env.get('PYTHONPATH', '')}"
    store = f"sqlite:///{tmp_path / 'none.db'}"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "mdp.cli", *args, "--store", store], cwd=tmp_path, env=env,
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    parquet = run("bars", "export", "--format", "parquet", "--out", str(tmp_path / "x.parquet"))
    assert parquet.returncode == 1
    assert parquet.stderr.strip() == (
        "mdp: pyarrow is not installed: pip install 'mdp[parquet]' (or pip install pyarrow)"
    )
    png = run("chart", "AAPL", "--out", str(tmp_path / "x.png"))
    assert png.returncode == 1 and "pip install 'mdp[chart]'" in png.stderr, png.stderr
    assert "--out FILE.html, which needs nothing" in png.stderr and "Traceback" not in png.stderr
