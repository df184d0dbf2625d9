"""Every command and service stops on SIGTERM in every state, and never leaves a process behind.

Real processes throughout: `mdp` and `mdp service` as a user runs them, real nats-servers.
A process "left behind" is any process that runs in the test's temporary directory or whose
command line or environment names it (the embedded server's store, the services' data dir).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mdp.services.registry import SERVICES
from mdp.shared.natsserver import EmbeddedNats, free_port
from mdp.supervisor import running_system
from tests.conftest import DATA

pytestmark = pytest.mark.integration

SLICE = DATA / "lean_equity_20131008_slice.ticks.csv.gz"


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MDP_")}
    env.update(PYTHONUNBUFFERED="1", **(extra or {}))
    return env


def _spawn(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    with open(cwd / f"{args[0]}-{time.monotonic_ns()}.log", "w") as log:  # the child keeps it
        return subprocess.Popen(
            [sys.executable, "-m", "mdp.cli", *args],
            cwd=cwd,
            env=_env(env),
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )


def until(condition: Callable[[], object], timeout: float, what: str) -> None:
    """Wait for `condition` with a deadline (never a bare sleep)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def stop_within(proc: subprocess.Popen[str], sig: int, seconds: float) -> tuple[int, float]:
    """Send `sig`; the exit code and how long the process took (fails after `seconds`)."""
    started = time.monotonic()
    proc.send_signal(sig)
    try:
        code = proc.wait(seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        name = signal.Signals(sig).name
        raise AssertionError(f"{proc.args} ignored {name} for {seconds} s") from None
    took = time.monotonic() - started
    print(f"{' '.join(proc.args[3:6])}: exit {code} {took:.2f} s after {signal.Signals(sig).name}")
    return code, took


def processes_naming(path: Path) -> list[str]:
    """Live processes that run in `path` or name it (command line, environment); not this one."""
    found = []
    needle = str(path).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
            cwd = os.readlink(entry / "cwd").encode()
            state = (entry / "stat").read_text().split(") ", 1)[1][0]
        except OSError:
            continue
        if state != "Z" and (needle in cmdline or needle in environ or cwd.startswith(needle)):
            command = cmdline.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{entry.name}: {command}")
    return found


def log_of(tmp_path: Path, prefix: str) -> str:
    """Everything the processes started as `prefix` wrote so far."""
    return "".join(p.read_text(errors="replace") for p in sorted(tmp_path.glob(f"{prefix}-*.log")))


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """The test's directory; no process naming it may outlive the test (killed if one does)."""
    yield tmp_path
    try:
        until(lambda: not processes_naming(tmp_path), 15, "every process of the test to exit")
    finally:
        for line in processes_naming(tmp_path):
            with contextlib.suppress(OSError):
                os.kill(int(line.split(":", 1)[0]), signal.SIGKILL)


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_a_service_stops_on_sigterm_while_it_cannot_reach_nats(workdir: Path, name: str) -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    proc = _spawn("service", name, "--nats", url, cwd=workdir, env={"MDP_DATA_DIR": str(workdir)})
    until(lambda: "nats_error" in log_of(workdir, "service"), 30, f"{name} to try to connect")
    code, _ = stop_within(proc, signal.SIGTERM, 5)
    assert code == 0, log_of(workdir, "service")[-2000:]
    assert "stopped_while_starting" in log_of(workdir, "service")


def test_every_service_stops_on_sigterm_while_its_server_is_gone(workdir: Path) -> None:
    server = EmbeddedNats(workdir / "nats", log_file=workdir / "nats.log")
    server.start()
    env = {"MDP_DATA_DIR": str(workdir), "MDP_STORE_URL": f"sqlite:///{workdir / 'mdp.db'}"}
    procs = {name: _spawn("service", name, "--nats", server.url, cwd=workdir, env=env)
             for name in sorted(SERVICES)}  # fmt: skip
    try:
        until(lambda: log_of(workdir, "service").count('"event": "started"') == len(procs), 60,
              "every service to start")  # fmt: skip
        server.kill()
        until(lambda: log_of(workdir, "service").count("nats_disconnected") >= len(procs), 30,
              "every service to see its server gone")  # fmt: skip
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        for name, proc in procs.items():
            code = proc.wait(max(0.1, 10 - (time.monotonic() - started)))
            assert code in (0, 1), f"{name} exited {code}"
        print(f"every service stopped {time.monotonic() - started:.2f} s after SIGTERM")
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
        server.stop()


def test_a_service_whose_connection_is_closed_for_good_exits_non_zero(workdir: Path) -> None:
    # A server limit the service runs into: the server answers -ERR, nats-py closes the
    # connection and never reconnects. The service must exit non-zero (its supervisor restarts
    # it), not idle as a zombie.
    config = workdir / "server.conf"
    config.write_text("max_subscriptions: 4\n")
    server = EmbeddedNats(workdir / "nats", extra_args=["-c", str(config)])
    server.start()
    proc = _spawn("service", "router", "--nats", server.url, cwd=workdir,
                  env={"MDP_DATA_DIR": str(workdir)})  # fmt: skip
    try:
        code = proc.wait(30)
        log = log_of(workdir, "service")
        assert code == 1, log[-2000:]
        assert "nats_connection_lost" in log or "ConnectionClosedError" in log, log[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        server.stop()


def test_a_cli_command_fails_in_seconds_when_nats_is_unreachable(workdir: Path) -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "mdp.cli", "ingest", "status", "--nats", url],
        cwd=workdir, env=_env(), capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 1
    assert time.monotonic() - started < 15
    assert f"cannot connect to NATS at {url} within 5 s" in result.stderr
    assert "Traceback" not in result.stderr

    # A server that accepts and never answers: SIGTERM while the command waits for it.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        silent.settimeout(0.05)
        proc = _spawn("ingest", "status", "--nats", f"nats://127.0.0.1:{silent.getsockname()[1]}",
                      cwd=workdir)  # fmt: skip
        accepted: list[socket.socket] = []

        def connected() -> bool:
            with contextlib.suppress(TimeoutError):
                accepted.append(silent.accept()[0])
            return bool(accepted)

        until(connected, 30, "the command to connect")
        code, _ = stop_within(proc, signal.SIGTERM, 5)
        for conn in accepted:
            conn.close()
    assert code == 143


def test_a_cli_command_without_nats_says_where_it_looked(workdir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mdp.cli", "ingest", "status", "--data-dir", str(workdir / "v")],
        cwd=workdir, env=_env(), capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 1
    assert "no NATS server" in result.stderr and str(workdir / "v") in result.stderr


def _wait_started(workdir: Path, prefix: str, marker: str, timeout: float = 120) -> None:
    until(lambda: marker in log_of(workdir, prefix), timeout, f"`{marker}` in the {prefix} log")


def test_replay_stops_on_sigterm_and_stops_what_it_started(workdir: Path) -> None:
    proc = _spawn("replay", str(SLICE), "--speed", "1", cwd=workdir)
    until(lambda: running_system(workdir / "var") is not None, 60, "its embedded server")
    provider_log = workdir / "var" / "logs" / "provider.log"
    until(lambda: provider_log.is_file() and "job_started" in provider_log.read_text(), 60,
          "the replay job to run")  # fmt: skip
    code, _ = stop_within(proc, signal.SIGTERM, 40)
    assert code == 143, log_of(workdir, "replay")[-2000:]
    assert not processes_naming(workdir), "replay left processes behind"
    assert running_system(workdir / "var") is None


@pytest.mark.parametrize("when", ["starting", "running"])
def test_up_stops_on_sigterm_in_each_state(workdir: Path, when: str) -> None:
    proc = _spawn("up", "--symbols", "AAPL", cwd=workdir)
    marker = "nats: nats://" if when == "starting" else "Ctrl-C stops"
    _wait_started(workdir, "up", marker)
    code, _ = stop_within(proc, signal.SIGTERM, 40)
    out = log_of(workdir, "up")
    if when == "running":
        assert code == 0 and "stopped cleanly" in out, out[-2000:]
    else:
        assert code in (0, 143), out[-2000:]
    assert not processes_naming(workdir), "up left processes behind"


def test_up_killed_takes_its_children_with_it(workdir: Path) -> None:
    proc = _spawn("up", "--symbols", "AAPL", cwd=workdir)
    _wait_started(workdir, "up", "Ctrl-C stops")
    children = processes_naming(workdir)
    assert len(children) >= 6, children  # the server and five services (and up itself)
    proc.kill()
    proc.wait(10)
    until(lambda: not processes_naming(workdir), 20, "the children of a killed `mdp up` to exit")


def test_a_second_system_on_one_data_dir_is_refused_and_replay_joins_it(workdir: Path) -> None:
    first = _spawn("up", "--symbols", "AAPL", cwd=workdir)
    try:
        _wait_started(workdir, "up", "Ctrl-C stops")
        record = running_system(workdir / "var")
        assert record is not None and record.pid == first.pid and record.control_url
        second = subprocess.run(
            [sys.executable, "-m", "mdp.cli", "up", "--duration", "1"],
            cwd=workdir, env=_env(), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert second.returncode == 1
        assert f"a system already runs on var (pid {first.pid}, NATS {record.nats_url})" in (
            second.stderr
        )
        status = subprocess.run(
            [sys.executable, "-m", "mdp.cli", "ingest", "status"],
            cwd=workdir, env=_env(), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["jobs"][0]["provider"] == "synthetic"
        outside = subprocess.run(
            [sys.executable, "-m", "mdp.cli", "replay", str(SLICE)],
            cwd=workdir, env=_env(), capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        # The joined system reads only inside its replay roots (its directory, its data dir).
        assert outside.returncode == 1 and "path_not_allowed" in outside.stderr, outside.stderr
        local = workdir / SLICE.name
        local.write_bytes(SLICE.read_bytes())
        joined = subprocess.run(
            [sys.executable, "-m", "mdp.cli", "replay", local.name],
            cwd=workdir, env=_env(), capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert joined.returncode == 0, joined.stderr[-2000:]
        assert f"replaying into the system running on var/ ({record.nats_url})" in joined.stderr
        assert "every bar is stored" in joined.stdout
        servers = [p for p in processes_naming(workdir) if "nats-server" in p]
        assert len(servers) == 1, servers
    finally:
        code, _ = stop_within(first, signal.SIGTERM, 40)
    assert code == 0
