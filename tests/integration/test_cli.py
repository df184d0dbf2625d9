"""The `mdp` command as a user runs it: real processes, real server, real store."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mdp.services.store.writers import read_bars
from mdp.shared.natsserver import EmbeddedNats
from tests.conftest import DATA, PipelineFactory

pytestmark = pytest.mark.integration


def mdp(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120):
    """Run `mdp ARGS` with a clean MDP_* environment."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MDP_")}
    clean.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "mdp.cli", *args],
        cwd=cwd,
        env=clean,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


async def test_up_with_duration_exits_zero_and_leaves_bars_in_sqlite(tmp_path: Path) -> None:
    result = mdp("up", "--duration", "6", "--symbols", "AAPL,BRK.B", cwd=tmp_path, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stopped cleanly" in result.stderr
    assert "ticks in" in result.stdout
    bars = await read_bars(f"sqlite:///{tmp_path / 'var' / 'mdp.db'}")
    assert {bar.symbol for bar in bars} == {"AAPL", "BRK.B"}
    assert {bar.interval for bar in bars} >= {"1s"}
    assert all(bar.provider == "synthetic" and bar.trade_count > 0 for bar in bars)


def test_replay_embedded_then_export_prints_the_reference_csv(tmp_path: Path) -> None:
    result = mdp("replay", str(DATA / "binance_20240808_09_slice.ticks.csv.gz"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "every bar is stored" in result.stdout
    exported = mdp(
        "bars", "export", "--symbol", "BTCUSD_PERP.BINANCE", "--interval", "1m",
        "--store", f"sqlite:///{tmp_path / 'var' / 'mdp.db'}", cwd=tmp_path,
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    lines = exported.stdout.splitlines()
    assert lines[0].startswith(  # the old columns first; bar_end_ns, start_utc, ... follow
        "symbol,interval,bar_start_ns,open,high,low,close,volume,trade_count,vwap,"
    )
    reference = (DATA / "binance_20240808_09_slice.bars_1m.csv").read_text().splitlines()
    expected = [r for r in reference[1:] if r.startswith("BTCUSD_PERP.BINANCE,")]
    assert len(lines) - 1 == len(expected) > 0
    for got, want in zip(lines[1:], expected, strict=True):
        g, w = got.split(","), want.split(",")
        assert g[2] == w[2] and g[8] == w[8]  # start and trade count
        assert [float(x) for x in g[3:8]] == [float(x) for x in w[3:8]]


def test_ingest_commands_print_replies_and_fail_on_errors(
    pipeline: PipelineFactory, nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    import asyncio

    asyncio.run(pipeline(services=("control",)).wait_ready())
    env = {"MDP_NATS_URL": nats_server.url}
    bad = mdp("ingest", "start", "--provider", "nope", "--symbols", "AAPL", cwd=tmp_path, env=env)
    assert bad.returncode == 1
    assert json.loads(bad.stdout)["error"]["code"] == "unknown_provider"
    assert "unknown_provider" in bad.stderr

    started = mdp(
        "ingest", "start", "--provider", "synthetic", "--symbols", "AAPL,MSFT", "--job", "j1",
        cwd=tmp_path, env=env,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    assert json.loads(started.stdout)["job"]["symbols"] == ["AAPL", "MSFT"]
    again = mdp("ingest", "start", "--provider", "synthetic", "--symbols", "AAPL", "--job", "j1",
                cwd=tmp_path, env=env)  # fmt: skip
    assert json.loads(again.stdout)["error"]["code"] == "already_running"

    status = mdp("ingest", "status", cwd=tmp_path, env=env)
    assert [job["job"] for job in json.loads(status.stdout)["jobs"]] == ["j1"]

    stopped = mdp("ingest", "stop", "--job", "j1", cwd=tmp_path, env=env)
    assert json.loads(stopped.stdout)["status"] == "stopped"
    idle = mdp("ingest", "stop", "--job", "j1", cwd=tmp_path, env=env)
    assert json.loads(idle.stdout) == {"ok": True, "status": "idle", "job": "j1"}


def test_bad_arguments_get_clear_errors(tmp_path: Path) -> None:
    missing = mdp("replay", str(tmp_path / "nope.csv"), cwd=tmp_path)
    assert missing.returncode == 1 and "no such file" in missing.stderr
    speed = mdp("replay", str(DATA / "binance_20240808_09_slice.ticks.csv.gz"), "--speed", "fast",
                cwd=tmp_path)  # fmt: skip
    assert speed.returncode == 1 and "--speed 'fast'" in speed.stderr
    no_nats = mdp("ingest", "status", cwd=tmp_path)
    assert no_nats.returncode == 1 and "MDP_NATS_URL" in no_nats.stderr


def test_an_unreachable_nats_server_fails_in_seconds_with_a_clear_message(
    tmp_path: Path,
) -> None:
    result = mdp("ingest", "status", "--nats", "nats://127.0.0.1:1", cwd=tmp_path, timeout=30)
    assert result.returncode == 1
    assert "cannot connect to NATS at nats://127.0.0.1:1" in result.stderr


def test_replay_reports_rejected_rows_and_exits_3(tmp_path: Path) -> None:
    import gzip

    rows = gzip.decompress((DATA / "lean_equity_20131008_slice.ticks.csv.gz").read_bytes())
    lines = rows.decode().splitlines()[:3001]
    # Line 101 has a NaN price, line 2001 a negative size (the header is line 1).
    lines[100] = lines[100].split(",")[0] + ",2013-10-08T13:30:00Z,BAC,NaN,100,P,0,0"
    lines[2000] = lines[2000].split(",")[0] + ",2013-10-08T13:30:00Z,SPY,167.4,-5,P,0,0"
    path = tmp_path / "some_bad.csv"
    path.write_text("\n".join(lines) + "\n")
    result = mdp("replay", str(path), cwd=tmp_path)
    assert result.returncode == 3, result.stderr[-2000:]
    assert "replayed 2,998 ticks" in result.stdout
    assert "2 row(s) rejected (lines 101, 2001)" in result.stderr
    assert "md.dlq.provider" in result.stderr
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    refused = mdp("replay", str(empty), cwd=tmp_path)
    assert refused.returncode == 1 and "the file is empty" in refused.stderr


def test_export_of_a_store_that_does_not_exist_is_an_error(tmp_path: Path) -> None:
    result = mdp("bars", "export", "--store", f"sqlite:///{tmp_path / 'none.db'}", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""
    assert "no store at" in result.stderr
    assert not (tmp_path / "none.db").exists()  # looking did not create it


def test_bench_runs_the_named_benchmarks_with_their_baselines(tmp_path: Path) -> None:
    result = mdp("bench", "--quick", "--only", "engine", cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "=== engine: bar engine vs naive" in out
    assert "naive and engine agree bar for bar: True" in out
    assert re.search(r"^naive .* engine \d+\.\d+x faster$", out, flags=re.M), out
    assert re.search(r"^engine\s+\d+\.\d s\s+ok$", out, flags=re.M), out  # the summary
    unknown = mdp("bench", "--only", "kernel", cwd=tmp_path)
    assert unknown.returncode == 2 and "unknown benchmark kernel" in unknown.stderr
