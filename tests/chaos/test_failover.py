"""Router failover and failback across two live sources in their own provider processes.

`synthetic` is preferred, `backup` (the same generator under another name) is the fallback.
SIGSTOP of the synthetic process: within the detection time the router switches to the backup,
handing over what the backup sent meanwhile, so `md.quotes.<sym>` has no hole in event time and
no tick twice. SIGCONT: once synthetic has been healthy for the hysteresis period the router
fails back. A reload that reverses the order switches again, without a restart.
"""

from __future__ import annotations

import itertools
import signal
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from mdp.shared.contract.events import Failover, decode_event
from mdp.shared.contract.messages import TickBatch
from mdp.shared.natsserver import EmbeddedNats
from tests.conftest import wait_for
from tests.conftest_control import System, start_system, stop_system

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

DETECT_S = 2.0
HYSTERESIS_S = 4.0
PROVIDERS = """
synthetic:
  enabled: true
  symbols: [AAA]
  params: {rate: 50}
backup:
  enabled: true
  symbols: [AAA]
  params: {rate: 50, seed: 2}
fallback:
  default: [%s]
  detect_seconds: %s
  hysteresis_seconds: %s
"""


def providers_yaml(order: str) -> str:
    return PROVIDERS % (order, DETECT_S, HYSTERESIS_S)


class Quote(msgspec.Struct, frozen=True):
    arrived: float
    provider: str
    seq: int
    ts: int


async def test_sigstop_fails_over_within_the_detection_time_and_fails_back(
    tmp_path: Path,
) -> None:
    server = EmbeddedNats(tmp_path / "nats", log_file=tmp_path / "nats.log")
    server.start()
    system = await start_system(
        server,
        tmp_path,
        ("router", "control"),
        configs={"data_providers.yaml": providers_yaml("synthetic, backup")},
    )
    quotes: list[Quote] = []
    switches: list[Failover] = []

    async def on_quote(msg: Any) -> None:
        batch = msgspec.json.decode(msg.data, type=TickBatch)
        now = time.monotonic()
        quotes.extend(Quote(now, batch.provider, t.seq, t.ts) for t in batch.ticks)

    async def on_failover(msg: Any) -> None:
        event = decode_event(msg.subject, msg.data)
        assert isinstance(event, Failover)
        switches.append(event)

    def current() -> str | None:
        return switches[-1].to_provider if switches else None

    primary = system.spawn_provider(tmp_path / "provider-synthetic.log", "synthetic")
    backup = system.spawn_provider(tmp_path / "backup.log", "tests.backup_adapter:BackupAdapter")
    try:
        await system.nc.subscribe("md.quotes.AAA", cb=on_quote)
        await system.nc.subscribe("ingest.events.failover", cb=on_failover)
        await wait_for(lambda: _hosts(system, 2), 30, "both provider processes")
        await system.ok("start", {"provider": "synthetic", "job": "primary"})
        await system.ok("start", {"provider": "backup", "job": "fallback"})
        # Whichever source spoke first, synthetic is where the router settles.
        await wait_for(lambda: current() == "synthetic", 30, "the router to choose synthetic")
        await wait_for(
            lambda: sum(q.provider == "synthetic" for q in quotes) >= 100, 20, "synthetic quotes"
        )

        primary.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        await wait_for(lambda: current() == "backup", 20, "failover to the backup")
        failover_s = time.monotonic() - stopped_at
        over = switches[-1]
        assert (over.from_provider, over.reason) == ("synthetic", "stale"), over
        await wait_for(
            lambda: sum(q.provider == "backup" for q in quotes) >= 100, 20, "backup quotes"
        )

        primary.send_signal(signal.SIGCONT)
        resumed_at = time.monotonic()
        await wait_for(lambda: current() == "synthetic", 30, "failback to synthetic")
        failback_s = time.monotonic() - resumed_at
        back = switches[-1]
        assert (back.from_provider, back.reason) == ("backup", "failback"), back
        await wait_for(
            lambda: quotes[-1].provider == "synthetic" and len(quotes) > 0, 10, "synthetic again"
        )

        # A reload that prefers the backup switches to it at once (it has long been healthy).
        system.write_config("data_providers.yaml", providers_yaml("backup, synthetic"))
        await system.ok("reload")
        await wait_for(lambda: current() == "backup", 20, "the reloaded order to apply")
        assert switches[-1].reason == "failback"
        marker = len(quotes)
        await wait_for(lambda: len(quotes) > marker + 50, 20, "quotes after the reload")

        assert failover_s < DETECT_S + 1.5, failover_s
        assert HYSTERESIS_S <= failback_s < HYSTERESIS_S + 3, failback_s
        # No tick twice, and event time only moves forward across every switch.
        identities = [(q.provider, q.seq) for q in quotes]
        assert len(set(identities)) == len(identities), "a tick was forwarded twice"
        stamps = [q.ts for q in quotes]
        assert stamps == sorted(stamps), "event time went back at a switch"
        # The handover fills the detection window: no hole in event time near the detection
        # time (50 ticks/s: a tick every 20 ms; a batch boundary may drop a few of them).
        holes = [b - a for a, b in itertools.pairwise(stamps)]
        assert max(holes) < DETECT_S * 1e9 / 2, f"a hole of {max(holes) / 1e9:.2f} s"
        # Arrival: the only pause is the detection itself.
        pauses = [b.arrived - a.arrived for a, b in itertools.pairwise(quotes)]
        assert max(pauses) < DETECT_S + 1.0, f"quotes paused {max(pauses):.2f} s"
        print(
            f"failover after SIGSTOP: {failover_s:.2f} s (detect {DETECT_S} s); "
            f"failback after SIGCONT: {failback_s:.2f} s (hysteresis {HYSTERESIS_S} s); "
            f"largest hole in event time {max(holes) / 1e9:.3f} s, longest pause "
            f"{max(pauses):.2f} s, {len(quotes)} quotes"
        )
        sources = [(s.from_provider, s.to_provider, s.reason) for s in switches]
        assert ("synthetic", "backup", "stale") in sources
    finally:
        if primary.poll() is None:
            primary.send_signal(signal.SIGCONT)
        for proc in (primary, backup):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = [proc.wait(30) for proc in (primary, backup)]
        await stop_system(system)
        server.stop()
    assert codes == [0, 0], f"provider exits: {codes}"


async def _hosts(system: System, count: int) -> bool:
    return len((await system.ok("status"))["hosts"]) >= count


BREAKER_PROVIDERS = """
switch:
  enabled: true
  symbols: [AAA]
  params: {dir: "%s"}
synthetic:
  enabled: true
  symbols: [AAA]
  params: {rate: 20}
fallback:
  default: [switch, synthetic]
  detect_seconds: 30      # long: only the provider's own health can explain a fast switch
  hysteresis_seconds: 2
"""


async def test_failover_and_failback_follow_the_breaker(tmp_path: Path) -> None:
    """A live source that fails: the router switches at once (its job retries, its breaker
    opens), long before the silence detection; when the probe succeeds it fails back."""
    switches_dir = tmp_path / "switch"
    switches_dir.mkdir()
    server = EmbeddedNats(tmp_path / "nats", log_file=tmp_path / "nats.log")
    server.start()
    system = await start_system(
        server,
        tmp_path,
        ("provider", "router", "control"),
        env={
            "MDP_PROVIDER__ADAPTERS": "synthetic,tests.flaky_adapter:SwitchAdapter",
            "MDP_POLICY__CIRCUIT__RECOVERY_SECONDS": "2",
        },
        configs={"data_providers.yaml": BREAKER_PROVIDERS % switches_dir},
    )
    story: list[tuple[str, Any]] = []

    async def on_event(msg: Any) -> None:
        story.append((msg.subject.rsplit(".", 1)[-1], decode_event(msg.subject, msg.data)))

    def failovers() -> list[Failover]:
        return [e for name, e in story if isinstance(e, Failover)]

    def circuit_states() -> list[str]:
        return [e.to_state for name, e in story if name == "circuit"]  # type: ignore[union-attr]

    try:
        await system.nc.subscribe("ingest.events.failover", cb=on_event)
        await system.nc.subscribe("ingest.events.circuit", cb=on_event)
        await system.ok("start", {"provider": "switch", "job": "primary"})
        await system.ok("start", {"provider": "synthetic", "job": "backup"})
        await wait_for(
            lambda: bool(failovers()) and failovers()[-1].to_provider == "switch",
            30,
            "the router to settle on switch",
        )
        (switches_dir / "fail").touch()
        failed_at = time.monotonic()
        await wait_for(
            lambda: failovers()[-1].to_provider == "synthetic", 20, "failover to synthetic"
        )
        failover_s = time.monotonic() - failed_at
        assert failovers()[-1].reason == "provider_down", failovers()[-1]
        assert failover_s < 10, f"{failover_s:.1f} s: the breaker/job state was not followed"
        await wait_for(lambda: "open" in circuit_states(), 30, "the breaker to open")

        (switches_dir / "fail").unlink()
        await wait_for(lambda: circuit_states()[-1:] == ["closed"], 30, "the probe to close it")
        closed_at = time.monotonic()
        await wait_for(lambda: failovers()[-1].to_provider == "switch", 20, "failback to switch")
        failback_s = time.monotonic() - closed_at
        back = failovers()[-1]
        assert (back.from_provider, back.reason) == ("synthetic", "failback"), back
        assert "half_open" in circuit_states()
        print(
            f"failover on failure: {failover_s:.2f} s (detect 30 s); failback "
            f"{failback_s:.2f} s after the breaker closed (hysteresis 2 s); "
            f"circuit: {' > '.join(circuit_states())}"
        )
    finally:
        await stop_system(system)
        server.stop()
