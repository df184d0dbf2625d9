"""deploy/k8s/: the kustomizations render, validate offline, and say what they must.

- tests/k8s_render.py renders base, nats and both overlays (no kustomize binary here); its
  subset of kustomize is tested below on small kustomizations.
- Every rendered object validates with kubernetes-validate against the bundled Kubernetes
  KUBERNETES_VERSION schemas in strict mode (unknown fields fail), with network access
  blocked. The ServiceMonitor (a CRD, no schema bundled) is checked field by field.
- Deployments: both probes on the metrics port, resources, the Dockerfile's non-root user, a
  read-only root filesystem, every $(VAR) defined, MDP_NATS_URL naming every NATS pod with the
  service's own user of deploy/nats/accounts.conf. Every Secret they or NATS use is rendered
  or listed in deploy/k8s/secrets.example.yaml (which the README documents).
- NATS: routes equal the StatefulSet's pods, nats-server itself accepts the rendered config,
  the accounts Secret equals deploy/nats/accounts.conf; the Helm values say the same.
- Overlays: single-node is R1 with one of everything; cluster is R3 with 3 NATS nodes and two
  replicas of aggregator, store and control only.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from mdp.services.registry import SERVICES
from mdp.shared.natsserver import find_binary
from tests.k8s_render import KustomizeError, load_documents, render, secret_data

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
ACCOUNTS = ROOT / "deploy" / "nats" / "accounts.conf"
HELM_VALUES = K8S / "nats-helm-values.yaml"
SECRETS_EXAMPLE = K8S / "secrets.example.yaml"
README = K8S / "README.md"
# Pinned: kubernetes-validate bundles schemas for several releases; this is the one we target.
KUBERNETES_VERSION = "1.31"
TREES = ["base", "nats", "overlays/single-node", "overlays/cluster"]
STACKS = ["overlays/single-node", "overlays/cluster"]
METRICS_PORT = 9100
UID = 10001
VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")

Obj = dict[str, Any]


def rendered(tree: str) -> list[Obj]:
    """The objects of deploy/k8s/<tree>."""
    return render(K8S / tree)


def only(objs: list[Obj], kind: str, name: str) -> Obj:
    """The one object of that kind and name."""
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def of_kind(objs: list[Obj], kind: str) -> list[Obj]:
    """Every object of a kind."""
    return [o for o in objs if o["kind"] == kind]


def container(deployment: Obj) -> Obj:
    """The Deployment's only container."""
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


# ---------------------------------------------------------------------------------------------
# NATS configuration files (the subset of the format deploy/nats and deploy/k8s use)

# A bare word may hold a colon not followed by a blank (`nats://host:6222`, `0.0.0.0:4222`).
TOKEN = re.compile(r'\s+|#[^\n]*|"(?:[^"\\]|\\.)*"|(?:[^\s{}\[\]:=,#"]|:(?=\S))+|[{}\[\]:=,]')


def parse_nats_conf(text: str) -> Obj:
    """A NATS server config (maps, lists, strings; no includes) as Python data."""
    tokens = [t for t in TOKEN.findall(text) if t.strip() and not t.startswith("#")]
    pos = 0

    def value() -> Any:
        nonlocal pos
        token = tokens[pos]
        pos += 1
        if token == "{":
            return mapping("}")
        if token == "[":
            items = []
            while tokens[pos] != "]":
                if tokens[pos] == ",":
                    pos += 1
                    continue
                items.append(value())
            pos += 1
            return items
        return token[1:-1] if token.startswith('"') else token

    def mapping(end: str | None) -> Obj:
        nonlocal pos
        out: Obj = {}
        while pos < len(tokens) and tokens[pos] != end:
            if tokens[pos] == ",":
                pos += 1
                continue
            key = tokens[pos].strip('"')
            pos += 1
            if key == "include":
                out.setdefault("include", []).append(tokens[pos])
                pos += 1
                continue
            if tokens[pos] in (":", "="):
                pos += 1
            out[key] = value()
        pos += 1
        return out

    return mapping(None)


def account_users() -> dict[str, Obj]:
    """The users of deploy/nats/accounts.conf, by name."""
    accounts = parse_nats_conf(ACCOUNTS.read_text())["accounts"]
    return {u["user"]: u for account in accounts.values() for u in account["users"]}


def test_nats_conf_parser_reads_the_accounts_file() -> None:
    users = account_users()
    assert set(SERVICES) <= set(users)
    assert {"admin", "monitor", "app", "sys"} <= set(users)
    assert users["router"]["permissions"]["publish"]["allow"][0] == "md.quotes.*"
    assert users["sys"]["password"] == "$MDP_NATS_PASSWORD_SYS"
    conf = parse_nats_conf('a: 1\nb { c: [x, "y z", nats://h:1] } # c\ninclude ./f.conf\n')
    assert conf == {"a": "1", "b": {"c": ["x", "y z", "nats://h:1"]}, "include": ["./f.conf"]}


# ---------------------------------------------------------------------------------------------
# the renderer itself


def write(root: Path, files: dict[str, str]) -> Path:
    """Write a kustomization tree under root."""
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


DEPLOY = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 1
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      tolerations: [{key: a, operator: Exists}]
      containers:
        - name: web
          image: web:1
          args: [a, b]
          env: [{name: A, value: "1"}, {name: B, value: "2"}]
"""


def test_renderer_applies_the_supported_kustomize_features(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "base/kustomization.yaml": """
namespace: ns
labels: [{pairs: {team: x}, includeTemplates: true}]
resources: [deploy.yaml]
generatorOptions: {disableNameSuffixHash: true}
configMapGenerator:
  - {name: env, literals: [K=1, L=2]}
  - {name: files, files: [conf.txt, renamed=conf.txt]}
secretGenerator:
  - {name: s, literals: [p=pw]}
""",
            "base/deploy.yaml": DEPLOY,
            "base/conf.txt": "hello\n",
            "over/kustomization.yaml": """
namespace: ns
resources: [../base]
generatorOptions: {disableNameSuffixHash: true}
configMapGenerator:
  - {name: env, behavior: merge, literals: [K=9]}
  - {name: files, behavior: replace, literals: [only=1]}
patches:
  - path: smp.yaml
  - target: {kind: Deployment, name: web}
    patch: |-
      - {op: replace, path: /spec/template/spec/containers/0/args, value: [c]}
      - {op: add, path: /spec/paused, value: true}
      - {op: remove, path: /spec/revisionHistoryLimit}
replicas: [{name: web, count: 3}]
images: [{name: web, newName: reg/web, newTag: "2"}]
""",
            "over/smp.yaml": """
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  revisionHistoryLimit: 2
  template:
    spec:
      containers:
        - name: web
          env: [{name: B, value: "3"}, {name: C, value: "4"}]
""",
        },
    )
    objs = render(tmp_path / "over")
    deploy = only(objs, "Deployment", "web")
    assert deploy["metadata"] == {"name": "web", "namespace": "ns", "labels": {"team": "x"}}
    assert deploy["spec"]["template"]["metadata"]["labels"] == {"app": "web", "team": "x"}
    assert deploy["spec"]["selector"] == {"matchLabels": {"app": "web"}}  # no includeSelectors
    assert deploy["spec"]["replicas"] == 3
    assert deploy["spec"]["paused"] is True
    assert "revisionHistoryLimit" not in deploy["spec"]  # SMP added it, JSON6902 removed it
    web = container(deploy)
    assert web["image"] == "reg/web:2"
    assert web["args"] == ["c"]
    assert web["env"] == [
        {"name": "A", "value": "1"},
        {"name": "B", "value": "3"},
        {"name": "C", "value": "4"},
    ]
    assert only(objs, "ConfigMap", "env")["data"] == {"K": "9", "L": "2"}
    assert only(objs, "ConfigMap", "files")["data"] == {"only": "1"}
    files = only(render(tmp_path / "base"), "ConfigMap", "files")
    assert files["data"] == {"conf.txt": "hello\n", "renamed": "hello\n"}
    assert secret_data(only(objs, "Secret", "s")) == {"p": "pw"}


@pytest.mark.parametrize(
    ("kustomization", "message"),
    [
        ("resources: [../outside.yaml]", "outside"),
        ("commonAnnotations: {a: b}", "not supported"),
        ("configMapGenerator: [{name: x, literals: [a=b]}]", "hashes"),
        ("labels: [{pairs: {a: b}, includeSelectors: true}]", "not supported"),
        ("resources: [d.yaml, d.yaml]", "twice"),
        ("resources: [d.yaml]\nreplicas: [{name: nope, count: 2}]", "no workload"),
        (
            "resources: [d.yaml]\npatches: [{target: {kind: Deployment, name: nope}, "
            "patch: '[{op: remove, path: /spec}]'}]",
            "matches 0",
        ),
        (
            "resources: [d.yaml]\npatches: [{patch: 'apiVersion: apps/v1\n\nkind: Deployment\n\n"
            "metadata: {name: web}\n\nspec: {template: {spec: {tolerations: [{key: k}]}}}'}]",
            "no merge key",
        ),
    ],
)
def test_renderer_refuses_what_it_does_not_implement(
    tmp_path: Path, kustomization: str, message: str
) -> None:
    write(
        tmp_path,
        {"outside.yaml": DEPLOY, "k/kustomization.yaml": kustomization, "k/d.yaml": DEPLOY},
    )
    with pytest.raises(KustomizeError, match=message):
        render(tmp_path / "k")


# ---------------------------------------------------------------------------------------------
# schemas, offline


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Any socket connection fails: validation must use the bundled schemas only."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield


def validate(obj: Obj) -> None:
    """kubernetes-validate, strict, at KUBERNETES_VERSION (fails with the path of the error)."""
    try:
        version = kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        location = "/".join(str(p) for p in exc.path)
        pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message} at {location}")
    assert version == KUBERNETES_VERSION, f"no bundled {KUBERNETES_VERSION} schemas ({version})"


def test_strict_validation_rejects_unknown_fields(no_network: None) -> None:
    deploy = yaml.safe_load(DEPLOY)
    validate(deploy)
    deploy["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="livenesProbe"):
        kubernetes_validate.validate(deploy, KUBERNETES_VERSION, strict=True)


def check_service_monitor(monitor: Obj, objs: list[Obj]) -> list[Obj]:
    """A ServiceMonitor's required structure; returns the Services it selects."""
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    assert monitor["metadata"]["name"]
    spec = monitor["spec"]
    assert set(spec) <= {"jobLabel", "selector", "endpoints", "namespaceSelector"}
    assert "namespaceSelector" not in spec, "selects Services of its own namespace"
    labels = spec["selector"]["matchLabels"]
    assert labels and set(spec["selector"]) == {"matchLabels"}
    assert spec["endpoints"], "at least one endpoint"
    ports = set()
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}
        assert isinstance(endpoint["port"], str) and endpoint["path"].startswith("/")
        ports.add(endpoint["port"])
    selected = [
        s
        for s in of_kind(objs, "Service")
        if s["metadata"]["namespace"] == monitor["metadata"]["namespace"]
        and labels.items() <= s["metadata"].get("labels", {}).items()
    ]
    assert selected, f"ServiceMonitor {monitor['metadata']['name']} selects no Service"
    for service in selected:
        names = {p["name"] for p in service["spec"]["ports"]}
        assert ports <= names, f"{service['metadata']['name']} has no port {ports - names}"
        if "jobLabel" in spec:
            assert spec["jobLabel"] in service["metadata"]["labels"]
    return selected


@pytest.mark.parametrize("tree", TREES)
def test_every_object_validates_offline(tree: str, no_network: None) -> None:
    objs = rendered(tree)
    assert objs
    for obj in objs:
        if obj["kind"] == "ServiceMonitor":
            check_service_monitor(obj, objs)
        else:
            validate(obj)
    for obj in load_documents(SECRETS_EXAMPLE):
        validate(obj)


# ---------------------------------------------------------------------------------------------
# the services


def env_of(objs: list[Obj], spec: Obj) -> dict[str, str]:
    """A container's environment as Kubernetes builds it: envFrom, then env with $(VAR)s."""
    env: dict[str, str] = {}
    for source in spec.get("envFrom", []):
        env.update(only(objs, "ConfigMap", source["configMapRef"]["name"])["data"])
    for entry in spec.get("env", []):
        if "value" in entry:
            undefined = set(VAR.findall(entry["value"])) - set(env)
            assert not undefined, f"{entry['name']} uses undefined {undefined}"
            env[entry["name"]] = VAR.sub(lambda m: env[m.group(1)], entry["value"])
        else:
            ref = entry["valueFrom"].get("secretKeyRef")
            env[entry["name"]] = f"<secret {ref['name']}/{ref['key']}>" if ref else "<field>"
    return env


def nats_replicas(objs: list[Obj]) -> int:
    """The NATS StatefulSet's replicas (3 for base, which the Helm chart completes)."""
    sets = of_kind(objs, "StatefulSet")
    return int(sets[0]["spec"]["replicas"]) if sets else 3


@pytest.mark.parametrize("tree", ["base", *STACKS])
def test_deployments_probe_limit_and_drop_privileges(tree: str) -> None:
    objs = rendered(tree)
    deployments = {d["metadata"]["name"]: d for d in of_kind(objs, "Deployment")}
    assert set(deployments) == {f"mdp-{s}" for s in SERVICES}
    for name in SERVICES:
        deployment = deployments[f"mdp-{name}"]
        pod = deployment["spec"]["template"]["spec"]
        main = container(deployment)
        env = env_of(objs, main)
        assert main["image"] == "mdp:latest"
        assert main["command"] == ["mdp", "service", name]
        assert int(env["MDP_METRICS_PORT"]) == METRICS_PORT
        ports = {p["name"]: p["containerPort"] for p in main["ports"]}
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            get = main[probe]["httpGet"]
            assert get["path"] == path, f"{name} {probe}"
            assert ports.get(get["port"], get["port"]) == METRICS_PORT, f"{name} {probe} port"
        for kind in ("requests", "limits"):
            assert set(main["resources"][kind]) == {"cpu", "memory"}, f"{name} {kind}"
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True
        assert security["runAsUser"] == UID and security["runAsGroup"] == UID
        assert main["securityContext"]["readOnlyRootFilesystem"] is True
        assert main["securityContext"]["allowPrivilegeEscalation"] is False
        assert main["securityContext"]["capabilities"]["drop"] == ["ALL"]
        mounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
        assert mounts[env["MDP_CONFIG_DIR"]] == "configs"
        volumes = {v["name"]: v for v in pod["volumes"]}
        configs = only(objs, "ConfigMap", volumes["configs"]["configMap"]["name"])
        assert set(configs["data"]) == {"data_providers.yaml", "ingestion_policy.yaml"}
        assert all("emptyDir" in volumes[mounts[p]] for p in mounts if p != env["MDP_CONFIG_DIR"])
        labels = pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        assert labels["app.kubernetes.io/part-of"] == "mdp"


def test_shipped_configs_equal_the_repository_ones() -> None:
    for name in ("data_providers.yaml", "ingestion_policy.yaml"):
        copy = K8S / "base" / "configs" / name
        assert copy.read_text() == (ROOT / "mdp" / "configs" / name).read_text(), f"{copy} is stale"
    assert (K8S / "nats" / "accounts.conf").read_text() == ACCOUNTS.read_text()


@pytest.mark.parametrize("tree", ["base", *STACKS])
def test_each_service_connects_to_every_nats_pod_as_its_own_user(tree: str) -> None:
    objs = rendered(tree)
    users = account_users()
    hosts = [f"mdp-nats-{i}.mdp-nats-headless:4222" for i in range(nats_replicas(objs))]
    for name in SERVICES:
        main = container(only(objs, "Deployment", f"mdp-{name}"))
        env = env_of(objs, main)
        user = env["NATS_USER"]
        assert user == name and user in users, f"{name} connects as {user}"
        assert users[user]["password"] == f"$MDP_NATS_PASSWORD_{user.upper()}"
        assert env["NATS_PASSWORD"] == f"<secret mdp-nats-{user}/password>"
        urls = env["MDP_NATS_URL"].split(",")
        password = "<secret mdp-nats-" + user + "/password>"
        assert urls == [f"nats://{user}:{password}@{host}" for host in hosts]
    store = env_of(objs, container(only(objs, "Deployment", "mdp-store")))
    assert store["MDP_STORE_URL"] == "<secret mdp-store/url>"
    control = env_of(objs, container(only(objs, "Deployment", "mdp-control")))
    assert control["MDP_CONTROL__HTTP_HOST"] == "0.0.0.0"
    assert control["MDP_CONTROL__HTTP_TOKEN"] == "<secret mdp-control/http-token>"
    others = [d for d in of_kind(objs, "Deployment") if d["metadata"]["name"] != "mdp-store"]
    assert all("MDP_STORE_URL" not in env_of(objs, container(d)) for d in others)


def secret_references(objs: list[Obj]) -> set[tuple[str, str | None]]:
    """Every (Secret, key) a pod template uses; key None for a whole Secret."""
    refs: set[tuple[str, str | None]] = set()
    for obj in objs:
        if obj["kind"] not in ("Deployment", "StatefulSet"):
            continue
        pod = obj["spec"]["template"]["spec"]
        for c in pod["containers"] + pod.get("initContainers", []):
            for entry in c.get("env", []):
                ref = entry.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    refs.add((ref["name"], ref["key"]))
            for source in c.get("envFrom", []):
                if "secretRef" in source:
                    refs.add((source["secretRef"]["name"], None))
        for volume in pod.get("volumes", []):
            if "secret" in volume:
                refs.add((volume["secret"]["secretName"], None))
            for source in volume.get("projected", {}).get("sources", []):
                if "secret" in source:
                    refs.add((source["secret"]["name"], None))
    return refs


@pytest.mark.parametrize("tree", TREES)
def test_every_secret_is_rendered_or_documented(tree: str) -> None:
    objs = rendered(tree)
    rendered_secrets = {s["metadata"]["name"]: secret_data(s) for s in of_kind(objs, "Secret")}
    documented = {s["metadata"]["name"]: s["stringData"] for s in load_documents(SECRETS_EXAMPLE)}
    assert not set(rendered_secrets) & set(documented)
    readme = README.read_text()
    for name, key in secret_references(objs):
        data = rendered_secrets.get(name, documented.get(name))
        assert data is not None, f"Secret {name} is neither rendered nor in {SECRETS_EXAMPLE.name}"
        assert key is None or key in data, f"Secret {name} has no key {key}"
        if name in documented:
            assert f"`{name}`" in readme, f"README does not document the Secret {name}"


def test_documented_secrets_are_all_used() -> None:
    used = {name for tree in STACKS for name, _ in secret_references(rendered(tree))}
    for secret in load_documents(SECRETS_EXAMPLE):
        assert secret["metadata"]["name"] in used, f"{secret['metadata']['name']} is unused"
        assert secret["metadata"]["namespace"] == "mdp"
        assert "data" not in secret, "stringData placeholders only"


# ---------------------------------------------------------------------------------------------
# services, budgets, monitoring


@pytest.mark.parametrize("tree", ["base", *STACKS])
def test_services_select_pods_and_the_service_monitor_selects_the_metrics_services(
    tree: str,
) -> None:
    objs = rendered(tree)
    pods = [o for o in objs if o["kind"] in ("Deployment", "StatefulSet")]
    for service in of_kind(objs, "Service"):
        selector = service["spec"]["selector"]
        targets = [
            p
            for p in pods
            if selector.items() <= p["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(targets) == 1, f"{service['metadata']['name']} selects {len(targets)} workloads"
        named = {
            port["name"]: port["containerPort"]
            for c in targets[0]["spec"]["template"]["spec"]["containers"]
            for port in c.get("ports", [])
        }
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in named, f"{service['metadata']['name']}: {port}"
    monitor = only(objs, "ServiceMonitor", "mdp")
    selected = check_service_monitor(monitor, objs)
    assert {s["metadata"]["name"] for s in selected} == {f"mdp-{s}-metrics" for s in SERVICES}
    jobs = {s["metadata"]["labels"][monitor["spec"]["jobLabel"]] for s in selected}
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    scraped = {job["job_name"] for job in prometheus["scrape_configs"]}
    assert jobs == set(SERVICES) and scraped == {*SERVICES, "nats"}
    # The NATS exporters' job is "nats" too, as the compose Prometheus names it (the dashboard).
    for nats_monitor in of_kind(objs, "ServiceMonitor"):
        if nats_monitor["metadata"]["name"] == "mdp-nats":  # not in the base alone
            label = nats_monitor["spec"]["jobLabel"]
            selected_nats = check_service_monitor(nats_monitor, objs)
            assert {s["metadata"]["labels"][label] for s in selected_nats} == {"nats"}
    for service in selected:
        assert service["spec"]["ports"] == [
            {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"}
        ]
    facade = only(objs, "Service", "mdp-control")
    control_env = env_of(objs, container(only(objs, "Deployment", "mdp-control")))
    assert facade["spec"]["ports"][0]["port"] == int(control_env["MDP_CONTROL__HTTP_PORT"])
    for pdb in of_kind(objs, "PodDisruptionBudget"):
        labels = pdb["spec"]["selector"]["matchLabels"]
        assert (
            sum(labels.items() <= p["spec"]["template"]["metadata"]["labels"].items() for p in pods)
            == 1
        )


# ---------------------------------------------------------------------------------------------
# NATS


def nats_conf(objs: list[Obj]) -> Obj:
    """The rendered nats.conf, parsed."""
    return parse_nats_conf(only(objs, "ConfigMap", "mdp-nats-config")["data"]["nats.conf"])


@pytest.mark.parametrize("tree", ["nats", *STACKS])
def test_nats_statefulset_routes_probes_storage_and_accounts(tree: str) -> None:
    objs = rendered(tree)
    nats = only(objs, "StatefulSet", "mdp-nats")
    replicas = nats["spec"]["replicas"]
    conf = nats_conf(objs)
    headless = only(objs, "Service", nats["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    if replicas == 1:
        assert "cluster" not in conf, "a lone clustered JetStream node elects no leader"
    else:
        routes = conf["cluster"]["routes"]
        name, service = nats["metadata"]["name"], headless["metadata"]["name"]
        assert routes == [f"nats://{name}-{i}.{service}:6222" for i in range(replicas)]
        assert conf["cluster"]["no_advertise"] == "true"
    server = nats["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports["monitor"] == int(conf["http"])
    for probe in ("livenessProbe", "readinessProbe"):
        get = server[probe]["httpGet"]
        assert (get["path"], ports[get["port"]]) == ("/healthz?js-enabled-only=true", 8222)
    assert set(server["resources"]) == {"requests", "limits"}
    assert nats["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    mounts = {m["name"]: m["mountPath"] for m in server["volumeMounts"]}
    claims = [c["metadata"]["name"] for c in nats["spec"]["volumeClaimTemplates"]]
    assert claims == ["data"] and conf["jetstream"]["store_dir"].startswith(mounts["data"] + "/")
    assert conf["include"] == ["./accounts.conf"]
    accounts = only(objs, "Secret", "mdp-nats-accounts")
    assert secret_data(accounts) == {"accounts.conf": ACCOUNTS.read_text()}
    env = {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in server["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    expected = {
        f"MDP_NATS_PASSWORD_{u.upper()}": {"name": f"mdp-nats-{u}", "key": "password"}
        for u in account_users()
    }
    assert env == expected
    pdb = only(objs, "PodDisruptionBudget", "mdp-nats")
    assert pdb["spec"] == {"maxUnavailable": 1, "selector": nats["spec"]["selector"]}


@pytest.mark.parametrize("tree", STACKS)
def test_nats_server_accepts_the_rendered_config(tree: str, tmp_path: Path) -> None:
    objs = rendered(tree)
    (tmp_path / "nats.conf").write_text(
        only(objs, "ConfigMap", "mdp-nats-config")["data"]["nats.conf"]
    )
    (tmp_path / "accounts.conf").write_text(
        secret_data(only(objs, "Secret", "mdp-nats-accounts"))["accounts.conf"]
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MDP_")}
    env |= {f"MDP_NATS_PASSWORD_{u.upper()}": "x" for u in account_users()} | {"SERVER_NAME": "n"}
    result = subprocess.run(
        [str(find_binary()), "-t", "-c", str(tmp_path / "nats.conf")],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert result.returncode == 0, result.stderr + result.stdout


# ---------------------------------------------------------------------------------------------
# overlays


def test_single_node_overlay_is_r1_with_one_of_everything() -> None:
    objs = rendered("overlays/single-node")
    assert only(objs, "ConfigMap", "mdp-env")["data"]["MDP_STREAM__REPLICAS"] == "1"
    assert only(objs, "StatefulSet", "mdp-nats")["spec"]["replicas"] == 1
    assert all(d["spec"]["replicas"] == 1 for d in of_kind(objs, "Deployment"))


def test_cluster_overlay_is_r3_on_three_nodes_with_safe_replicas() -> None:
    objs = rendered("overlays/cluster")
    assert only(objs, "ConfigMap", "mdp-env")["data"]["MDP_STREAM__REPLICAS"] == "3"
    assert only(objs, "StatefulSet", "mdp-nats")["spec"]["replicas"] == 3
    replicas = {d["metadata"]["name"]: d["spec"]["replicas"] for d in of_kind(objs, "Deployment")}
    assert replicas == {
        "mdp-provider": 1,  # two providers would both run every job
        "mdp-router": 1,  # no lease: two would split its durable consumer
        "mdp-aggregator": 2,  # active/standby on a KV lease
        "mdp-store": 2,
        "mdp-control": 2,
    }
    for name, count in replicas.items():
        pdb = only(objs, "PodDisruptionBudget", name)["spec"]
        assert pdb.get("minAvailable" if count > 1 else "maxUnavailable") == 1, name
        assert len({"minAvailable", "maxUnavailable"} & set(pdb)) == 1
        strategy = only(objs, "Deployment", name)["spec"]["strategy"]["type"]
        assert strategy == (
            "Recreate" if count == 1 and name in ("mdp-provider", "mdp-router") else "RollingUpdate"
        )


# ---------------------------------------------------------------------------------------------
# Helm values and documentation


def unquote_helm(value: Any) -> Any:
    """The chart's `<< $VAR >>` (rendered unquoted) back to the config file's `$VAR`."""
    if isinstance(value, dict):
        return {k: unquote_helm(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unquote_helm(v) for v in value]
    if isinstance(value, str) and value.startswith("<<") and value.endswith(">>"):
        return value[2:-2].strip()
    return value


def test_helm_values_describe_the_same_cluster() -> None:
    values = yaml.safe_load(HELM_VALUES.read_text())
    config = values["config"]
    assert config["cluster"]["enabled"] is True and config["cluster"]["replicas"] == 3
    assert config["cluster"]["noAdvertise"] is True
    jetstream = config["jetstream"]
    assert jetstream["enabled"] is True and jetstream["fileStore"]["enabled"] is True
    assert jetstream["fileStore"]["pvc"]["enabled"] is True
    assert re.fullmatch(r"\d+Gi", jetstream["fileStore"]["pvc"]["size"])
    assert config["monitor"] == {"enabled": True, "port": 8222}
    assert values["promExporter"]["enabled"] is True
    assert values["fullnameOverride"] == "mdp-nats"  # the pods base's NATS_NODE_* name
    major, minor = (
        int(x) for x in values["container"]["image"]["tag"].split("-")[0].split(".")[:2]
    )
    assert (major, minor) >= (2, 14), "the services need the consumer reset API of 2.14"
    merged = unquote_helm(config["merge"])
    expected = parse_nats_conf(ACCOUNTS.read_text())
    assert merged["accounts"] == expected["accounts"]
    assert merged["system_account"] == expected["system_account"]
    env = values["container"]["env"]
    assert env.pop("GOMEMLIMIT")
    assert env == {
        f"MDP_NATS_PASSWORD_{u.upper()}": {
            "valueFrom": {"secretKeyRef": {"name": f"mdp-nats-{u}", "key": "password"}}
        }
        for u in account_users()
    }


def test_readmes_document_the_deployment() -> None:
    readme = README.read_text()
    for phrase in (
        "overlays/single-node",
        "overlays/cluster",
        "nats-helm-values.yaml",
        "/healthz",
        "/readyz",
        KUBERNETES_VERSION,
    ):
        assert phrase in readme, phrase
    assert "k8s/README.md" in (ROOT / "deploy" / "README.md").read_text()
