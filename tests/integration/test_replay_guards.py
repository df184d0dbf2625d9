"""Replay input at its limits, through the five real services (issue 11, findings 4 and 7).

A 50 MB line among the rows of a real slice is one bad row: every other bar equals the
reference, the row is dead-lettered on `md.dlq.provider` with its line, and a live job running
beside it never stops. A start whose path resolves outside `MDP_REPLAY__ROOTS` is refused as
`path_not_allowed` without being opened, and no error ever echoes what a file holds.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import DeliverPolicy

from mdp.cli import CliError, replay_file
from mdp.services.provider.adapters.replay import MAX_LINE_BYTES
from mdp.services.store.writers import read_bars
from mdp.shared.contract import names
from mdp.shared.contract.messages import BadRow, Bar
from tests.conftest import DATA, PipelineFactory, wait_for
from tests.reference import compare_bars, load_reference

pytestmark = pytest.mark.integration

STEM = "lean_equity_20131008_slice"
SLICE_SYMBOLS = {"SPY", "AIG", "BAC", "IBM", "BRK.B"}
LONG_AT = 10_001  # the line number of the 50 MB line (the header is line 1)


def slice_with_a_long_line(path: Path) -> int:
    """The slice uncompressed, a 50 MB line (one huge symbol field) at line `LONG_AT`; its rows."""
    lines = gzip.decompress((DATA / f"{STEM}.ticks.csv.gz").read_bytes()).split(b"\n")
    with path.open("wb") as out:
        out.write(b"\n".join(lines[: LONG_AT - 1]) + b"\n")
        out.write(b"1381239000012000000,x," + b"S" * (50 * 1024 * 1024) + b",13.83,2000,P,0,0\n")
        out.write(b"\n".join(lines[LONG_AT - 1 :]))
    return sum(1 for line in lines[1:] if line)


async def request(nc: NATS, verb: str, body: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """A control request's reply and its micro error code header ('' on success)."""
    msg = await nc.request(f"ingest.control.{verb}", msgspec.json.encode(body), timeout=10)
    return msgspec.json.decode(msg.data), (msg.headers or {}).get("Nats-Service-Error-Code", "")


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """The one replay root of the test's system."""
    root = tmp_path / "data"
    root.mkdir()
    return root


async def test_a_50_mb_line_is_one_bad_row_and_no_job_stops(
    pipeline: PipelineFactory, nc: NATS, tmp_path: Path, data: Path
) -> None:
    path = data / "long.csv"
    rows = slice_with_a_long_line(path)
    store_url = f"sqlite:///{tmp_path / 'bars.db'}"
    sup = pipeline(store_url=store_url, env={"MDP_REPLAY__ROOTS": str(data)})
    await sup.wait_ready()
    pids = {n: c.proc.pid for n, c in sup.children.items() if c.proc}
    js = nc.jetstream()
    live_bars: list[Bar] = []
    dead: list[Any] = []

    async def on_bar(msg: Any) -> None:
        live_bars.append(msgspec.json.decode(msg.data, type=Bar))

    async def on_dead(msg: Any) -> None:
        dead.append(msg)

    await nc.subscribe("md.bars.1s.LIVE", cb=on_bar)
    await js.subscribe(
        names.dlq("provider"), cb=on_dead, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    live = {"provider": "synthetic", "symbols": ["LIVE"], "job": "live", "params": {"rate": 20}}
    reply, _ = await request(nc, "start", live)
    assert reply["ok"], reply
    await wait_for(lambda: len(live_bars) >= 2, 30, "the live job's first bars")

    result = await replay_file(nc, path, "max", timeout=120)

    # Every good row is replayed and every bar equals the reference: the line cost itself alone.
    assert result["ticks"] == rows, result
    bars = [b for b in await read_bars(store_url) if b.symbol in SLICE_SYMBOLS]
    for interval in ("1s", "1m"):
        reference = load_reference(DATA / f"{STEM}.bars_{interval}.csv")
        problems = compare_bars([b for b in bars if b.interval == interval], reference, interval)
        assert not problems, f"{interval}: {len(problems)} problems, e.g. {problems[:5]}"
    # The long line is reported once, with its number and what was wrong, not its content.
    await wait_for(lambda: dead, 20, "the bad row's dead letter")
    assert len(dead) == 1, [m.headers for m in dead]
    row = msgspec.json.decode(dead[0].data, type=BadRow)
    assert (row.job, row.line) == (result["job"], LONG_AT)
    reason = dead[0].headers[names.DLQ_REASON]
    assert reason == f"the line is longer than {MAX_LINE_BYTES} bytes (the row limit)"

    # The live job never stopped: its bars go on after the replay, and status says running.
    marker = len(live_bars)
    await wait_for(lambda: len(live_bars) >= marker + 2, 30, "the live job's bars to go on")
    status, _ = await request(nc, "status", {})
    assert {j["job"]: j["state"] for j in status["jobs"]}["live"] == "running"
    reply, _ = await request(nc, "stop", {"job": "live"})
    assert reply["status"] == "stopped"
    assert pids == {n: c.proc.pid for n, c in sup.children.items() if c.proc}, "a restart"


async def test_replay_paths_are_confined_and_file_contents_never_echoed(
    pipeline: PipelineFactory, nc: NATS, tmp_path: Path, data: Path
) -> None:
    outside = tmp_path / "outside.csv"
    outside.write_text("ts_ns,symbol,price,size\n1,A,1,1\n")
    (data / "link.csv").symlink_to(outside)
    shadow = data / "shadow"  # inside the roots, but no CSV: its content must stay unsaid
    shadow.write_text("root:$6$s3cr3tsalt$hash:19000:0:99999:7:::\n")
    sup = pipeline(env={"MDP_REPLAY__ROOTS": str(data)})
    await sup.wait_ready()
    for path, resolved in (
        ("/etc/shadow", None),
        (str(data / "link.csv"), str(outside)),
        (str(data / ".." / "outside.csv"), str(outside)),
    ):
        body = {"provider": "replay", "job": "escape", "params": {"path": path}}
        reply, status = await request(nc, "start", body)
        assert reply["ok"] is False and reply["error"]["code"] == "path_not_allowed", reply
        assert status == "403"
        message = reply["error"]["message"]
        assert repr(path) in message and str(data) in message, message
        if resolved is not None:
            assert f"resolves to {resolved!r}" in message, message
    # The HTTP facade refuses the same way.
    state = await nc.jetstream().key_value(names.KV_STATE)
    base = msgspec.json.decode((await state.get(names.HTTP_CONTROL_KEY)).value)["url"]
    async with aiohttp.ClientSession() as http:
        body = {"provider": "replay", "job": "escape", "params": {"path": "/etc/passwd"}}
        async with http.post(f"{base}/runtime/ingest/start", json=body) as resp:
            assert resp.status == 403
            assert (await resp.json())["error"]["code"] == "path_not_allowed"
    status_reply, _ = await request(nc, "status", {})
    assert status_reply["jobs"] == []  # nothing was started

    # A file inside the roots that is no CSV fails its job without a word of its content.
    with pytest.raises(CliError) as failed:
        await replay_file(nc, shadow, "max", timeout=30)
    error = str(failed.value)
    assert "line 1 (the header, 1 column) has no column 'ts_ns'" in error, error
    for secret in ("s3cr3tsalt", "19000", "99999"):
        assert secret not in error, error
