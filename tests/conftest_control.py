"""Helpers and module-scoped fixtures for the control and store-mode tests.

One nats-server and one set of service processes per test module keeps these tests fast; the
tests of a module share them and each cleans up the jobs it started. Import the fixtures into a
test module explicitly: `from tests.conftest_control import control_system_fixture  # noqa: F401`
(the functions are named `<fixture>_fixture`, so parameters do not shadow the import).
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS
from prometheus_client.parser import text_string_to_metric_families

from mdp.shared.natsserver import EmbeddedNats
from mdp.supervisor import Supervisor
from tests.conftest import wait_for

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Reply:
    """A control reply with the NATS micro error headers."""

    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def code(self) -> str | None:
        """The error code, None on success."""
        return None if self.body.get("ok") else self.body["error"]["code"]


@dataclass
class System:
    """A nats-server, some services as subprocesses, and their config directory."""

    server: EmbeddedNats
    sup: Supervisor
    config_dir: Path
    nc: NATS

    async def request(self, verb: str, body: Any = b"", timeout: float = 10) -> Reply:
        """One `ingest.control.<verb>` request (a dict is sent as JSON, bytes as they are)."""
        data = body if isinstance(body, bytes) else msgspec.json.encode(body)
        msg = await self.nc.request(f"ingest.control.{verb}", data, timeout=timeout)
        return Reply(msgspec.json.decode(msg.data), dict(msg.headers or {}))

    async def ok(self, verb: str, body: Any = b"") -> dict[str, Any]:
        """A request that must succeed."""
        reply = await self.request(verb, body)
        assert reply.body.get("ok") is True, reply.body
        return reply.body

    async def kv(self, bucket: str, key: str) -> Any:
        """The JSON value of a KV key, None when absent."""
        kv = await self.nc.jetstream().key_value(bucket)
        try:
            entry = await kv.get(key)
        except Exception:
            return None
        return msgspec.json.decode(entry.value) if entry.value else None

    async def metrics(self, service: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of a service's `/metrics`, keyed by (name, sorted labels)."""
        info = await self.nc.request(f"$SRV.INFO.mdp-{service}", b"", timeout=2)
        port = msgspec.json.decode(info.data)["metadata"]["metrics_port"]

        def fetch() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
                return str(resp.read().decode())

        text = await asyncio.to_thread(fetch)
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples

    async def metric(self, service: str, name: str, **labels: str) -> float:
        """One sample (0 when absent)."""
        samples = await self.metrics(service)
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    def write_config(self, name: str, text: str) -> None:
        """Replace one config file of this system."""
        (self.config_dir / name).write_text(text)

    def log_lines(self, service: str) -> list[dict[str, Any]]:
        """The JSON log records of a service so far."""
        path = self.sup.log_dir / f"{service}.log"
        records = []
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue
        return records

    def log_tail(self, *services: str, lines: int = 40) -> str:
        """The last lines each service logged: what a failing assertion shows."""
        parts = []
        for service in services:
            path = self.sup.log_dir / f"{service}.log"
            text = path.read_text(errors="replace") if path.exists() else ""
            parts.append(f"--- {service}.log\n" + "\n".join(text.splitlines()[-lines:]))
        return "\n".join(parts)

    def spawn_provider(self, log: Path, adapters: str | None = None) -> subprocess.Popen[bytes]:
        """One more provider process (hosting only `adapters` when given), as a child would be."""
        env = self.sup.child_env()
        if adapters is not None:
            env["MDP_PROVIDER__ADAPTERS"] = adapters
        with log.open("ab") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "mdp.services.provider"],
                env=env,
                stdout=out,
                stderr=out,
                cwd=REPO,
            )

    async def wait_policy_seen(self, service: str, revision: int) -> None:
        """Wait until `service` logged that it follows policy `revision`."""

        def seen() -> bool:
            for record in self.log_lines(service):
                if record.get("event") != "policy":
                    continue
                rev = record.get("revision", (record.get("policy") or {}).get("revision"))
                if rev == revision:
                    return True
            return False

        await wait_for(seen, 15, f"{service} to follow policy revision {revision}")

    async def restart(self, service: str, hard: bool = True) -> None:
        """Kill (-9 when `hard`) and start a service again; wait until it answers."""
        child = self.sup.children[service]
        assert child.proc is not None
        child.proc.send_signal(signal.SIGKILL if hard else signal.SIGTERM)
        child.proc.wait(30)
        self.sup.spawn(service)
        await self.sup.wait_ready()


@pytest.fixture(scope="module", name="module_nats")
def module_nats_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    """A nats-server shared by the tests of one module."""
    tmp = tmp_path_factory.mktemp("nats")
    server = EmbeddedNats(tmp / "nats", log_file=tmp / "nats-server.log")
    server.start()
    yield server
    server.stop()


def default_configs(directory: Path) -> Path:
    """A config directory holding copies of the shipped files."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("data_providers.yaml", "ingestion_policy.yaml"):
        (directory / name).write_text((REPO / "mdp" / "configs" / name).read_text())
    return directory


async def start_system(
    server: EmbeddedNats,
    tmp: Path,
    services: tuple[str, ...],
    env: dict[str, str] | None = None,
    store_url: str | None = None,
    configs: dict[str, str] | None = None,
) -> System:
    """Start `services` against `server` with a private config directory.

    `configs` replaces shipped config files by name before anything starts.
    """
    config_dir = default_configs(tmp / "configs")
    for name, text in (configs or {}).items():
        (config_dir / name).write_text(text)
    sup = Supervisor(
        data_dir=tmp / "pipeline",
        store_url=store_url or f"sqlite:///{tmp / 'mdp.db'}",
        nats_url=server.url,
        services=services,
        env={"MDP_LOG_LEVEL": "INFO", "MDP_CONFIG_DIR": str(config_dir), **(env or {})},
        say=print,
    )
    sup.start()
    try:
        await sup.wait_ready()
    except BaseException:
        sup.stop()
        raise
    nc = await nats.connect(server.url)
    return System(server, sup, config_dir, nc)


async def stop_system(system: System) -> None:
    """Stop every process; each must exit 0."""
    await system.nc.close()
    codes = system.sup.stop()
    bad = {name: code for name, code in codes.items() if code != 0}
    assert not bad, f"services did not stop cleanly: {bad} (logs in {system.sup.log_dir})"


@pytest.fixture(scope="module", name="control_system")
async def control_system_fixture(
    module_nats: EmbeddedNats, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[System]:
    """Control and provider (enough for the whole control protocol), HTTP token `s3cret`."""
    system = await start_system(
        module_nats,
        tmp_path_factory.mktemp("control"),
        ("provider", "control"),
        env={"MDP_CONTROL__HTTP_TOKEN": "s3cret"},
    )
    yield system
    await stop_system(system)
