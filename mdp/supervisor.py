"""Run the whole system locally: a private nats-server and the five services as child processes."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import nats
from nats.aio.client import Client as NATS
from prometheus_client.parser import text_string_to_metric_families

from mdp.services.registry import SERVICES
from mdp.shared.contract import names
from mdp.shared.contract.records import ServiceUrl
from mdp.shared.natsserver import EmbeddedNats, parent_death_signal
from mdp.shared.tasks import cancellable

# Stop order: sources first, so every later stage can drain what is in flight.
STOP_ORDER = ["provider", "control", "router", "aggregator", "store"]


RUN_FILE = "run.json"
LOCK_FILE = "mdp.lock"


class RunRecord(msgspec.Struct, omit_defaults=True):
    """What a running system records in its data dir (`run.json`) for commands run beside it."""

    pid: int
    nats_url: str
    store_url: str
    started_ns: int
    control_url: str = ""  # the HTTP facade, once control has started


class DataDirBusy(RuntimeError):
    """Another process runs a system on this data dir (its record, when it wrote one)."""

    def __init__(self, data_dir: Path, record: RunRecord | None) -> None:
        where = f" (pid {record.pid}, NATS {record.nats_url})" if record else ""
        super().__init__(f"a system already runs on {data_dir}{where}")
        self.record = record


def running_system(data_dir: Path) -> RunRecord | None:
    """The system running on `data_dir` (its lock is held), None when nothing runs there."""
    lock = data_dir / LOCK_FILE
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_record(data_dir)
    finally:
        os.close(fd)  # closing drops a lock this call took
    return None


def _read_record(data_dir: Path) -> RunRecord | None:
    try:
        return msgspec.json.decode((data_dir / RUN_FILE).read_bytes(), type=RunRecord)
    except (OSError, msgspec.DecodeError):
        return None


@dataclass
class Child:
    """One supervised service process."""

    name: str
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started: float = 0.0
    next_start: float = 0.0


@dataclass
class Supervisor:
    """Starts, watches (restarting with backoff) and stops the services of one deployment."""

    data_dir: Path
    store_url: str
    nats_url: str | None = None
    services: Sequence[str] = tuple(SERVICES)
    env: dict[str, str] = field(default_factory=dict)
    say: Callable[[str], None] = print
    children: dict[str, Child] = field(default_factory=dict)
    nats_server: EmbeddedNats | None = None
    # The CLI's: children die with it, even when it is SIGKILLed (Linux; main thread only).
    die_with_parent: bool = False
    _lock_fd: int | None = None

    @property
    def log_dir(self) -> Path:
        """Where each service's JSON log goes."""
        return self.data_dir / "logs"

    def start_nats(self) -> str:
        """Start the embedded nats-server unless a URL was given; return the URL.

        The data dir is locked first: a second system on it raises `DataDirBusy` instead of
        starting a second server on the same store (which corrupts it).
        """
        if self.nats_url:
            return self.nats_url
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._lock()
        self.nats_server = EmbeddedNats(
            self.data_dir / "nats",
            log_file=self.log_dir / "nats-server.log",
            die_with_parent=self.die_with_parent,
        )
        self.nats_url = self.nats_server.start()
        self.write_record()
        return self.nats_url

    def _lock(self) -> None:
        fd = os.open(self.data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DataDirBusy(self.data_dir, _read_record(self.data_dir)) from None
        self._lock_fd = fd

    def write_record(self, control_url: str = "") -> None:
        """Record where this system listens, for commands run beside it (`running_system`)."""
        record = RunRecord(
            os.getpid(), self.nats_url or "", self.store_url, time.time_ns(), control_url
        )
        tmp = self.data_dir / f".{RUN_FILE}.tmp"
        tmp.write_bytes(msgspec.json.encode(record))
        tmp.replace(self.data_dir / RUN_FILE)

    async def record_control_url(self, nc: NATS) -> str:
        """Read where the control facade listens (KV) and add it to the run record."""
        try:
            kv = await nc.jetstream().key_value(names.KV_STATE)
            entry = await kv.get(names.HTTP_CONTROL_KEY)
            url = msgspec.json.decode(entry.value or b"", type=ServiceUrl).url
        except Exception:
            return ""
        if self._lock_fd is not None:
            self.write_record(url)
        return url

    def child_env(self) -> dict[str, str]:
        """The environment every service starts with."""
        env = dict(os.environ)
        env.update(
            MDP_NATS_URL=self.nats_url or "",
            MDP_STORE_URL=self.store_url,
            MDP_DATA_DIR=str(self.data_dir),
            MDP_METRICS_PORT=env.get("MDP_METRICS_PORT", "0"),
            PYTHONUNBUFFERED="1",
        )
        env.update(self.env)
        return env

    def spawn(self, name: str) -> None:
        """Start (or restart) one service process."""
        child = self.children.setdefault(name, Child(name))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 (the child owns it)
        child.proc = subprocess.Popen(
            [sys.executable, "-m", f"mdp.services.{name}"],
            env=self.child_env(),
            stdout=log,
            stderr=log,
            start_new_session=True,
            preexec_fn=parent_death_signal() if self.die_with_parent else None,
        )
        log.close()
        child.started = time.monotonic()

    def start(self) -> None:
        """Start nats (if embedded) and every service."""
        self.start_nats()
        for name in self.services:
            self.spawn(name)

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until every service has started (it answers `mdp.ready.<name>`)."""
        assert self.nats_url
        nc = await cancellable(nats.connect(self.nats_url.split(","), max_reconnect_attempts=3))
        try:
            deadline = time.monotonic() + timeout
            waiting = set(self.services)
            while waiting:
                if time.monotonic() > deadline:
                    tails = "\n".join(
                        f"--- {name}:\n{_tail(self.log_dir / f'{name}.log', 5)}"
                        for name in sorted(waiting)
                    )
                    raise TimeoutError(
                        f"services not ready after {timeout} s: {', '.join(sorted(waiting))} "
                        f"(logs in {self.log_dir})\n{tails}"
                    )
                self.check()  # a service that died while starting is restarted (with backoff)
                for name in list(waiting):
                    with contextlib.suppress(Exception):
                        # In a task of its own: nats-py's request can swallow a cancel.
                        await cancellable(nc.request(names.ready(name), b"", timeout=0.5))
                        waiting.discard(name)
                await asyncio.sleep(0.05)
        finally:
            await nc.close()

    def check(self) -> None:
        """Restart any service that died, with exponential backoff, and say so."""
        now = time.monotonic()
        for child in self.children.values():
            proc = child.proc
            if proc is None or proc.poll() is None:
                continue
            if child.next_start == 0.0:
                stable = now - child.started > 60
                child.restarts = 0 if stable else child.restarts + 1
                delay = min(30.0, 0.5 * 2**child.restarts)
                child.next_start = now + delay
                self.say(
                    f"service {child.name} exited with code {proc.returncode}; "
                    f"restarting in {delay:.1f} s (log: {self.log_dir / (child.name + '.log')})"
                )
            elif now >= child.next_start:
                child.next_start = 0.0
                self.spawn(child.name)
                self.say(f"service {child.name} restarted")

    def stop(self, timeout: float = 30.0) -> dict[str, int]:
        """SIGTERM the services in stop order, each waited for; then the embedded server."""
        codes: dict[str, int] = {}
        for name in [n for n in STOP_ORDER if n in self.children]:
            proc = self.children[name].proc
            if proc is None:
                continue
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.say(f"service {name} did not stop within {timeout} s; killing it")
                    proc.kill()
                    proc.wait()
            codes[name] = proc.returncode
        if self.nats_server is not None:
            self.nats_server.stop()
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                (self.data_dir / RUN_FILE).unlink()
            os.close(self._lock_fd)
            self._lock_fd = None
        return codes


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


async def scrape(nc: NATS, service: str, metric_names: Sequence[str]) -> dict[str, float]:
    """Sum the named counters from the `/metrics` of every instance of one service."""
    totals = dict.fromkeys(metric_names, 0.0)
    for name, _, value in await scrape_samples(nc, service, metric_names):
        totals[name] += value
    return totals


async def scrape_by(nc: NATS, service: str, metric: str, label: str) -> dict[str, float]:
    """One counter of one service, summed per value of `label` (e.g. bars per `interval`)."""
    totals: dict[str, float] = {}
    for _, labels, value in await scrape_samples(nc, service, [metric]):
        key = labels.get(label, "")
        totals[key] = totals.get(key, 0.0) + value
    return totals


async def scrape_samples(
    nc: NATS, service: str, metric_names: Sequence[str]
) -> list[tuple[str, dict[str, str], float]]:
    """The samples (name, labels, value) of the named metrics from one service's `/metrics`."""
    try:
        info = await nc.request(f"$SRV.INFO.mdp-{service}", b"", timeout=0.5)
    except Exception:
        return []
    port = msgspec.json.decode(info.data, type=_ServiceInfo).metadata.get("metrics_port")
    if not port:
        return []

    def fetch() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as resp:
            return str(resp.read().decode())

    try:
        text = await asyncio.to_thread(fetch)
    except OSError:
        return []
    wanted = set(metric_names)
    return [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name in wanted
    ]


class _ServiceInfo(msgspec.Struct):
    """The part of a micro `$SRV.INFO` reply read here."""

    metadata: dict[str, str] = {}
