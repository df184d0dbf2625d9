"""Which provider process hosts which adapter: a pip-installed plugin adapter runs, an unhosted
job fails with `no_adapter_host` within the timeout and never counts as active."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from mdp.shared.natsserver import EmbeddedNats
from tests.conftest import wait_for
from tests.conftest_control import REPO, System, module_nats_fixture, start_system, stop_system

__all__ = ["module_nats_fixture"]

pytestmark = pytest.mark.integration

FLAKY = "tests.flaky_adapter:FlakyAdapter"

PLUGIN = '''
"""A third-party adapter: a few ticks per symbol, then the end of its bounded stream."""

import time

from mdp.shared.contract.messages import Tick


class TinyAdapter:
    name = "tiny"

    def __init__(self, job):
        self.job = job

    @property
    def clock_rate(self):
        return 0.0

    async def run(self, sink, resume_after=None):
        now = time.time_ns()
        for symbol in self.job.symbols:
            ticks = [Tick(now + i, now + i, i + 1, 10.0 + i, 1.0) for i in range(5)]
            await sink.put(symbol, ticks)
        await sink.end_of_stream(self.job.symbols, {s: 5 for s in self.job.symbols})
'''


def install_plugin(site: Path) -> None:
    """Distribution `mdp-tiny-adapter` 1.2.3 with an `mdp.adapters` entry point, as pip lays it."""
    package = site / "mdp_tiny_adapter"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent(PLUGIN))
    dist = site / "mdp_tiny_adapter-1.2.3.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: mdp-tiny-adapter\nVersion: 1.2.3\n"
    )
    (dist / "entry_points.txt").write_text("[mdp.adapters]\ntiny = mdp_tiny_adapter:TinyAdapter\n")


@pytest.fixture(scope="module", name="hosts_system")
async def hosts_system_fixture(
    module_nats: EmbeddedNats, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[System]:
    """Control and one provider hosting synthetic and the plugin (not replay, not ibkr)."""
    tmp = tmp_path_factory.mktemp("hosts")
    install_plugin(tmp / "site")
    system = await start_system(
        module_nats,
        tmp,
        ("provider", "control"),
        env={
            "PYTHONPATH": os.pathsep.join([str(tmp / "site"), str(REPO)]),
            "MDP_PROVIDER__ADAPTERS": f"synthetic,tiny,{FLAKY}",
            "MDP_PROVIDERS__FLAKY__SYMBOLS": "[F1]",
            "MDP_PROVIDERS__IBKR__ENABLED": "true",
            "MDP_PROVIDERS__TINY__SYMBOLS": "[T1, T.2]",
            "MDP_POLICY__INGEST__HOST_TIMEOUT_SECONDS": "2",
        },
    )
    yield system
    await stop_system(system)


async def job_view(system: System, job: str) -> dict[str, Any] | None:
    status = await system.ok("status")
    return next((view for view in status["jobs"] if view["job"] == job), None)


async def test_status_lists_the_hosted_adapters_with_version_and_origin(
    hosts_system: System,
) -> None:
    async def hosts() -> list[dict[str, Any]]:
        return list((await hosts_system.ok("status"))["hosts"])

    await wait_for(hosts, 15, "the provider to announce itself")
    [host] = await hosts()
    adapters = {a["name"]: a for a in host["adapters"]}
    assert set(adapters) == {"synthetic", "tiny", "flaky"}
    assert adapters["flaky"]["origin"] == f"module:{FLAKY}"
    assert adapters["tiny"]["origin"] == "entry-point:mdp-tiny-adapter"
    assert adapters["tiny"]["version"] == "1.2.3"


async def test_a_job_on_a_pip_installed_adapter_runs_to_completion(hosts_system: System) -> None:
    await hosts_system.ok("start", {"provider": "tiny", "job": "plugin"})

    async def completed() -> bool:
        view = await job_view(hosts_system, "plugin")
        return view is not None and view["state"] == "completed"

    await wait_for(completed, 20, "the plugin job to complete")
    view = await job_view(hosts_system, "plugin")
    assert view is not None and view["provider_state"]["ticks"] == 10
    assert view["symbols"] == ["T1", "T.2"]


async def test_an_unhosted_job_fails_with_no_adapter_host(hosts_system: System) -> None:
    failed: list[dict[str, Any]] = []

    async def on_failed(msg: Any) -> None:
        failed.append(msgspec.json.decode(msg.data))

    sub = await hosts_system.nc.subscribe("ingest.events.failed", cb=on_failed)
    try:
        reply = await hosts_system.ok("start", {"provider": "ibkr", "symbols": ["AAPL"]})
        run = reply["job"]["run"]
        view = await job_view(hosts_system, "default")
        assert view is not None and view["state"] == "pending"
        # Pending is not active: nothing may yet claim this job runs.
        assert await hosts_system.metric("control", "ingest_active", provider="ibkr") == 0

        def reported() -> bool:
            return any(e.get("run") == run and e.get("code") == "no_adapter_host" for e in failed)

        await wait_for(reported, 8, "ingest.events.failed with code no_adapter_host")
        [event] = [e for e in failed if e.get("run") == run]
        assert "'ibkr'" in event["error"] and "--adapters ibkr" in event["error"]
        view = await job_view(hosts_system, "default")
        assert view is not None and view["state"] == "failed"
        assert "no_adapter_host" in view["provider_state"]["error"]
        assert await hosts_system.metric("control", "ingest_active", provider="ibkr") == 0
    finally:
        await sub.unsubscribe()
        await hosts_system.ok("stop", {"job": "default"})


def test_an_unknown_adapter_refuses_to_start_the_provider() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mdp.cli", "service", "provider", "--adapters", "synthetic,nope"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert result.returncode == 2
    assert "unknown adapter 'nope' (registered: ibkr, replay, synthetic" in result.stderr


async def test_a_failing_live_job_retries_with_backoff_and_resumes(hosts_system: System) -> None:
    await hosts_system.ok("start", {"provider": "flaky", "job": "flaky"})
    seen: list[dict[str, Any]] = []

    async def retrying() -> bool:
        view = await job_view(hosts_system, "flaky")
        if view is not None and view["state"] == "retrying":
            seen.append(view["provider_state"])
        return bool(seen)

    await wait_for(retrying, 15, "the job to report retrying")
    report = seen[0]
    assert "feed dropped" in report["error"] and report["attempts"] >= 1
    assert report["next_attempt_ns"] > report["updated_ns"]

    async def healthy_again() -> bool:
        view = await job_view(hosts_system, "flaky")
        return (
            view is not None and view["state"] == "running" and view["provider_state"]["ticks"] > 20
        )

    await wait_for(healthy_again, 20, "the job to run again after its retries")
    view = await job_view(hosts_system, "flaky")
    assert view is not None and view["provider_state"]["attempts"] == 2
    assert (
        await hosts_system.metric("provider", "mdp_provider_job_retries_total", provider="flaky")
        == 2
    )
    await hosts_system.ok("stop", {"job": "flaky"})
