"""Two real provider processes drawing on one pacing budget never exceed it together, use it,
keep it through a refused reload, and the survivor of a `kill -9` gets all of it at once."""

from __future__ import annotations

import signal
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import msgspec
import pytest

from mdp.services.provider.ratelimit import max_in_window
from mdp.shared.contract import names
from mdp.shared.contract.messages import TickBatch
from mdp.shared.contract.records import LeaseRecord
from mdp.shared.natsserver import EmbeddedNats
from tests.conftest import wait_for
from tests.conftest_control import System, start_system, stop_system

pytestmark = pytest.mark.integration

S = 1_000_000_000
RATE, BURST, TTL_S = 20, 4, 0.5  # small, so a few seconds hold many blocks and windows
PACED = f"""
paced:
  symbols: [P1]
  pacing:
    messages_per_second: {RATE}
    message_burst: {BURST}
    block_ttl_seconds: {TTL_S}
"""


def logged_policy_with_pacing(log: Path) -> bool:
    """Whether a provider's log shows it follows a policy pacing the `paced` provider."""
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{") and '"policy"' in line:
            record = msgspec.json.decode(line)
            if record.get("event") == "policy" and "paced" in record.get("pacing", {}):
                return True
    return False


def grants_in(times: list[int], start: int, end: int) -> int:
    return sum(1 for t in times if start <= t < end)


async def test_two_provider_processes_share_one_budget_and_a_killed_one_strands_nothing(
    tmp_path: Path,
) -> None:
    server = EmbeddedNats(tmp_path / "nats", log_file=tmp_path / "nats.log")
    server.start()
    system = await start_system(server, tmp_path, ("control",))
    shipped = (system.config_dir / "data_providers.yaml").read_text()
    system.write_config("data_providers.yaml", shipped + PACED)
    revision = (await system.ok("reload"))["policy_revision"]
    grants: dict[str, dict[int, int]] = defaultdict(dict)  # symbol -> seq -> grant time

    async def on_raw(msg: Any) -> None:
        batch = msgspec.json.decode(msg.data, type=TickBatch)
        for tick in batch.ticks:
            grants[batch.symbol][tick.seq] = tick.ts  # a re-sent batch is the same grants

    logs = [tmp_path / f"provider-{i}.log" for i in range(2)]
    providers = [system.spawn_provider(log, "tests.paced_adapter:PacedAdapter") for log in logs]
    sub = await system.nc.subscribe("md.raw.paced.>", cb=on_raw)
    try:
        for log in logs:
            await wait_for(lambda log=log: logged_policy_with_pacing(log), 30, f"{log.name}")
        hosts = await wait_for_hosts(system, 2)
        # One job per process: each job's lease is handed to its process before the job exists
        # (the lease contract: the holder named in the record takes it, others stand by).
        lease_kv = await system.nc.jetstream().key_value(names.KV_CHECKPOINTS)
        owners = {}
        for job, proc in zip(("a", "b"), providers, strict=True):
            owners[job] = hosts[proc.pid]
            lease = LeaseRecord(owners[job], time.time_ns() + 30 * S)
            await lease_kv.put(names.job_lease_key(job), msgspec.json.encode(lease))
        for job, symbol in (("a", "A1"), ("b", "B1")):
            await system.ok("start", {"provider": "paced", "job": job, "symbols": [symbol]})
        await wait_for(lambda: grants["A1"] and grants["B1"], 30, "ticks from both processes")
        for job in owners:
            view = await job_view(system, job)
            assert view["provider_state"]["owner"] == owners[job], "one job per process"

        # Phase 1: both draw on the budget.
        shared_from = time.time_ns()
        await wait_for(lambda: time.time_ns() > shared_from + 5 * S, 10, "5 s of sharing")

        # Phase 2: a reload with a zero budget is refused with the key path; nothing changes.
        system.write_config(
            "data_providers.yaml",
            shipped + PACED.replace(f"messages_per_second: {RATE}", "messages_per_second: 0"),
        )
        refused = await system.request("reload")
        assert refused.code == "config_invalid"
        assert (
            "paced.pacing.messages_per_second: Input should be greater than 0 (got 0)"
            in (refused.body["error"]["message"])
        )
        policy = await system.kv(names.KV_STATE, names.POLICY_KEY)
        assert policy["revision"] == revision and policy["pacing"]["paced"]["message_burst"] == 4
        shared_until = time.time_ns()

        # Phase 3: kill -9 the owner of job a (and stop the job, so that nobody takes it over
        # within the measurement): the other process may now have the whole budget.
        providers[0].send_signal(signal.SIGKILL)
        providers[0].wait(10)
        killed = time.time_ns()
        await system.ok("stop", {"job": "a"})
        await wait_for(lambda: time.time_ns() > killed + 4 * S, 10, "4 s alone")
        alone_until = time.time_ns()
    finally:
        await sub.unsubscribe()
        for proc in providers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = [proc.wait(30) for proc in providers]
        await stop_system(system)
        server.stop()
    assert codes[1] == 0, f"the survivor did not stop cleanly (log {logs[1]})"

    a, b = list(grants["A1"].values()), list(grants["B1"].values())
    every = sorted(a + b)
    # Never above the bound, over any window, during the whole test (the kill included). What
    # is spent in a window was granted in it (at most burst + rate x T, the bucket's bound) or
    # held when it opened: granted within a block ttl before, and at most one block (burst/2)
    # per process.
    worst = {}
    for window_s in (0.1, 0.25, 0.5, 1.0, 2.0, 4.0):
        worst[window_s] = max_in_window(every, int(window_s * S))
        bound = BURST + RATE * window_s + min(RATE * TTL_S, 2 * (BURST // 2))
        assert worst[window_s] <= bound, (window_s, worst[window_s], bound)
    # Together they use the budget; neither starves.
    span_s = (shared_until - shared_from) / S
    together = grants_in(every, shared_from, shared_until)
    each = [grants_in(times, shared_from, shared_until) for times in (a, b)]
    assert together >= 0.7 * RATE * span_s, (together, span_s)
    assert min(each) >= 0.2 * RATE * span_s, each
    # The survivor's rate rises to the full budget at once: a killed process strands at most
    # the block it held, and the shared record keeps nothing of it.
    after_ns = killed + int(TTL_S * S)
    alone_s = (alone_until - after_ns) / S
    alone = grants_in(b, after_ns, alone_until)
    assert alone >= 0.85 * RATE * alone_s, (alone, alone_s)
    assert grants_in(a, killed, alone_until) == 0  # the dead process granted nothing
    full = (t for t in sorted(b) if killed <= t <= alone_until - S)
    rise = next((t for t in full if grants_in(b, t, t + S) >= 0.85 * RATE), alone_until)
    print(
        f"budget {RATE}/s burst {BURST} ttl {TTL_S} s: together {together / span_s:.1f}/s "
        f"(each {[round(n / span_s, 1) for n in each]}), worst windows {worst}; after kill -9 "
        f"the survivor {alone / alone_s:.1f}/s, at the full rate {(rise - killed) / S:.2f} s "
        "after the kill"
    )
    assert rise - killed <= TTL_S * S + S // 2, (rise - killed) / S


async def wait_for_hosts(system: System, count: int) -> dict[int, str]:
    """pid -> instance of the provider processes once `count` have announced themselves."""
    found: dict[int, str] = {}

    async def announced() -> bool:
        for host in (await system.ok("status"))["hosts"]:
            found[int(host["instance"].split("-")[-2])] = host["instance"]
        return len(found) >= count

    await wait_for(announced, 30, f"{count} provider processes to announce themselves")
    return found


async def job_view(system: System, job: str) -> dict[str, Any]:
    async def running() -> dict[str, Any] | None:
        for view in (await system.ok("status"))["jobs"]:
            if view["job"] == job and view["state"] == "running":
                return dict(view)
        return None

    await wait_for(running, 20, f"job {job} to run")
    view = await running()
    assert view is not None
    return view
