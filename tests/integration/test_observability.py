"""What an operator sees: the metrics the running services export, and the dashboard's queries.

The five services run against a real nats-server with a synthetic job until bars are stored;
then every service's `/metrics` is scraped. Every metric name in a PromQL expression of the
Grafana dashboard and of the Prometheus rules must be one a service exports (a histogram's
`_bucket`, `_sum`, `_count` allowed), or a `nats_*` series of the Prometheus NATS exporter.
Every exported name follows the naming rule, and the lag, latency, checkpoint and lease metrics
carry values.
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml
from nats.aio.client import Client as NATS
from prometheus_client.parser import text_string_to_metric_families

from mdp.cli import control_request
from mdp.services.registry import SERVICES
from tests.conftest import PipelineFactory, wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
# The control protocol's names (public API, kept); the client library's standard collectors.
PROTOCOL = {
    "ingest_active",
    "ingest_starts_total",
    "ingest_stops_total",
    "ingest_errors_total",
    "ingest_writes_suppressed_total",
}
STANDARD = ("process_", "python_")
SUFFIXES = {
    "counter": ["_total", "_created"],
    "gauge": [""],
    "histogram": ["_bucket", "_sum", "_count", "_created"],
    "summary": ["", "_sum", "_count", "_created"],
    "info": ["_info"],
}
# PromQL words that look like identifiers but name no series.
KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and",
    "or", "unless", "inf", "nan",
}  # fmt: skip


def promql_metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: identifiers that are neither functions,
    aggregation clauses, label names, strings nor durations."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(r"(?<![\w:])\d[\w.]*", " ", text)  # numbers and durations
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][\w:]*", text):
        rest = text[match.end() :].lstrip()
        word = match.group(0)
        if rest.startswith("(") or word.lower() in KEYWORDS:
            continue  # a function or an aggregation
        names.add(word)
    return names


def test_promql_metric_names() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, interval) (rate(a_bucket{job="x", y=~"b{2}"}'
        "[$__rate_interval]))) + max without (z) (c - d offset 5m) / on (w) e"
    )
    assert promql_metric_names(expr) == {"a_bucket", "c", "d", "e"}


def dashboard_queries() -> list[tuple[str, str]]:
    """(file, expression) of every panel target (rows included) and every alerting rule."""
    out = []
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        panels = list(dashboard["panels"])
        while panels:
            panel = panels.pop()
            panels.extend(panel.get("panels", []))
            out += [(path.name, t["expr"]) for t in panel.get("targets", []) if "expr" in t]
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        out += [(RULES.name, rule["expr"]) for rule in group["rules"]]
    return out


async def families(nc: NATS, service: str) -> dict[str, Any]:
    """Every metric family a running service exports (with or without samples yet), by name."""
    info = await nc.request(f"$SRV.INFO.mdp-{service}", b"", timeout=2)
    port = msgspec.json.decode(info.data)["metadata"]["metrics_port"]

    def fetch() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            return str(resp.read().decode())

    text = await asyncio.to_thread(fetch)
    return {family.name: family for family in text_string_to_metric_families(text)}


def sample_names(found: dict[str, Any]) -> set[str]:
    """The series names the families can have (a counter `x` is `x_total`, and so on)."""
    return {name + suffix for name, f in found.items() for suffix in SUFFIXES.get(f.type, [""])}


def value(found: dict[str, Any], sample: str, **labels: str) -> float | None:
    """A sample's value (None when absent), its labels a superset of `labels`."""
    for family in found.values():
        for s in family.samples:
            if s.name == sample and labels.items() <= s.labels.items():
                return float(s.value)
    return None


def test_the_dashboard_imports_into_an_existing_grafana() -> None:
    assert DASHBOARDS, "no dashboard in deploy/grafana/dashboards"
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        inputs = {i["name"]: i for i in dashboard["__inputs"]}
        assert inputs["DS_PROMETHEUS"]["type"] == "datasource"
        assert inputs["DS_PROMETHEUS"]["pluginId"] == "prometheus"
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["current"]["value"] == "${DS_PROMETHEUS}"
        text = path.read_text()
        assert "mdp-prometheus" not in text, "a fixed datasource uid does not exist elsewhere"
        uids = set(re.findall(r'"uid":\s*"([^"]*)"', text)) - {dashboard["uid"]}
        assert uids == {"${datasource}"}, uids


async def test_the_dashboard_queries_only_what_the_services_export(
    pipeline: PipelineFactory, nc: NATS, tmp_path: Path
) -> None:
    sup = pipeline(store_url=f"sqlite:///{tmp_path / 'bars.db'}")
    await sup.wait_ready()
    reply = await control_request(
        nc, "start", {"provider": "synthetic", "symbols": ["AAA", "BBB"], "params": {"rate": 50}}
    )
    assert reply["ok"], reply

    exported: dict[str, dict[str, Any]] = {}

    async def bars_stored() -> bool:
        for service in SERVICES:
            exported[service] = await families(nc, service)
        count = value(exported["store"], "mdp_store_publish_to_store_seconds_count", mode="bus")
        return bool(count)

    await wait_for(bars_stored, timeout=60, what="a bar batch committed by the store")

    # the naming rule: one prefix, except the protocol's five and the standard collectors
    names = set().union(*(sample_names(found) for found in exported.values()))
    for service, found in exported.items():
        for name, family in found.items():
            if name.endswith("_created"):
                continue  # a counter's or histogram's creation time, parsed as its own family
            full = name + ("_total" if family.type == "counter" else "")
            ok = full.startswith("mdp_") or full in PROTOCOL or full.startswith(STANDARD)
            assert ok, f"{service} exports {full!r}: not mdp_*"
    assert not {n for n in names if "late_ticks" in n and "symbol" in n} - {
        "mdp_aggregator_late_ticks_by_symbol_total",
        "mdp_aggregator_late_ticks_by_symbol_created",
    }

    # every query of the dashboard
    jobs = {job["job_name"] for job in yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]}
    queried: set[str] = set()
    for dashboard, expr in dashboard_queries():
        for job in re.findall(r'job="([^"]+)"', expr):
            assert job in jobs, f"{dashboard}: {expr}: no Prometheus job {job!r}"
        queried |= promql_metric_names(expr)
    unknown = {n for n in queried - names if not n.startswith("nats_")}
    assert not unknown, f"the dashboard queries metrics no service exports: {sorted(unknown)}"
    required = {
        "mdp_consumer_pending_messages",  # lag
        "mdp_aggregator_tick_to_bar_seconds_bucket",  # latency
        "mdp_store_publish_to_store_seconds_bucket",
        "mdp_dead_letters_total",  # DLQ
        "mdp_store_write_errors_total",
        "mdp_provider_circuit_state",
        "nats_consumer_num_pending",  # the exporter
        "mdp_provider_ticks_published_total",
        "mdp_store_rows_written_total",
        "ingest_active",
    }
    assert required <= queried, f"panels missing for {sorted(required - queried)}"

    # the new metrics carry values
    agg, store = exported["aggregator"], exported["store"]
    assert value(agg, "mdp_aggregator_lease_active", consumer="aggregator") == 1
    age = value(agg, "mdp_aggregator_checkpoint_age_seconds", consumer="aggregator")
    assert age is not None and 0 <= age < 30
    assert (value(agg, "mdp_aggregator_tick_to_bar_seconds_count", interval="1s") or 0) > 0
    for service, stream, consumer in [
        ("router", "MD_RAW", "router"),
        ("aggregator", "MD_QUOTES", "aggregator"),
        ("store", "STORE_SYNC", "store-writer"),
    ]:
        labels = {"stream": stream, "consumer": consumer}
        found = exported[service]
        assert value(found, "mdp_consumer_pending_messages", **labels) is not None, service
        assert value(found, "mdp_consumer_ack_floor_sequence", **labels) is not None, service
    # what a reader of this test wants to know: the latencies as measured here
    for name, found, labels in [
        ("mdp_aggregator_tick_to_bar_seconds", agg, {"interval": "1s"}),
        ("mdp_store_publish_to_store_seconds", store, {"mode": "bus"}),
    ]:
        total, count = (
            value(found, f"{name}_sum", **labels),
            value(found, f"{name}_count", **labels),
        )
        assert total is not None and count
        print(f"{name}: {count:.0f} observed, mean {total / count * 1000:.1f} ms")
