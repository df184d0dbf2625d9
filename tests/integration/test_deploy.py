"""The deployment files: they validate, agree with each other, and really run the pipeline.

- `docker compose config` accepts docker-compose.yml alone and with deploy/compose.cluster.yml
  (skipped only when the docker CLI or its compose plugin is missing).
- Prometheus scrapes exactly the metrics ports compose gives the services, and the NATS exporter;
  the Dockerfile copies only what .dockerignore sends. (The Grafana dashboard is checked against
  the running services in test_observability.py.)
- deploy/nats/cluster/n*.conf start as a 3-node JetStream cluster (only ports, routes and store
  directories are overridden on the command line, to run on one machine), with the users of
  deploy/nats/accounts.conf. Each service user gets what it needs and no more: the pipeline
  replays a recorded file with one user per service and R3 streams into a store equal to the
  reference bars, with no permissions violation anywhere, while other users are refused what
  they must not do.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import pytest
import yaml
from nats.aio.client import Client as NATS
from nats.js.api import AckPolicy, ConsumerConfig

from mdp.cli import control_request, replay_file
from mdp.services.registry import SERVICES
from mdp.shared.natsserver import find_binary, free_port
from mdp.supervisor import Supervisor, scrape
from tests.conftest import DATA, wait_for
from tests.integration.test_pipeline import assert_store_matches_reference

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
CLUSTER_COMPOSE = ROOT / "deploy" / "compose.cluster.yml"
CLUSTER_ENV_EXAMPLE = ROOT / "deploy" / "cluster.env.example"
NODE_CONFS = sorted((ROOT / "deploy" / "nats" / "cluster").glob("n*.conf"))
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
STEM = "lean_equity_20131008_slice"

# `nats://<user>:${<PASSWORD VARIABLE>}@<host>:<port>` in compose.cluster.yml.
CLUSTER_URL = re.compile(
    r"nats://(?P<user>[^:@]+):\$\{(?P<var>\w+)\}@(?P<host>[^:@]+):(?P<port>\d+)"
)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


# ---------------------------------------------------------------------------------------------
# docker compose config


def docker_compose() -> list[str]:
    """The `docker compose` command, or skip saying what is missing."""
    if shutil.which("docker") is None:
        pytest.skip("the docker CLI is not installed: cannot run `docker compose config`")
    probe = subprocess.run(
        ["docker", "compose", "version"], capture_output=True, text=True, timeout=30
    )
    if probe.returncode != 0:
        pytest.skip(
            "the docker compose plugin is missing (`docker compose version` failed: "
            f"{(probe.stderr or probe.stdout or '?').strip().splitlines()[0][:200]})"
        )
    return ["docker", "compose"]


def compose_config(*files: Path, env_file: Path | None = None) -> subprocess.CompletedProcess[str]:
    command = docker_compose()
    if env_file is not None:
        command += ["--env-file", str(env_file)]
    for path in files:
        command += ["-f", str(path)]
    # Without the caller's MDP_* variables: the files and env_file alone decide.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MDP_")}
    return subprocess.run(
        [*command, "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
    )


def bind_sources(service: dict[str, Any]) -> list[Path]:
    return [Path(v["source"]) for v in service.get("volumes", []) if v.get("type") == "bind"]


def test_compose_single_node_config_is_valid() -> None:
    result = compose_config(COMPOSE)
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert set(services) == {
        *SERVICES,
        "nats",
        "nats-exporter",
        "timescaledb",
        "prometheus",
        "grafana",
    }
    assert "-js" in services["nats"]["command"]
    assert services["timescaledb"]["image"] == "timescale/timescaledb:latest-pg16"
    ports = set()
    for name in SERVICES:
        service = services[name]
        env = service["environment"]
        assert service["command"] == ["mdp", "service", name]
        assert service["restart"] == "unless-stopped"
        assert env["MDP_NATS_URL"] == "nats://nats:4222"
        assert service["depends_on"]["nats"]["condition"] == "service_healthy"
        ports.add(int(env["MDP_METRICS_PORT"]))
    assert len(ports) == len(SERVICES), "each service needs its own fixed metrics port"
    assert services["store"]["environment"]["MDP_STORE_URL"].startswith("postgresql://postgres:")
    assert services["store"]["depends_on"]["timescaledb"]["condition"] == "service_healthy"
    control = services["control"]
    published = {(p["target"], str(p["published"])) for p in control.get("ports", [])}
    http_port = int(control["environment"]["MDP_CONTROL__HTTP_PORT"])
    assert (http_port, str(http_port)) in published, "the control facade must be published"
    for name, service in services.items():
        for source in bind_sources(service):
            if "var" not in source.parts:  # ./var/replay is local state, created on demand
                assert source.exists(), f"{name} mounts {source}, which does not exist"


def test_compose_exports_nats_metrics_and_has_a_tracing_profile() -> None:
    services = load_yaml(COMPOSE)["services"]
    exporter = services["nats-exporter"]
    assert exporter["image"].startswith("natsio/prometheus-nats-exporter:")
    assert "-prefix=nats" in exporter["command"] and "-jsz=all" in exporter["command"]
    assert exporter["command"][-1] == "http://nats:8222/"
    assert "8222" in services["nats"]["command"], "the server's monitoring port"
    for name in ("otel-collector", "jaeger"):
        assert services[name]["profiles"] == ["tracing"]
    assert (ROOT / "deploy" / "otel" / "collector.yml").exists()
    config = load_yaml(ROOT / "deploy" / "otel" / "collector.yml")
    assert config["receivers"]["otlp"]["protocols"]["http"]["endpoint"].endswith(":4318")
    for name in SERVICES:
        env = services[name]["environment"]
        assert env["MDP_TRACING__ENDPOINT"] == "http://otel-collector:4318"
        assert env["MDP_TRACING__ENABLED"] == "${MDP_TRACING:-false}"  # off by default


def test_compose_cluster_config_is_valid() -> None:
    result = compose_config(COMPOSE, CLUSTER_COMPOSE, env_file=CLUSTER_ENV_EXAMPLE)
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    nodes = ["nats", "nats-2", "nats-3"]
    for node, conf in zip(nodes, NODE_CONFS, strict=True):
        assert services[node]["command"] == ["-c", f"/etc/nats/cluster/{conf.name}"]
        assert services[node]["environment"]["MDP_NATS_PASSWORD_PROVIDER"]
        assert (ROOT / "deploy" / "nats") in bind_sources(services[node])
    for name in SERVICES:
        env = services[name]["environment"]
        assert env["MDP_STREAM__REPLICAS"] == "3"
        urls = env["MDP_NATS_URL"].split(",")
        assert {u.split("@")[1] for u in urls} == {"n1:4222", "n2:4222", "n3:4222"}
        assert all(u.startswith(f"nats://{name}:") for u in urls), urls
        assert {d for d, c in services[name]["depends_on"].items()} >= set(nodes)


def test_compose_cluster_refuses_to_start_without_passwords() -> None:
    result = compose_config(COMPOSE, CLUSTER_COMPOSE)
    assert result.returncode != 0
    assert "MDP_NATS_PASSWORD_" in result.stderr


# ---------------------------------------------------------------------------------------------
# Prometheus, Grafana, Dockerfile


def compose_metrics_ports() -> dict[str, int]:
    services = load_yaml(COMPOSE)["services"]
    return {
        name: int(service["environment"]["MDP_METRICS_PORT"])
        for name, service in services.items()
        if "MDP_METRICS_PORT" in (service.get("environment") or {})
    }


def test_prometheus_scrapes_exactly_the_compose_services() -> None:
    ports = compose_metrics_ports()
    assert set(ports) == set(SERVICES)
    scraped: dict[str, set[tuple[str, int]]] = {}
    for job in load_yaml(PROMETHEUS)["scrape_configs"]:
        targets = [t for sc in job["static_configs"] for t in sc["targets"]]
        scraped[job["job_name"]] = {(t.split(":")[0], int(t.split(":")[1])) for t in targets}
    exporter = {("nats-exporter", 7777)}
    assert scraped == {"nats": exporter, **{name: {(name, port)} for name, port in ports.items()}}


def test_dockerfile_builds_a_small_non_root_service_image() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    lines = [line.strip() for line in dockerfile.splitlines() if line.strip()]
    instructions = [line for line in lines if not line.startswith("#")]
    assert [i for i in instructions if i.startswith("FROM")][-1] == "FROM python:3.11-slim"
    assert any("pip install" in i and "'.[ibkr,tracing]'" in i for i in instructions)
    user = [i for i in instructions if i.startswith("USER ")][-1].split()[1]
    assert user.split(":")[0] not in ("root", "0")
    metrics_port = re.search(r"MDP_METRICS_PORT=(\d+)", dockerfile)
    assert metrics_port and f"EXPOSE {metrics_port.group(1)}" in instructions
    cmd = json.loads([i for i in instructions if i.startswith("CMD ")][-1][4:])
    assert cmd[:2] == ["mdp", "service"] and cmd[2] in SERVICES
    # Every COPY from the build context must survive .dockerignore (an allowlist).
    allowed = {
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    for instruction in instructions:
        if instruction.startswith("COPY ") and "--from=" not in instruction:
            sources = instruction.split()[1:-1]
            for source in sources:
                path = source.rstrip("/")
                let_in = any(path == a or path.startswith(f"{a}/") for a in allowed)
                assert let_in, f"{instruction}: {source} is ignored"
                assert (ROOT / source).exists(), f"{instruction}: {source} does not exist"


# ---------------------------------------------------------------------------------------------
# The NATS cluster of deploy/nats, for real


@dataclass
class Node:
    """One nats-server running a deploy/nats/cluster/n*.conf file."""

    conf: Path
    port: int
    cluster_port: int
    http_port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def varz(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/varz", timeout=2) as r:
            data: dict[str, Any] = json.loads(r.read())
            return data


@dataclass
class Cluster:
    """The three nodes, the users' passwords, and URLs with credentials."""

    nodes: list[Node]
    passwords: dict[str, str]

    def url(self, user: str, node: int | None = None) -> str:
        """Every node's URL (or one's) with `user`'s credentials, as MDP_NATS_URL takes them."""
        password = self.passwords[user]
        nodes = self.nodes if node is None else [self.nodes[node]]
        return ",".join(f"nats://{user}:{password}@127.0.0.1:{n.port}" for n in nodes)

    def users_by_client(self) -> set[tuple[str, str]]:
        """(client name, authenticated user) of every connection, from the nodes' /connz."""
        pairs = set()
        for node in self.nodes:
            url = f"http://127.0.0.1:{node.http_port}/connz?auth=true&limit=1000"
            with urllib.request.urlopen(url, timeout=2) as r:
                for conn in json.loads(r.read()).get("connections", []):
                    pairs.add((conn.get("name", ""), conn.get("authorized_user", "")))
        return pairs

    def log_size(self) -> dict[Path, int]:
        return {n.log: n.log.stat().st_size for n in self.nodes}

    def violations_since(self, sizes: dict[Path, int]) -> list[str]:
        found = []
        for node in self.nodes:
            with node.log.open("rb") as fh:
                fh.seek(sizes.get(node.log, 0))
                text = fh.read().decode(errors="replace")
            found += [line for line in text.splitlines() if "Violation" in line]
        return found


def users_and_password_vars() -> dict[str, str]:
    """user -> password variable, from compose.cluster.yml's service URLs and accounts.conf."""
    services = load_yaml(CLUSTER_COMPOSE)["services"]
    users: dict[str, str] = {}
    for name in SERVICES:
        url = services[name]["environment"]["MDP_NATS_URL"]
        matches = [CLUSTER_URL.fullmatch(u) for u in url.split(",")]
        assert all(matches), f"compose.cluster.yml {name}: unexpected MDP_NATS_URL {url}"
        assert {m["user"] for m in matches if m} == {name}
        users[name] = next(m["var"] for m in matches if m)
    accounts = (ROOT / "deploy" / "nats" / "accounts.conf").read_text()
    for user, var in re.findall(r"user:\s*(\w+)[\s,]+password:\s*\$(\w+)", accounts):
        if user in users:
            assert users[user] == var, f"{user}: compose uses {users[user]}, accounts.conf {var}"
        users[user] = var
    return users


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """deploy/nats/cluster/n1..n3.conf as three processes on loopback, with fresh passwords."""
    assert [c.name for c in NODE_CONFS] == ["n1.conf", "n2.conf", "n3.conf"]
    base = tmp_path_factory.mktemp("deploy-cluster")
    password_vars = users_and_password_vars()
    passwords = {user: secrets.token_hex(16) for user in password_vars}
    env = {**os.environ, **{password_vars[u]: p for u, p in passwords.items()}}
    nodes = [
        Node(conf, free_port(), free_port(), free_port(), base / f"{conf.stem}.log")
        for conf in NODE_CONFS
    ]
    # nats-server refuses a store directory given both in the file and with -sd, so the files
    # run from a copy in which only `store_dir` is rewritten; everything else is passed on the
    # command line below (the include of ../accounts.conf resolves inside the copy).
    copy = base / "nats"
    shutil.copytree(ROOT / "deploy" / "nats", copy)
    for node in nodes:
        node.conf = copy / "cluster" / node.conf.name
        text, count = re.subn(
            r"store_dir: \S+", f"store_dir: {base / node.conf.stem}", node.conf.read_text()
        )
        assert count == 1, f"{node.conf.name}: expected one store_dir"
        node.conf.write_text(text)
    binary = str(find_binary())
    try:
        for node in nodes:
            routes = ",".join(f"nats://127.0.0.1:{n.cluster_port}" for n in nodes if n is not node)
            # Only what must differ on one machine: addresses, ports and routes. Server names,
            # the cluster name, JetStream and the accounts come from the file.
            args = [
                binary, "-c", str(node.conf), "-a", "127.0.0.1", "-p", str(node.port),
                "-m", str(node.http_port), "--cluster", f"nats://127.0.0.1:{node.cluster_port}",
                "--routes", routes,
            ]  # fmt: skip
            with node.log.open("ab") as log:  # the child keeps its own handle
                node.proc = subprocess.Popen(
                    args, env=env, stdout=log, stderr=log, start_new_session=True
                )
        deadline = time.monotonic() + 20
        for node in nodes:
            while True:
                assert node.proc is not None
                if node.proc.poll() is not None:
                    raise AssertionError(f"{node.conf.name} exited: {node.log.read_text()[-2000:]}")
                with contextlib.suppress(OSError):
                    node.varz()
                    break
                assert time.monotonic() < deadline, f"{node.conf.name} did not start"
                time.sleep(0.05)
        yield Cluster(nodes, passwords)
    finally:
        for node in nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.proc.terminate()
        for node in nodes:
            if node.proc is not None:
                try:
                    node.proc.wait(10)
                except subprocess.TimeoutExpired:
                    node.proc.kill()
                    node.proc.wait()


@dataclass
class Client:
    """A connection as one user that records what the server refused (via `error_cb`)."""

    nc: NATS
    errors: list[str]

    async def refused(self, action: Callable[[], Awaitable[Any]]) -> list[str]:
        """The permission errors `action` caused (the server answers them before the PONG)."""
        before = len(self.errors)
        await action()
        # nats-py writes a PING straight to the socket, ahead of its buffered commands: the
        # first flush sends the action out, the second PONG follows the server's answer to it.
        await self.nc.flush(timeout=5)
        await self.nc.flush(timeout=5)
        return [e for e in self.errors[before:] if "permissions violation" in e.lower()]


async def connect(url: str, name: str, inbox_prefix: str | None = None) -> Client:
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    options: dict[str, Any] = {"inbox_prefix": inbox_prefix} if inbox_prefix else {}
    nc = await nats.connect(
        url.split(","), name=name, error_cb=on_error, max_reconnect_attempts=-1, **options
    )
    return Client(nc, errors)


async def jetstream_ready(client: Client) -> None:
    async def ready() -> bool:
        try:
            await client.nc.jetstream().account_info()
            return True
        except Exception:
            return False

    await wait_for(ready, 30, "the cluster's JetStream meta leader")


@pytest.mark.integration
async def test_cluster_nodes_run_the_deploy_configs(cluster: Cluster) -> None:
    """Names, cluster and JetStream come from the files; the three nodes are routed together."""
    for node in cluster.nodes:
        varz = node.varz()
        assert varz["server_name"] == node.conf.stem
        assert varz["cluster"]["name"] == "mdp"
        assert varz["jetstream"]["config"]["store_dir"].startswith(str(node.log.parent))

    async def routed() -> bool:
        return all(len(n.varz()["cluster"].get("urls", [])) == 2 for n in cluster.nodes) and all(
            _routes(n) >= 2 for n in cluster.nodes
        )

    await wait_for(routed, 20, "every node routed to the other two")
    monitor = await connect(cluster.url("monitor"), "test-monitor", "_INBOX.monitor")
    try:
        await jetstream_ready(monitor)
    finally:
        await monitor.nc.close()


def _routes(node: Node) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/routez", timeout=2) as r:
        return int(json.loads(r.read())["num_routes"])


@pytest.mark.integration
async def test_users_get_what_they_need_and_are_refused_the_rest(cluster: Cluster) -> None:
    # All on one node: a subscription reaches the other nodes only some time after its flush.
    admin = await connect(cluster.url("admin", 0), "test-admin")
    provider = await connect(cluster.url("provider", 0), "test-provider", "_INBOX.mdp-provider")
    router = await connect(cluster.url("router", 0), "test-router", "_INBOX.mdp-router")
    app = await connect(cluster.url("app", 0), "test-app", "_INBOX.app")
    monitor = await connect(cluster.url("monitor", 0), "test-monitor", "_INBOX.monitor")
    clients = [admin, provider, router, app, monitor]
    try:
        seen: list[str] = []

        async def record(msg: Any) -> None:
            seen.append(msg.subject)

        await admin.nc.subscribe("md.>", cb=record)
        await admin.nc.flush()

        # provider: publishes raw ticks, nothing downstream of it.
        assert not await provider.refused(lambda: provider.nc.publish("md.raw.x.Y", b"{}"))
        assert await provider.refused(lambda: provider.nc.publish("md.bars.1m.X", b"{}"))
        assert await provider.refused(lambda: provider.nc.publish("md.quotes.X", b"{}"))
        assert await provider.refused(lambda: provider.nc.subscribe("md.raw.>"))
        await wait_for(lambda: "md.raw.x.Y" in seen, 5, "the provider's tick at the admin")
        # ... and keeps the pacing budgets in mdp_checkpoints (rate.<provider>); nobody else.
        rate_key = "$KV.mdp_checkpoints.rate.x"
        assert not await provider.refused(lambda: provider.nc.publish(rate_key, b"{}"))
        assert await router.refused(lambda: router.nc.publish(rate_key, b"{}"))

        # router: publishes quotes; cannot read or write another service's inbox.
        assert not await router.refused(lambda: router.nc.publish("md.quotes.Y", b"{}"))
        assert await router.refused(lambda: router.nc.publish("md.raw.x.Y", b"{}"))
        assert await router.refused(lambda: router.nc.subscribe("_INBOX.mdp-aggregator.>"))
        assert await router.refused(
            lambda: router.nc.publish("_INBOX.mdp-aggregator.forged", b"{}")
        )

        # app: reads the public feeds, publishes nothing, sees nothing else.
        bars: list[str] = []

        async def on_bar(msg: Any) -> None:
            bars.append(msg.subject)

        assert not await app.refused(lambda: app.nc.subscribe("md.bars.>", cb=on_bar))
        assert not await app.refused(lambda: app.nc.subscribe("md.quotes.>"))
        await admin.nc.publish("md.bars.1m.AAPL", b"{}")
        await wait_for(lambda: bars == ["md.bars.1m.AAPL"], 5, "the bar at the app")
        assert await app.refused(lambda: app.nc.publish("md.bars.1m.AAPL", b"{}"))
        assert await app.refused(lambda: app.nc.subscribe("md.raw.>"))
        assert await app.refused(lambda: app.nc.subscribe("_INBOX.mdp-router.>"))
        assert await app.refused(lambda: app.nc.publish("ingest.control.start", b"{}"))
        assert await app.refused(
            lambda: app.nc.publish("$JS.API.CONSUMER.DELETE.MD_QUOTES.aggregator", b"")
        )

        # monitor: reads state, changes nothing.
        await jetstream_ready(monitor)
        assert not await monitor.refused(lambda: monitor.nc.publish("ingest.control.status", b""))
        assert await monitor.refused(lambda: monitor.nc.publish("ingest.control.stop", b""))
        assert await monitor.refused(
            lambda: monitor.nc.publish("$JS.API.STREAM.DELETE.MD_RAW", b"")
        )

        # Only what the services published (not the refused ones) reached the admin.
        await admin.nc.flush()
        assert "md.bars.1m.X" not in seen and "md.quotes.X" not in seen
        assert seen.count("md.raw.x.Y") == 1 and "md.quotes.Y" in seen
    finally:
        for client in clients:
            await client.nc.close()

    for user, password in (("provider", "wrong"), ("nobody", "x")):
        url = f"nats://{user}:{password}@127.0.0.1:{cluster.nodes[0].port}"
        with pytest.raises(Exception, match=r"(?i)authorization"):
            await nats.connect(url, allow_reconnect=False, connect_timeout=2)


@pytest.mark.integration
async def test_pipeline_runs_on_the_cluster_with_one_user_per_service(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The pipeline with one user per service and R3 streams: complete, and refused nothing."""
    replicas = {
        load_yaml(CLUSTER_COMPOSE)["services"][name]["environment"]["MDP_STREAM__REPLICAS"]
        for name in SERVICES
    }
    assert replicas == {"3"}
    admin = await connect(cluster.url("admin"), "test-admin")
    await jetstream_ready(admin)
    logs_before = cluster.log_size()
    store_url = f"sqlite:///{tmp_path / 'bars.db'}"
    sup = PerServiceUsers(
        data_dir=tmp_path / "pipeline",
        store_url=store_url,
        nats_url=cluster.url("admin"),  # for the supervisor's readiness checks
        env={"MDP_STREAM__REPLICAS": replicas.pop()},
        say=print,
        service_urls={name: cluster.url(name) for name in SERVICES},
    )
    sup.start()
    try:
        await sup.wait_ready(45)
        # Each service really connected as its own user.
        assert {(f"mdp-{name}", name) for name in SERVICES} <= cluster.users_by_client()
        js = admin.nc.jetstream()
        assert (await js.stream_info("MD_QUOTES")).config.num_replicas == 3

        result = await replay_file(admin.nc, DATA / f"{STEM}.ticks.csv.gz", "max", timeout=60)
        assert result["ticks"] == 22_734
        await assert_store_matches_reference(store_url, STEM)

        # A live dry run: synthetic ticks, bars suppressed by the aggregator and counted by
        # control from ingest.events.suppressed (its consumer on MD_EVENTS).
        reply = await control_request(
            admin.nc,
            "start",
            {"provider": "synthetic", "symbols": ["AAPL"], "dry_run": True, "job": "live"},
        )
        assert reply["ok"], reply

        async def suppressed() -> bool:
            totals = await scrape(admin.nc, "control", ["ingest_writes_suppressed_total"])
            return totals["ingest_writes_suppressed_total"] > 0

        await wait_for(suppressed, 20, "a suppressed write counted by control")
        assert (await control_request(admin.nc, "stop", {"job": "live"}))["ok"]
        assert (await control_request(admin.nc, "reload", {}))["ok"]

        # The monitor user: the services answer its inbox (status, discovery, readiness).
        monitor = await connect(cluster.url("monitor"), "test-monitor", "_INBOX.monitor")
        try:
            status = json.loads(
                (await monitor.nc.request("ingest.control.status", b"", timeout=5)).data
            )
            assert status["ok"] and status["policy_revision"] >= 2
            for name in SERVICES:
                info = await monitor.nc.request(f"$SRV.INFO.mdp-{name}", b"", timeout=5)
                assert json.loads(info.data)["name"] == f"mdp-{name}"
                await monitor.nc.request(f"mdp.ready.{name}", b"", timeout=5)
            assert not [e for e in monitor.errors if "violation" in e.lower()], monitor.errors
        finally:
            await monitor.nc.close()

        # The app user's durable bar feed: its own consumer on MD_BARS.
        app = await connect(cluster.url("app"), "test-app", "_INBOX.app")
        try:
            app_js = app.nc.jetstream()
            await app_js.add_consumer(
                "MD_BARS",
                ConsumerConfig(durable_name="app-bars", ack_policy=AckPolicy.EXPLICIT),
            )
            feed = await app_js.pull_subscribe_bind("app-bars", stream="MD_BARS")
            msgs = await feed.fetch(10, timeout=5)
            assert msgs and all(m.subject.startswith("md.bars.") for m in msgs)
            for msg in msgs:
                await msg.ack()
            await app.nc.flush()
            assert not [e for e in app.errors if "violation" in e.lower()], app.errors
        finally:
            await app.nc.close()
    finally:
        codes = sup.stop()
        await admin.nc.close()
    assert all(code == 0 for code in codes.values()), codes

    violations = cluster.violations_since(logs_before)
    assert not violations, "permissions violations:\n" + "\n".join(violations[:20])
    for name in SERVICES:
        log = (sup.log_dir / f"{name}.log").read_text()
        assert "ermissions violation" not in log, f"{name} was refused something: see {log}"


@dataclass
class PerServiceUsers(Supervisor):
    """The supervisor, but each service connects with its own URL (its own NATS user)."""

    service_urls: dict[str, str] = field(default_factory=dict)

    def spawn(self, name: str) -> None:
        self.env = {**self.env, "MDP_NATS_URL": self.service_urls[name]}
        super().spawn(name)
