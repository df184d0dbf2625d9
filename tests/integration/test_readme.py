"""The README's `mdp ...` command blocks, run as written beside a real `mdp up`."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mdp.services.store.writers import read_bars
from mdp.supervisor import running_system

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.md"

# Not run: `mdp up` is the system under test itself; the ibkr lines need a real gateway.
SKIP = ("mdp up", "mdp service", "mdp ingest start --provider ibkr")


def readme_commands(text: str) -> list[str]:
    """Every line of a ```sh block that runs `mdp`, as written (comments kept for the shell)."""
    commands = []
    for block in re.findall(r"^```sh\n(.*?)^```", text, flags=re.M | re.S):
        for line in block.splitlines():
            line = line.strip()
            if line.startswith("mdp ") and not line.startswith(SKIP):
                commands.append(line)
    return commands


def test_the_readme_has_the_command_blocks_it_promises() -> None:
    commands = readme_commands(README.read_text())
    for verb in ("tail quotes", "tail bars", "top --once", "dlq list", "dlq redrive", "chart",
                 "bars export --format parquet"):  # fmt: skip
        assert any(c.startswith(f"mdp {verb}") for c in commands), verb


def test_every_readme_command_block_runs_beside_mdp_up(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MDP_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    up = subprocess.Popen(
        [sys.executable, "-m", "mdp.cli", "up", "--symbols", "AAPL,BRK.B", "--rate", "50"],
        cwd=tmp_path, env=env, stdout=(tmp_path / "up.out").open("w"), stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        store = f"sqlite:///{tmp_path / 'var' / 'mdp.db'}"
        while True:  # until bars of both symbols are stored
            assert up.poll() is None, up.stderr.read() if up.stderr else ""
            assert time.monotonic() < deadline, "mdp up stored no bars in 60 s"
            if running_system(tmp_path / "var") and (tmp_path / "var" / "mdp.db").exists():
                symbols = {b.symbol for b in asyncio.run(read_bars(store, interval="1s"))}
                if symbols >= {"AAPL", "BRK.B"}:
                    break
            time.sleep(0.5)
        commands = readme_commands(README.read_text())
        assert len(commands) >= 10
        for command in commands:
            result = subprocess.run(
                ["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                timeout=120,
            )  # fmt: skip
            assert result.returncode == 0, f"{command}\n{result.stderr[-2000:]}"
        assert (tmp_path / "aapl.html").read_text().count('<g class="candle"') > 0
        assert (tmp_path / "aapl.png").stat().st_size > 1000
        assert (tmp_path / "bars.parquet").stat().st_size > 0
        assert (tmp_path / "aapl.csv").read_text().startswith("symbol,interval,bar_start_ns,")
    finally:
        up.send_signal(signal.SIGINT)
        _, err = up.communicate(timeout=60)
    assert up.returncode == 0, err[-2000:]
    last = (tmp_path / "up.out").read_text().strip().splitlines()[-1]
    assert re.match(r"\d\d:\d\d:\d\d \| ticks in ", last), last
    assert "| bars 1s " in last and "| dead letters 0" in last, last
