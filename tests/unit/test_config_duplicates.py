"""A YAML config that names a key twice is refused with both lines, at any nesting level."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from mdp.shared.config import (
    POLICY_FILE,
    PROVIDERS_FILE,
    ConfigError,
    DuplicateKeyError,
    load_config,
    load_yaml,
)

REPO = Path(__file__).resolve().parents[2]
SHIPPED = {
    name: (REPO / "mdp" / "configs" / name).read_text() for name in (PROVIDERS_FILE, POLICY_FILE)
}


def problems_of(directory: Path, name: str, text: str) -> list[str]:
    """The problems of a config directory holding `text` as `name` (and the other file shipped)."""
    for filename, shipped in SHIPPED.items():
        (directory / filename).write_text(text if filename == name else shipped)
    with pytest.raises(ConfigError) as refused:
        load_config(directory, {})
    return refused.value.problems


def test_a_repeated_top_level_provider_names_both_lines(tmp_path: Path) -> None:
    text = "synthetic:\n  enabled: true\nreplay:\n  enabled: true\nsynthetic:\n  enabled: false\n"
    path = tmp_path / PROVIDERS_FILE
    assert problems_of(tmp_path, PROVIDERS_FILE, text) == [
        f"{path}: line 5: duplicate key 'synthetic' (first at line 1)"
    ]


def test_a_repeated_key_in_the_shipped_policy_is_refused(tmp_path: Path) -> None:
    lines = SHIPPED[POLICY_FILE].splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("guards:")) + 1
    text = SHIPPED[POLICY_FILE] + "guards:\n  max_symbols: 5\n"
    [problem] = problems_of(tmp_path, POLICY_FILE, text)
    line = len(lines) + 1
    assert problem == (
        f"{tmp_path / POLICY_FILE}: line {line}: duplicate key 'guards' (first at line {first})"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a:\n  b:\n    c: 1\n    c: 2\n", ["line 4: duplicate key 'c' in a.b (first at line 3)"]),
        ("a: [{k: 1, k: 2}]\n", ["line 1: duplicate key 'k' in a[0] (first at line 1)"]),
        ("a: {x: 1, y: 2, x: 3}\n", ["line 1: duplicate key 'x' in a (first at line 1)"]),
        (
            "a: 1\nb: {c: 1, c: 2}\na: 2\n",
            [
                "line 2: duplicate key 'c' in b (first at line 2)",
                "line 3: duplicate key 'a' (first at line 1)",
            ],
        ),
        ("'a': 1\na: 2\n", ["line 2: duplicate key 'a' (first at line 1)"]),  # quoting is no escape
        ("1: x\n0x1: y\n", ["line 2: duplicate key 1 (first at line 1)"]),
    ],
)
def test_every_level_and_every_repeat_is_reported(text: str, expected: list[str]) -> None:
    with pytest.raises(DuplicateKeyError) as refused:
        load_yaml(text)
    assert refused.value.problems == expected


@pytest.mark.parametrize(
    "text",
    [
        # A key overriding one merged in with `<<` is written once: no repeat.
        "base: &b {rate: 1, seed: 2}\nsynthetic:\n  params:\n    <<: *b\n    rate: 5\n",
        # An alias used twice is the same mapping, checked once.
        "a: &x {k: 1}\nb: *x\nc: *x\n",
        "a: 1\nA: 2\n",  # keys are case-sensitive
        "",
    ],
)
def test_no_false_repeats(text: str) -> None:
    load_yaml(text)


@given(st.dictionaries(st.text(min_size=1, max_size=8), st.integers(), max_size=8))
def test_unique_keys_load_as_the_safe_loader_does(data: dict[str, int]) -> None:
    text = yaml.safe_dump(data)
    assert load_yaml(text) == yaml.safe_load(text)


def run(module: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`python -m module args` in the checkout, its output captured."""
    command = [sys.executable, "-m", module, *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, cwd=REPO)


def test_mdp_config_check_and_a_service_start_refuse_it(tmp_path: Path) -> None:
    text = SHIPPED[PROVIDERS_FILE] + "\nsynthetic:\n  enabled: false\n"
    problems_of(tmp_path, PROVIDERS_FILE, text)  # writes both files
    env = {**os.environ, "MDP_CONFIG_DIR": str(tmp_path), "MDP_NATS_URL": "nats://127.0.0.1:1"}
    expected = "duplicate key 'synthetic' (first at line "
    check = run("mdp.cli", "config", "check", env=env)
    assert check.returncode == 1 and expected in check.stderr, check
    # The control service validates its files before it connects: a clean exit 2, no traceback.
    service = run("mdp.services.control", env=env)
    assert service.returncode == 2 and expected in service.stderr, service
    assert "Traceback" not in service.stderr
