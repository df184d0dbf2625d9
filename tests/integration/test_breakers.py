"""Circuit breakers end to end: real nats-server, provider and control processes.

A live feed failing at every start opens its provider's breaker after 3 failures (an event,
`status`, the gauge, the job `retrying` until it half-opens, no attempt meanwhile); each
half-open probe fails until the feed is back, then the probe closes it; `reset` closes an open
breaker at once; a reset of an unknown provider disturbs nothing; silences and pacing errors
count as failures. The adapters are switched by files (`tests/flaky_adapter.py`).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from nats.js.errors import KeyNotFoundError

from mdp.client import ControlRequestError, PipelineRuntime
from mdp.shared.contract import names
from mdp.shared.contract.control import ResetReply
from mdp.shared.natsserver import EmbeddedNats
from tests.conftest import wait_for
from tests.conftest_control import REPO, System, module_nats_fixture, start_system, stop_system

__all__ = ["module_nats_fixture"]

pytestmark = pytest.mark.integration

S = 1_000_000_000
RECOVERY_S = 4
SILENCE_S = 1.5
SWITCH = "tests.flaky_adapter:SwitchAdapter"
QUIET = "tests.flaky_adapter:QuietSwitchAdapter"


@pytest.fixture(scope="module", name="system")
async def system_fixture(
    module_nats: EmbeddedNats, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[System]:
    """Control and one provider hosting the two switch adapters; a 4 s recovery."""
    system = await start_system(
        module_nats,
        tmp_path_factory.mktemp("breakers"),
        ("provider", "control"),
        env={
            "MDP_PROVIDER__ADAPTERS": f"{SWITCH},{QUIET}",
            "MDP_PROVIDERS__SWITCH__SYMBOLS": "[S1]",
            "MDP_PROVIDERS__QUIET__SYMBOLS": "[Q1]",
            "MDP_POLICY__CIRCUIT__RECOVERY_SECONDS": str(RECOVERY_S),
            "MDP_PROVIDER__DATA_STOPPED_AFTER_S": str(SILENCE_S),
        },
    )
    yield system
    await stop_system(system)


class Circuits:
    """Every `ingest.events.circuit` event seen, as (provider, from, to, reason, ts)."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    def of(self, provider: str) -> list[tuple[str, str, str]]:
        return [
            (e["from_state"], e["to_state"], e["reason"])
            for e in self.seen
            if e["provider"] == provider
        ]

    async def wait(self, provider: str, count: int, what: str, timeout: float = 15) -> None:
        await wait_for(lambda: len(self.of(provider)) >= count, timeout, what)


@pytest.fixture
async def circuits(system: System) -> AsyncIterator[Circuits]:
    found = Circuits()

    async def on_event(msg: Any) -> None:
        found.seen.append(msgspec.json.decode(msg.data))

    sub = await system.nc.subscribe(names.event("circuit"), cb=on_event)
    yield found
    await sub.unsubscribe()


def switches(tmp_path: Path) -> Path:
    directory = tmp_path / "switches"
    directory.mkdir()
    return directory


def starts(directory: Path) -> list[int]:
    path = directory / "starts"
    return [int(line) for line in path.read_text().split()] if path.exists() else []


async def job_view(system: System, job: str) -> dict[str, Any]:
    status = await system.ok("status")
    [view] = [v for v in status["jobs"] if v["job"] == job]
    return dict(view)


async def provider_info(system: System, provider: str) -> dict[str, Any]:
    return dict((await system.ok("status"))["providers"][provider])


async def circuit_revision(system: System, provider: str) -> int:
    """The KV revision of a provider's breaker record (0: none yet)."""
    kv = await system.nc.jetstream().key_value(names.KV_STATE)
    try:
        return int((await kv.get(names.circuit_key(provider))).revision or 0)
    except KeyNotFoundError:
        return 0


async def circuit_events_stored(system: System) -> int:
    """How many circuit events MD_EVENTS holds (control flushes its events before replying)."""
    info = await system.nc.jetstream().stream_info(
        names.STREAM_EVENTS, subjects_filter=names.event("circuit")
    )
    return int((info.state.subjects or {}).get(names.event("circuit"), 0))


async def test_open_then_half_open_probes_until_the_feed_is_back(
    system: System, circuits: Circuits, tmp_path: Path
) -> None:
    directory = switches(tmp_path)
    (directory / "fail").touch()
    await system.ok("start", {"provider": "switch", "job": "sw", "params": {"dir": str(directory)}})
    try:
        await circuits.wait("switch", 1, "the switch breaker to open")
        [opened] = [e for e in circuits.seen if e["provider"] == "switch"]
        assert (opened["from_state"], opened["to_state"], opened["reason"]) == (
            "closed",
            "open",
            "failure_threshold",
        )
        half_opens_at = opened["ts"] + RECOVERY_S * S

        async def retrying_until_half_open() -> bool:
            view = await job_view(system, "sw")
            report = view["provider_state"]
            return view["state"] == "retrying" and report["next_attempt_ns"] == half_opens_at

        await wait_for(retrying_until_half_open, 5, "the job retrying until the breaker half-opens")
        view = await job_view(system, "sw")
        assert "ConnectionRefusedError" in view["provider_state"]["error"]
        info = await provider_info(system, "switch")
        assert info["circuit"] == "open" and info["failures_in_window"] == 3
        assert info["opened_at_ns"] == opened["ts"]
        assert await system.metric("control", "mdp_provider_circuit_state", provider="switch") == 2
        assert len(starts(directory)) == 3  # the three failures; none while open

        # Recovery elapsed: one probe, which fails (the feed is still down) and reopens it.
        await circuits.wait("switch", 3, "a half-open probe and its failure")
        assert circuits.of("switch")[1:3] == [
            ("open", "half_open", "recovery_elapsed"),
            ("half_open", "open", "probe_failed"),
        ]
        probe = starts(directory)[3]
        assert probe >= half_opens_at  # no attempt before the breaker half-opened
        assert len(starts(directory)) == 4

        (directory / "fail").unlink()  # the feed is back: the next probe publishes and closes
        await circuits.wait("switch", 5, "the next probe to close the breaker")
        assert circuits.of("switch")[3:] == [
            ("open", "half_open", "recovery_elapsed"),
            ("half_open", "closed", "probe_succeeded"),
        ]
        info = await provider_info(system, "switch")
        assert (info["circuit"], info["failures_in_window"]) == ("closed", 0)
        assert "opened_at_ns" not in info
        assert await system.metric("control", "mdp_provider_circuit_state", provider="switch") == 0

        async def running() -> bool:
            view = await job_view(system, "sw")
            return view["state"] == "running" and view["provider_state"]["ticks"] > 10

        await wait_for(running, 10, "the job to run again")
        assert len(starts(directory)) == 5
    finally:
        await system.ok("stop", {"job": "sw"})


async def test_reset_closes_an_open_breaker_at_once(
    system: System, circuits: Circuits, tmp_path: Path
) -> None:
    directory = switches(tmp_path)
    (directory / "fail").touch()
    await system.ok("start", {"provider": "switch", "job": "sw", "params": {"dir": str(directory)}})
    try:
        await circuits.wait("switch", 1, "the switch breaker to open")
        [opened] = [e for e in circuits.seen if e["provider"] == "switch"]
        assert opened["reason"] == "failure_threshold"
        (directory / "fail").unlink()
        reply = await system.ok("reset", {"provider": "switch"})
        assert reply == {
            "ok": True,
            "status": "reset",
            "provider": "switch",
            "from_state": "open",
            "to_state": "closed",
        }
        # Control flushes before replying: the event is already stored and delivered.
        await circuits.wait("switch", 2, "the manual reset event", timeout=2)
        assert circuits.of("switch")[1] == ("open", "closed", "manual_reset")
        info = await provider_info(system, "switch")
        assert (info["circuit"], info["failures_in_window"]) == ("closed", 0)

        async def running() -> bool:
            view = await job_view(system, "sw")
            return view["state"] == "running" and view["provider_state"]["ticks"] > 0

        await wait_for(running, 5, "the job to restart once reset")
        # Restarted by the reset, well before the breaker would have half-opened by itself.
        assert starts(directory)[-1] < opened["ts"] + RECOVERY_S * S
        assert circuits.of("switch")[2:] == []  # no probe: the breaker was closed
    finally:
        await system.ok("stop", {"job": "sw"})


async def test_reset_of_an_unknown_provider_disturbs_nothing(
    system: System, circuits: Circuits, tmp_path: Path
) -> None:
    directory = switches(tmp_path)
    await system.ok("start", {"provider": "switch", "job": "ok", "params": {"dir": str(directory)}})
    try:

        async def ticking() -> bool:
            view = await job_view(system, "ok")
            return view["state"] == "running" and view["provider_state"]["ticks"] > 0

        await wait_for(ticking, 10, "the job to run")
        before = await job_view(system, "ok")
        revision = await circuit_revision(system, "switch")
        stored = await circuit_events_stored(system)

        refused = await system.request("reset", {"provider": "polygon"})
        assert refused.code == "unknown_provider"
        assert refused.headers["Nats-Service-Error-Code"] == "404"
        message = refused.body["error"]["message"]
        assert "'polygon' is not configured" in message and "switch" in message
        for body, problem in (
            (b"", "missing required field `provider`"),
            ({"provider": 5}, "at `$.provider`"),
            ({"provider": "switch", "force": True}, "unknown field `force`"),
            (b"{oops", "malformed JSON"),
        ):
            reply = await system.request("reset", body)
            assert reply.code == "invalid_request", body
            assert reply.headers["Nats-Service-Error-Code"] == "400"
            assert problem in reply.body["error"]["message"], reply.body

        base = (await system.kv("ingest_state", "http.control"))["url"]
        async with aiohttp.ClientSession(base_url=base) as http:
            async with http.post("/runtime/ingest/reset", data=b'{"provider": "polygon"}') as resp:
                assert resp.status == 404
                assert (await resp.json())["error"]["code"] == "unknown_provider"
            async with http.post("/runtime/ingest/reset", data=b"{}") as resp:
                assert resp.status == 400

        async with PipelineRuntime(system.server.url) as rt:
            with pytest.raises(ControlRequestError) as info:
                await rt.reset("polygon")
            assert info.value.code == "unknown_provider"

        env = {k: v for k, v in os.environ.items() if not k.startswith("MDP_")}
        env["MDP_NATS_URL"] = system.server.url
        cli = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "mdp.cli", "ingest", "reset", "polygon"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert cli.returncode == 1 and "unknown_provider" in cli.stderr

        # Nothing written, nothing announced, the job runs on as the same run.
        assert await circuit_revision(system, "switch") == revision
        assert await circuit_events_stored(system) == stored
        assert circuits.of("polygon") == [] and circuits.of("switch") == []
        ticks = before["provider_state"]["ticks"]

        async def still_ticking() -> bool:
            view = await job_view(system, "ok")
            return view["state"] == "running" and view["provider_state"]["ticks"] > ticks

        await wait_for(still_ticking, 10, "the job to keep publishing")
        assert (await job_view(system, "ok"))["run"] == before["run"]

        # The known provider through every face: closed stays closed, still nothing written.
        async with PipelineRuntime(system.server.url) as rt:
            reset = await rt.reset("switch")
        assert isinstance(reset, ResetReply)
        assert (reset.provider, reset.from_state, reset.to_state) == ("switch", "closed", "closed")
        async with aiohttp.ClientSession(base_url=base) as http:
            body = b'{"provider": "switch"}'
            async with http.post("/runtime/ingest/reset", data=body) as resp:
                assert resp.status == 200 and (await resp.json())["to_state"] == "closed"
        cli = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "mdp.cli", "ingest", "reset", "switch"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert cli.returncode == 0, cli.stderr
        assert "circuit of switch was already closed" in cli.stderr
        assert msgspec.json.decode(cli.stdout)["from_state"] == "closed"
        assert await circuit_revision(system, "switch") == revision
    finally:
        await system.ok("stop", {"job": "ok"})


async def test_silences_and_pacing_errors_count_and_a_running_feed_closes_it_again(
    system: System, circuits: Circuits, tmp_path: Path
) -> None:
    directory = switches(tmp_path)
    await system.ok("start", {"provider": "quiet", "job": "q", "params": {"dir": str(directory)}})
    try:

        async def failures(count: int) -> bool:
            return (await provider_info(system, "quiet"))["failures_in_window"] == count

        async def ticks() -> int:
            return int((await job_view(system, "q"))["provider_state"].get("ticks", 0))

        await wait_for(lambda: _positive(ticks()), 10, "the quiet job to publish")
        (directory / "pacing").touch()  # the adapter reports a pacing error through its sink
        await wait_for(lambda: failures(1), 5, "the pacing error to count")

        (directory / "silent").touch()
        await wait_for(lambda: failures(2), 3 * SILENCE_S + 2, "the silence to count")
        # One failure per silence, however long it lasts.
        await asyncio.sleep(2 * SILENCE_S)
        assert await failures(2)
        assert (await job_view(system, "q"))["state"] == "running"  # silent is not failed
        (directory / "silent").unlink()
        resumed = await ticks()
        await wait_for(lambda: _above(ticks(), resumed), 5, "the feed to resume")

        (directory / "silent").touch()  # a second silence: the third failure opens it
        await circuits.wait("quiet", 1, "the breaker to open on data_stopped", 3 * SILENCE_S + 5)
        assert circuits.of("quiet") == [("closed", "open", "failure_threshold")]
        assert (await provider_info(system, "quiet"))["circuit"] == "open"
        # An open breaker holds (re)starts back; it does not stop a feed that is running.
        assert (await job_view(system, "q"))["state"] == "running"
        (directory / "silent").unlink()
        # The feed delivers again: once the breaker half-opens, its success closes it.
        await circuits.wait("quiet", 3, "the running feed to close the breaker", RECOVERY_S + 10)
        assert circuits.of("quiet")[1:] == [
            ("open", "half_open", "recovery_elapsed"),
            ("half_open", "closed", "probe_succeeded"),
        ]
        assert len(starts(directory)) == 1  # all along one run of the adapter
    finally:
        await system.ok("stop", {"job": "q"})


async def _positive(value: Any) -> bool:
    return bool(await value > 0)


async def _above(value: Any, floor: int) -> bool:
    return bool(await value > floor)
