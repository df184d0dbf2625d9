"""`mdp tail`, `mdp dlq`, `mdp top` and `mdp chart` as a user runs them, against a real pipeline."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
from nats.aio.client import Client as NATS

from mdp.cli import control_request
from mdp.services.store.writers import read_bars
from mdp.shared.bus.deadletter import dead_letter_payload
from mdp.shared.bus.publisher import JsPublisher
from mdp.shared.contract import names
from mdp.shared.contract.codec import JSON
from mdp.shared.contract.messages import Bar, BarBatch
from mdp.shared.natsserver import EmbeddedNats
from tests.conftest import PipelineFactory, wait_for
from tests.integration.test_cli import mdp

pytestmark = pytest.mark.integration


def popen_mdp(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    """`mdp ARGS` in the background (stdout and stderr piped)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MDP_")}
    clean.update(env)
    return subprocess.Popen(
        [sys.executable, "-m", "mdp.cli", *args], cwd=cwd, env=clean, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


async def test_tail_prints_quotes_bars_and_events_and_stops_on_sigterm(
    pipeline: PipelineFactory, nc: NATS, nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    await pipeline().wait_ready()
    env = {"MDP_NATS_URL": nats_server.url}
    events = popen_mdp("tail", "events", cwd=tmp_path, env=env)
    await asyncio.sleep(1.5)  # the tail subscribes before the job starts
    reply = await control_request(
        nc, "start", {"provider": "synthetic", "symbols": ["AAPL", "BRK.B"], "params": {"rate": 50}}
    )
    assert reply["ok"], reply

    quotes = mdp("tail", "quotes", "BRK.B", "--json", "--count", "5", cwd=tmp_path, env=env)
    assert quotes.returncode == 0, quotes.stderr
    ticks = [json.loads(line) for line in quotes.stdout.splitlines()]
    assert len(ticks) == 5
    assert {t["symbol"] for t in ticks} == {"BRK.B"} and {t["provider"] for t in ticks} == {
        "synthetic"
    }
    assert all(t["price"] > 0 and t["ts"] > 0 for t in ticks)

    bars = mdp("tail", "bars", "AAPL", "--count", "2", cwd=tmp_path, env=env, timeout=60)
    assert bars.returncode == 0, bars.stderr
    lines = bars.stdout.splitlines()
    assert len(lines) == 2 and all(" AAPL " in line and " O " in line for line in lines)
    human = mdp("tail", "quotes", "--count", "3", cwd=tmp_path, env=env)
    assert len(human.stdout.splitlines()) == 3 and "synthetic #" in human.stdout

    events.send_signal(signal.SIGTERM)
    out, err = events.communicate(timeout=20)
    assert events.returncode == 128 + signal.SIGTERM, err
    assert "started" in out and "job=default" in out and "provider=synthetic" in out


def sample_batch() -> BarBatch:
    start = 1_723_107_600_000_000_000
    bars = [
        Bar("DLQ", "1m", start + i * 60 * 10**9, start + (i + 1) * 60 * 10**9, 10.0, 11.0, 9.0,
            10.5, 3.0, 4, 10.2, "synthetic")
        for i in range(3)
    ]  # fmt: skip
    return BarBatch("dlq-test-batch", bars)


async def test_dlq_lists_shows_and_redrives_what_was_fixed_upstream(
    pipeline: PipelineFactory, nc: NATS, nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    store_url = f"sqlite:///{tmp_path / 'bars.db'}"
    await pipeline(store_url=store_url).wait_ready()
    js = nc.jetstream()
    # A real one: the router dead-letters a raw message that is not a TickBatch.
    await js.publish(names.raw("synthetic", "ZZZ"), b"not a tick batch")
    # One the store would write when its database refused a batch: whole, with its reason.
    publisher = JsPublisher(nc)
    await publisher.start()
    batch = sample_batch()
    await dead_letter_payload(
        publisher, "store", names.STORE_SYNC_BUS, msgspec.json.encode(batch),
        {names.CONTENT_TYPE: JSON}, "StoreError: database down (simulated)", "store",
        "dlq:store:store.sync.bus:77",
    )  # fmt: skip
    await publisher.flush()

    async def two_letters() -> bool:
        return (await js.stream_info(names.STREAM_DLQ)).state.messages >= 2

    await wait_for(two_letters, what="two dead letters")
    env = {"MDP_NATS_URL": nats_server.url}
    listed = mdp("dlq", "list", "--json", cwd=tmp_path, env=env)
    assert listed.returncode == 0, listed.stderr
    letters = {x["service"]: x for x in map(json.loads, listed.stdout.splitlines())}
    assert set(letters) == {"router", "store"}
    router, store = letters["router"], letters["store"]
    assert router["reason"].startswith("undecodable")
    assert router["subject"] == "md.raw.synthetic.ZZZ"
    assert router["body"] == "bytes" and router["redrive"]
    assert store["body"] == "BarBatch" and store["redrive"] == ""
    assert store["reason"] == "StoreError: database down (simulated)"

    human = mdp("dlq", "list", cwd=tmp_path, env=env)
    assert "SEQ" in human.stdout and "[not redrivable]" in human.stdout
    assert "2 dead letter(s)" in human.stderr

    shown = mdp("dlq", "show", str(store["seq"]), cwd=tmp_path, env=env)
    assert shown.returncode == 0, shown.stderr
    assert "Mdp-Dlq-Reason: StoreError: database down" in shown.stdout
    assert "body (BarBatch)" in shown.stdout and '"symbol": "DLQ"' in shown.stdout

    refused = mdp("dlq", "redrive", str(router["seq"]), cwd=tmp_path, env=env)
    assert refused.returncode == 1 and "not re-driven" in refused.stderr
    dry = mdp("dlq", "redrive", "--reason", "database down", "--dry-run", cwd=tmp_path, env=env)
    assert dry.returncode == 0 and "would re-drive" in dry.stdout
    assert not await read_bars(store_url, symbol="DLQ")

    redriven = mdp("dlq", "redrive", "--reason", "database down", cwd=tmp_path, env=env)
    assert redriven.returncode == 0, redriven.stderr
    assert f"re-drove {store['seq']} to store.sync.bus" in redriven.stdout

    async def stored() -> bool:
        return await read_bars(store_url, symbol="DLQ") == batch.bars

    await wait_for(stored, what="the re-driven bars in the store")
    after = mdp("dlq", "list", "--json", cwd=tmp_path, env=env)
    assert [json.loads(x)["service"] for x in after.stdout.splitlines()] == ["router"]
    missing = mdp("dlq", "show", "99999", cwd=tmp_path, env=env)
    assert missing.returncode == 1 and "no dead letter 99999" in missing.stderr


def top_rows(tmp_path: Path, env: dict[str, str], data_dir: Path) -> dict[str, dict[str, object]]:
    result = mdp("top", "--once", "--json", "--interval", "1.5", "--data-dir", str(data_dir),
                 cwd=tmp_path, env=env, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return {row["service"]: row for row in json.loads(result.stdout)}


async def test_top_shows_rates_lag_latency_restarts_and_flags_a_stalled_stage(
    pipeline: PipelineFactory, nc: NATS, nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    sup = pipeline()
    await sup.wait_ready()
    reply = await control_request(
        nc, "start", {"provider": "synthetic", "symbols": ["AAPL", "MSFT"], "params": {"rate": 100}}
    )
    assert reply["ok"], reply
    await asyncio.sleep(3)
    env = {"MDP_NATS_URL": nats_server.url}
    rows = top_rows(tmp_path, env, sup.data_dir)
    assert all(row["up"] for row in rows.values()), rows
    assert rows["provider"]["rate_out"] > 100  # ~200 ticks/s
    assert rows["router"]["rate_in"] > 0 and rows["router"]["rate_out"] > 100
    assert rows["aggregator"]["rate_out"] > 0  # bars
    latency = rows["aggregator"]["latency_ms"]
    assert latency is not None and 0 < latency < 5_000, rows["aggregator"]
    assert {row["restarts"] for row in rows.values()} == {0}
    assert not any(row["stalled"] for row in rows.values())

    human = mdp("top", "--once", "--interval", "1", cwd=tmp_path, env=env)
    assert human.returncode == 0, human.stderr
    assert human.stdout.splitlines()[0].split()[:3] == ["SERVICE", "STATE", "IN"]
    assert "aggregator up" in " ".join(human.stdout.split())
    live = popen_mdp("top", "--interval", "0.5", cwd=tmp_path, env=env)
    assert live.stdout is not None
    assert live.stdout.readline().startswith("SERVICE")  # refreshing until a signal
    live.send_signal(signal.SIGTERM)
    live.communicate(timeout=20)
    assert live.returncode == 128 + signal.SIGTERM

    # A store that stops taking its input: bars wait on STORE_SYNC, nothing is written.
    store = sup.children["store"].proc
    assert store is not None
    store.send_signal(signal.SIGSTOP)
    try:
        await asyncio.sleep(1.5)
        stalled = mdp("top", "--once", "--interval", "2", cwd=tmp_path, env=env, timeout=60)
        assert "warning: store is stalled" in stalled.stdout, stalled.stdout
        assert " STALL " in stalled.stdout
    finally:
        store.send_signal(signal.SIGCONT)

    # A router that died and was restarted by its supervisor: counted from its log.
    router = sup.children["router"].proc
    assert router is not None
    router.kill()
    router.wait()

    async def restarted() -> bool:
        sup.check()
        proc = sup.children["router"].proc
        return proc is not router and proc is not None and proc.poll() is None

    await wait_for(restarted, what="the router restarted")
    await sup.wait_ready()
    rows = top_rows(tmp_path, env, sup.data_dir)
    assert rows["router"]["restarts"] == 1 and rows["store"]["restarts"] == 0
    assert not rows["store"]["stalled"]


async def test_chart_draws_one_candle_per_stored_bar_with_gaps(
    pipeline: PipelineFactory, nc: NATS, tmp_path: Path
) -> None:
    from mdp.chart import gaps
    from mdp.cli import replay_file
    from tests.conftest import DATA

    store_url = f"sqlite:///{tmp_path / 'bars.db'}"
    await pipeline(store_url=store_url).wait_ready()
    await replay_file(nc, DATA / "lean_equity_20131008_slice.ticks.csv.gz", "max", timeout=120)
    stored = await read_bars(store_url, symbol="SPY", interval="1m")
    assert len(stored) > 5
    page = tmp_path / "spy.html"
    out = mdp("chart", "SPY", "--interval", "1m", "--store", store_url, "--out", str(page),
              cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr
    text = page.read_text()
    assert text.count('<g class="candle"') == len(stored)
    starts = [int(x.split('"')[0]) for x in text.split('data-start="')[1:]]
    assert starts == [bar.start for bar in stored]
    assert text.count('<rect class="gap"') == len(gaps(stored))
    assert "<script" not in text and "http" not in text.replace("http://www.w3.org/2000/svg", "")

    png = tmp_path / "spy.png"
    out = mdp("chart", "SPY", "--store", store_url, "--out", str(png), "--from",
              "2013-10-08T13:30Z", "--to", "2013-10-08T13:40Z", cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5_000
    none = mdp("chart", "NOPE", "--store", store_url, "--out", str(tmp_path / "x.html"),
               cwd=tmp_path)  # fmt: skip
    assert none.returncode == 4 and "no 1m bars of 'NOPE'" in none.stderr
