"""The AsyncAPI document and JSON Schemas in docs/ are what the code generates (no drift)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from mdp import schema
from mdp.shared.contract.messages import Bar

REPO = Path(__file__).resolve().parents[2]


def test_the_checked_in_documents_equal_the_generated_ones() -> None:
    for relative, text in schema.render().items():
        path = REPO / relative
        assert path.read_text() == text, f"{relative} drifted: run `mdp schema` and commit it"


def test_a_changed_struct_is_drift(monkeypatch: pytest.MonkeyPatch) -> None:
    class Bar2(Bar):  # one field more than the contract says
        note: str = ""

    Bar2.__name__ = "Bar"
    monkeypatch.setitem(schema.MESSAGES, "Bar", Bar2)
    assert schema.render()["docs/schemas.json"] != (REPO / "docs/schemas.json").read_text()


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_every_reference_resolves_and_every_subject_is_there() -> None:
    document = yaml.safe_load((REPO / "docs/asyncapi.yaml").read_text())
    assert document["asyncapi"] == "3.0.0"
    for ref in _refs(document):
        node: Any = document
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]
    addresses = {c["address"] for c in document["channels"].values()}
    for expected in (
        "md.raw.{provider}.{symbol}",
        "md.quotes.{symbol}",
        "md.bars.{interval}.{symbol}",
        "ingest.control.start",
        "ingest.control.reset",
        "ingest.events.failover",
        "ingest.events.circuit",
        "md.dlq.{service}",
    ):
        assert expected in addresses
    schemas = json.loads((REPO / "docs/schemas.json").read_text())
    # A real message validates against its schema's required fields.
    bar = msgspec.to_builtins(Bar("A", "1s", 1, 2, 1.0, 1.0, 1.0, 1.0, 1.0, 1, 1.0, "p", 0))
    assert set(schemas["Bar"]["required"]) <= set(bar)
