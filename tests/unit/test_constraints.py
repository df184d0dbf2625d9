"""Reproducible installs: constraints.txt pins every dependency; CI and the image use it."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from mdp.shared.bus import _nats_internals

ROOT = Path(__file__).resolve().parents[2]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][^\s;]*)$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    out: dict[str, str] = {}
    for line in lines:
        if not line or line.startswith("#"):
            continue
        match = PIN.match(line)
        assert match, f"constraints.txt: not `name==version`: {line!r}"
        out[canonical(match.group(1))] = match.group(2)
    return out


def requirement_name(spec: str) -> str:
    return canonical(re.split(r"[\s\[<>=!~;]", spec, maxsplit=1)[0])


def test_every_declared_dependency_is_pinned() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"])
    for name, extra in project["optional-dependencies"].items():
        if name != "bench":  # its own venv, unconstrained: NautilusTrader needs pandas < 3
            declared += extra
    own = canonical(project["name"])  # an extra made of other extras: `mdp[parquet,pandas]`
    missing = {requirement_name(spec) for spec in declared} - set(pins()) - {own}
    assert not missing, f"not in constraints.txt (scripts/freeze_constraints.sh): {missing}"


def test_nats_py_is_bounded_and_pinned_inside_the_tested_range() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (spec,) = [d for d in project["dependencies"] if requirement_name(d) == "nats-py"]
    assert spec.replace(" ", "").endswith(_nats_internals.TESTED_RANGE), spec
    low, high = (
        tuple(int(p) for p in bound.lstrip("<>=").split("."))
        for bound in _nats_internals.TESTED_RANGE.split(",")
    )
    pinned = tuple(int(p) for p in pins()["nats-py"].split(".")[:2])
    assert low <= pinned < high


def test_ci_and_the_image_install_with_the_constraints() -> None:
    assert "pip install --quiet -c constraints.txt -e '.[dev]'" in (ROOT / ".ci/run").read_text()
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY pyproject.toml constraints.txt ./" in dockerfile
    assert "pip install -c constraints.txt '.[ibkr,tracing]'" in dockerfile
    assert "!constraints.txt" in (ROOT / ".dockerignore").read_text().splitlines()
