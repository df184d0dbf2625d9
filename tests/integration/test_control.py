"""The control service over real NATS and HTTP, with real provider and control processes."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
import yaml

from tests.conftest import wait_for
from tests.conftest_control import (  # noqa: F401 (fixtures)
    REPO,
    System,
    control_system_fixture,
    module_nats_fixture,
)

pytestmark = pytest.mark.integration

POLICY = "ingestion_policy.yaml"
PROVIDERS = "data_providers.yaml"
SHIPPED_POLICY = (REPO / "mdp" / "configs" / POLICY).read_text()
SHIPPED_PROVIDERS = (REPO / "mdp" / "configs" / PROVIDERS).read_text()
TOKEN = {"Authorization": "Bearer s3cret"}


def policy(**sections: dict[str, Any]) -> str:
    """The shipped policy with some keys of its sections changed."""
    data = yaml.safe_load(SHIPPED_POLICY)
    for name, values in sections.items():
        data[name].update(values)
    return str(yaml.safe_dump(data))


async def reload_with(system: System, policy_text: str = SHIPPED_POLICY) -> dict[str, Any]:
    """Write the policy file and reload it; return the reply."""
    system.write_config(POLICY, policy_text)
    return await system.ok("reload", {})


async def events(system: System, into: list[tuple[str, dict[str, Any]]]) -> Any:
    async def on_event(msg: Any) -> None:
        into.append((msg.subject.rsplit(".", 1)[-1], msgspec.json.decode(msg.data)))

    return await system.nc.subscribe("ingest.events.*", cb=on_event)


async def job_state(system: System, job: str) -> str | None:
    status = await system.ok("status")
    for view in status["jobs"]:
        if view["job"] == job:
            return str(view["state"])
    return None


async def test_every_error_code_through_nats(control_system: System) -> None:
    system = control_system
    system.write_config(
        PROVIDERS, SHIPPED_PROVIDERS.replace("symbols: [AAPL, MSFT, BRK.B, BTC/USD]", "symbols: []")
    )
    await system.ok("reload", {})
    try:
        cases: list[tuple[bytes | dict[str, Any], str]] = [
            (b"{not json", "invalid_request"),
            ({"provider": ["x"]}, "invalid_request"),
            ({"provider": 5, "symbols": {"a": 1}}, "invalid_request"),
            ({"provider": "synthetic", "symbols": "AAPL"}, "invalid_request"),
            (
                {"provider": "synthetic", "symbols": ["AAPL"], "params": {"rate": "x"}},
                "invalid_request",
            ),
            ({"provider": "polygon", "symbols": ["AAPL"]}, "unknown_provider"),
            ({"provider": "ibkr", "symbols": ["AAPL"]}, "provider_disabled"),
            ({"provider": "synthetic"}, "symbols_empty"),
            ({"provider": "synthetic", "symbols": ["AAPL", "BAD\u0000SYM"]}, "symbol_invalid"),
            (b'{"provider": "synthetic", "symbols": ["\\ud800"]}', "symbol_invalid"),
        ]
        statuses = {
            "invalid_request": "400",
            "unknown_provider": "404",
            "provider_disabled": "409",
            "symbols_empty": "400",
            "symbol_invalid": "400",
        }
        for body, code in cases:
            reply = await system.request("start", body)
            assert reply.code == code, (body, reply.body)
            assert reply.headers["Nats-Service-Error-Code"] == statuses[code]
            assert reply.headers["Nats-Service-Error"].startswith(f"{code}: ")
            assert reply.body["error"]["message"]

        await system.ok("start", {"provider": "synthetic", "symbols": ["AAPL"], "job": "codes"})
        again = await system.request(
            "start", {"provider": "synthetic", "symbols": ["X"], "job": "codes"}
        )
        assert again.code == "already_running"
        assert again.headers["Nats-Service-Error-Code"] == "409"

        system.write_config(POLICY, "store_sync:\n  mode: kafka\n")
        refused = await system.request("reload", {})
        assert refused.code == "config_invalid"
        assert refused.headers["Nats-Service-Error-Code"] == "400"
        assert "store_sync.mode" in refused.body["error"]["message"]

        stopped = await system.ok("stop", {"job": "codes"})
        assert stopped["status"] == "stopped"
    finally:
        system.write_config(PROVIDERS, SHIPPED_PROVIDERS)
        await reload_with(system)


async def test_start_status_stop_with_events_and_metrics(control_system: System) -> None:
    system = control_system
    seen: list[tuple[str, dict[str, Any]]] = []
    sub = await events(system, seen)
    starts = await system.metric("control", "ingest_starts_total", provider="synthetic")
    stops = await system.metric(
        "control", "ingest_stops_total", provider="synthetic", reason="maintenance"
    )
    errors = await system.metric("control", "ingest_errors_total", provider="ibkr", stage="start")

    reply = await system.ok(
        "start",
        {"provider": "synthetic", "symbols": ["AAPL", "BRK.B"], "job": "j1", "dry_run": True,
         "params": {"rate": 50}},
    )  # fmt: skip
    job = reply["job"]
    assert reply["status"] == "running"
    assert (job["job"], job["dry_run"], job["symbols"]) == ("j1", True, ["AAPL", "BRK.B"])
    assert job["params"] == {"rate": 50, "seed": 1}
    assert (await system.kv("ingest_jobs", "j1"))["run"] == job["run"]

    await wait_for(lambda: job_state(system, "j1"), 15, "the provider to run j1")
    await wait_for(lambda: _is(job_state(system, "j1"), "running"), 15, "j1 to be reported running")
    status = await system.ok("status")
    [view] = [v for v in status["jobs"] if v["job"] == "j1"]
    assert view["run"] == job["run"] and view["dry_run"] is True
    assert view["provider_state"]["state"] == "running"
    assert status["providers"]["synthetic"] == {
        "enabled": True,
        "symbols": ["AAPL", "MSFT", "BRK.B", "BTC/USD"],
        "symbols_from_source": False,
        "circuit": "closed",
        "failures_in_window": 0,
    }
    assert status["providers"]["ibkr"]["enabled"] is False
    assert status["policy"]["write_path"] == {
        "enabled": True,
        "dry_run": False,
        "max_runtime_seconds": 0.0,
    }
    assert status["limits"]["running"] >= 1
    await wait_for(
        lambda: _metric_is(system, "ingest_active", 1.0, provider="synthetic"),
        10,
        "ingest_active{synthetic} = 1",
    )
    assert await system.metric("control", "ingest_starts_total", provider="synthetic") == starts + 1

    refused = await system.request("start", {"provider": "ibkr", "symbols": ["AAPL"]})
    assert refused.code == "provider_disabled"
    assert (
        await system.metric("control", "ingest_errors_total", provider="ibkr", stage="start")
        == errors + 1
    )

    stopped = await system.ok("stop", {"job": "j1", "reason": "maintenance"})
    assert stopped == {
        "ok": True, "status": "stopped", "job": "j1", "run": job["run"], "reason": "maintenance"
    }  # fmt: skip
    idle = await system.ok("stop", {"job": "j1"})
    assert idle == {"ok": True, "status": "idle", "job": "j1"}
    status = await system.ok("status")
    assert "j1" not in [v["job"] for v in status["jobs"]]
    assert status["stopped"][0]["job"] == "j1" and status["stopped"][0]["reason"] == "maintenance"
    assert (
        await system.metric(
            "control", "ingest_stops_total", provider="synthetic", reason="maintenance"
        )
        == stops + 1
    )
    await wait_for(
        lambda: _metric_is(system, "ingest_active", 0.0, provider="synthetic"),
        10,
        "ingest_active{synthetic} = 0",
    )
    await wait_for(lambda: any(e == "stopped" for e, _ in seen), 5, "the stopped event")
    await sub.unsubscribe()
    kinds = {name: body for name, body in seen if body.get("job") == "j1"}
    assert kinds["started"]["run"] == job["run"] and kinds["started"]["dry_run"] is True
    assert kinds["stopped"]["reason"] == "maintenance"


async def test_several_jobs_up_to_the_limit(control_system: System) -> None:
    system = control_system
    await reload_with(system, policy(guards={"max_concurrent_jobs": 2}))
    try:
        for name in ("a1", "a2"):
            await system.ok("start", {"provider": "synthetic", "symbols": ["IBM"], "job": name})
        third = await system.request(
            "start", {"provider": "synthetic", "symbols": ["IBM"], "job": "a3"}
        )
        assert third.code == "already_running"
        assert "max_concurrent_jobs = 2" in third.body["error"]["message"]
        await system.ok("stop", {"job": "a1"})
        await system.ok("start", {"provider": "synthetic", "symbols": ["IBM"], "job": "a3"})
        running = {v["job"] for v in (await system.ok("status"))["jobs"]}
        assert {"a2", "a3"} <= running and "a1" not in running
    finally:
        for name in ("a1", "a2", "a3"):
            await system.ok("stop", {"job": name})
        await reload_with(system)


async def test_invalid_reload_is_refused_and_the_running_config_keeps_working(
    control_system: System,
) -> None:
    system = control_system
    seen: list[tuple[str, dict[str, Any]]] = []
    sub = await events(system, seen)
    before = await system.kv("ingest_state", "policy")
    config_dir = system.config_dir

    system.write_config(POLICY, "write_path:\n  enabled: true\n  dry_runn: true\n")
    refused = await system.request("reload", {})
    assert refused.code == "config_invalid"
    message = refused.body["error"]["message"]
    assert str(config_dir / POLICY) in message
    assert "write_path.dry_runn: unknown key" in message
    assert await system.kv("ingest_state", "policy") == before
    await wait_for(
        lambda: any(e == "failed" and b.get("stage") == "reload" for e, b in seen),
        5,
        "a failed event for the refused reload",
    )
    # The running configuration still answers: its defaults, its guards.
    reply = await system.ok("start", {"provider": "synthetic", "job": "old"})
    assert reply["job"]["dry_run"] is False
    assert reply["job"]["symbols"] == ["AAPL", "MSFT", "BRK.B", "BTC/USD"]
    await system.ok("stop", {"job": "old"})

    # A valid change is applied and published, with the next revision.
    reloaded = await reload_with(system, policy(write_path={"enabled": False, "dry_run": True}))
    assert reloaded["policy_revision"] == before["revision"] + 1
    published = await system.kv("ingest_state", "policy")
    assert published["revision"] == before["revision"] + 1
    assert published["write_path"] == {
        "enabled": False,
        "dry_run": True,
        "max_runtime_seconds": 0.0,
    }
    assert published["store_sync"]["mode"] == "bus"
    reply = await system.ok("start", {"provider": "synthetic", "job": "new"})
    assert reply["job"]["dry_run"] is True
    await system.ok("stop", {"job": "new"})
    await reload_with(system)
    await wait_for(lambda: any(e == "reloaded" for e, _ in seen), 5, "a reloaded event")
    await sub.unsubscribe()


async def test_auto_stop_at_the_deadline_survives_a_control_restart(
    control_system: System,
) -> None:
    system = control_system
    seen: list[tuple[str, dict[str, Any]]] = []
    sub = await events(system, seen)
    await reload_with(system, policy(write_path={"max_runtime_seconds": 4}))
    try:
        reply = await system.ok(
            "start", {"provider": "synthetic", "symbols": ["IBM"], "job": "timed"}
        )
        job = reply["job"]
        assert job["deadline_ns"] == job["started_ns"] + 4_000_000_000
        before = await _job_view(system, "timed")

        await system.restart("control", hard=True)  # kill -9 mid-job

        after = await _job_view(system, "timed")
        for key in ("job", "run", "provider", "symbols", "started_ns", "deadline_ns", "dry_run"):
            assert after[key] == before[key], key
        await wait_for(
            lambda: _job_gone(system, "timed"), 15, "the restarted control to stop the job"
        )
        stopped_at = time.time_ns()
        assert stopped_at >= job["deadline_ns"]
        status = await system.ok("status")
        [record] = [s for s in status["stopped"] if s["job"] == "timed"]
        assert record["reason"] == "auto_duration_reached" and record["run"] == job["run"]
        assert record["stopped_ns"] >= job["deadline_ns"]
        assert (
            await system.metric(
                "control",
                "ingest_stops_total",
                provider="synthetic",
                reason="auto_duration_reached",
            )
            == 1.0
        )
        await wait_for(
            lambda: any(
                e == "stopped" and b.get("reason") == "auto_duration_reached" for e, b in seen
            ),
            5,
            "the stopped event with reason auto_duration_reached",
        )
    finally:
        await sub.unsubscribe()
        await system.ok("stop", {"job": "timed"})
        await reload_with(system)


async def test_http_facade_status_codes(control_system: System) -> None:
    system = control_system
    base = (await system.kv("ingest_state", "http.control"))["url"]
    status = await system.ok("status")
    assert status["http"] == base
    async with aiohttp.ClientSession(base_url=base, headers=TOKEN) as http:

        async def post(verb: str, body: Any, **kw: Any) -> tuple[int, dict[str, Any]]:
            data = body if isinstance(body, bytes) else msgspec.json.encode(body)
            async with http.post(f"/runtime/ingest/{verb}", data=data, **kw) as resp:
                return resp.status, await resp.json()

        async with aiohttp.ClientSession(base_url=base) as anonymous:
            async with anonymous.get("/runtime/ingest/status") as resp:
                assert resp.status == 401
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")
            async with anonymous.post(
                "/runtime/ingest/start",
                data=b'{"provider": "synthetic"}',
                headers={"Authorization": "Bearer wrong"},
            ) as resp:
                assert resp.status == 401
            async with anonymous.get("/healthz") as resp:
                assert resp.status == 200

        async with http.get("/runtime/ingest/status") as resp:
            assert resp.status == 200
            body = await resp.json()
            assert body["ok"] is True and "jobs" in body and "policy" in body

        assert (await post("start", b"{oops"))[0] == 400
        code, body = await post("start", {"provider": "polygon", "symbols": ["A"]})
        assert (code, body["error"]["code"]) == (404, "unknown_provider")
        code, body = await post("start", {"provider": "ibkr", "symbols": ["A"]})
        assert (code, body["error"]["code"]) == (409, "provider_disabled")
        code, body = await post("start", {"provider": "synthetic", "symbols": ["\t"]})
        assert (code, body["error"]["code"]) == (400, "symbol_invalid")
        code, body = await post("start", {"provider": "synthetic", "symbols": ["A"], "job": "h1"})
        assert code == 200 and body["job"]["job"] == "h1"
        code, body = await post("start", {"provider": "synthetic", "symbols": ["A"], "job": "h1"})
        assert (code, body["error"]["code"]) == (409, "already_running")
        code, body = await post("stop", {"job": "h1"})
        assert (code, body["status"]) == (200, "stopped")
        code, body = await post("stop", b"")
        assert (code, body) == (200, {"ok": True, "status": "idle", "job": "default"})
        code, body = await post("reload", b"")
        assert (code, body["status"]) == (200, "reloaded")
        system.write_config(POLICY, "guards: {max_symbols: many}\n")
        try:
            code, body = await post("reload", b"")
            assert (code, body["error"]["code"]) == (400, "config_invalid")
        finally:
            await reload_with(system)
        async with http.get("/runtime/ingest/start") as resp:
            assert resp.status == 405
        async with http.post("/runtime/ingest/explode") as resp:
            assert resp.status == 404


async def test_smoke_script_passes_against_the_running_system(control_system: System) -> None:
    system = control_system
    base = (await system.kv("ingest_state", "http.control"))["url"]
    script = REPO / "scripts" / "ingest_smoke.sh"
    env = {**os.environ, "BASE": base, "TOKEN": "s3cret", "PYTHON": sys.executable}
    result = await asyncio.to_thread(
        subprocess.run, ["bash", str(script)], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, (
        result.stdout + result.stderr + system.log_tail("provider", "control")
    )
    assert "OK: ingest smoke test passed" in result.stdout
    for step in ("1/6 status", "2/6 reload", "3/6 start", "4/6 status while", "5/6 stop", "6/6"):
        assert step in result.stdout

    failing = [
        {**env, "PROVIDER": "ibkr"},  # disabled: start answers 409
        {**env, "TOKEN": "wrong"},  # 401
        {**env, "BASE": "http://127.0.0.1:9"},  # nothing listens
    ]
    for bad_env in failing:
        result = await asyncio.to_thread(
            subprocess.run, ["bash", str(script)], env=bad_env, capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
        assert result.returncode != 0, result.stdout
        assert "FAIL:" in result.stderr
    assert not [v for v in (await system.ok("status"))["jobs"] if v["job"].startswith("smoke")]


async def test_cli_ingest_commands(control_system: System, tmp_path: Path) -> None:
    system = control_system
    env = {k: v for k, v in os.environ.items() if not k.startswith("MDP_")}
    env["MDP_NATS_URL"] = system.server.url

    def mdp(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "mdp.cli", "ingest", *args],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    started = await asyncio.to_thread(
        mdp, "start", "--provider", "synthetic", "--symbols", "AAPL,MSFT", "--dry-run",
        "--job", "cli",
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    reply = msgspec.json.decode(started.stdout)
    assert reply["job"]["dry_run"] is True and reply["job"]["symbols"] == ["AAPL", "MSFT"]
    assert "started job cli" in started.stderr and "dry run" in started.stderr
    refused = await asyncio.to_thread(mdp, "start", "--provider", "ibkr", "--symbols", "AAPL")
    assert refused.returncode == 1
    assert "provider_disabled" in refused.stderr
    status = await asyncio.to_thread(mdp, "status")
    assert status.returncode == 0 and '"cli"' in status.stdout
    stopped = await asyncio.to_thread(mdp, "stop", "--job", "cli")
    assert stopped.returncode == 0 and msgspec.json.decode(stopped.stdout)["status"] == "stopped"
    reloaded = await asyncio.to_thread(mdp, "reload")
    assert reloaded.returncode == 0


def test_config_check_command(tmp_path: Path) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MDP_")}

    def check(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "mdp.cli", "config", "check", *args],
            cwd=tmp_path, env=clean, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    good = check("--config-dir", str(REPO / "mdp" / "configs"))
    assert good.returncode == 0, good.stderr
    assert f"ingestion_policy.yaml: ok ({REPO / 'mdp' / 'configs' / POLICY})" in good.stdout
    (tmp_path / POLICY).write_text("guards:\n  max_concurrent_jobs: -1\n")
    bad = check("--config-dir", str(tmp_path))
    assert bad.returncode == 1
    assert f"{tmp_path / POLICY}: guards.max_concurrent_jobs: " in bad.stderr


@pytest.mark.parametrize(
    ("files", "env", "expected"),
    [
        (
            {POLICY: "store_sync:\n  mode: kafka\n"},
            {},
            "ingestion_policy.yaml: store_sync.mode: Input should be 'bus', 'http' or 'none'",
        ),
        (
            {PROVIDERS: "synthetic:\n  enabled: maybe\n"},
            {},
            "data_providers.yaml: synthetic.enabled: Input should be a valid boolean",
        ),
        (
            {},
            {"MDP_POLICY__WRITE_PATH__MAX_RUNTIME_SECONDS": "-5"},
            "MDP_POLICY__WRITE_PATH__MAX_RUNTIME_SECONDS (environment): "
            "write_path.max_runtime_seconds: Input should be greater than or equal to 0",
        ),
    ],
)
def test_a_bad_config_at_start_up_is_a_clean_exit(
    tmp_path: Path, files: dict[str, str], env: dict[str, str], expected: str
) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MDP_")}
    clean.update(env, MDP_CONFIG_DIR=str(tmp_path), MDP_NATS_URL="nats://127.0.0.1:1")
    result = subprocess.run(
        [sys.executable, "-m", "mdp.services.control"],
        env=clean, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert expected in result.stderr
    assert result.stderr.startswith("mdp control: invalid configuration: ")
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


async def _is(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


async def _metric_is(system: System, name: str, value: float, **labels: str) -> bool:
    return await system.metric("control", name, **labels) == value


async def _job_view(system: System, job: str) -> dict[str, Any]:
    status = await system.ok("status")
    [view] = [v for v in status["jobs"] if v["job"] == job]
    return dict(view)


async def _job_gone(system: System, job: str) -> bool:
    status = await system.ok("status")
    return job not in [v["job"] for v in status["jobs"]]


async def test_the_control_endpoints_carry_their_schemas_in_micro_metadata(
    control_system: System,
) -> None:
    info = json.loads((await control_system.nc.request("$SRV.INFO.mdp-control", b"", 5)).data)
    endpoints = {e["name"]: e for e in info["endpoints"]}
    assert {"start", "stop", "status", "reload", "reset"} <= set(endpoints)
    start = endpoints["start"]
    assert start["subject"] == "ingest.control.start"
    request = json.loads(start["metadata"]["request_schema"])
    definition = request["$defs"]["StartRequest"]
    assert {"provider", "symbols"} <= set(definition["properties"])
    reply = json.loads(endpoints["status"]["metadata"]["response_schema"])
    assert "StatusReply" in reply["$defs"]
    error = json.loads(start["metadata"]["error_schema"])
    assert "ErrorReply" in error["$defs"]
