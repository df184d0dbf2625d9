"""The store's database goes away mid-stream and comes back: the store catches up by itself.

A replay runs through the five services; once a seeded share of its bars is stored the
database becomes unwritable for a seeded while, then is restored. Meanwhile the store fails its
write attempts (counted in `mdp_store_write_errors_total`), acks nothing and retries with backoff;
after the restore the same store process commits the backlog, and the stored bars equal the
reference exactly (none missing, none extra, none different).

- SQLite, `lock`: the test holds `BEGIN EXCLUSIVE` on its own connection, so the store's
  `BEGIN IMMEDIATE` finds the database locked (its busy timeout is shortened with
  `MDP_STORE__WRITE_TIMEOUT_S`). We run as root, which chmod does not stop; a lock it cannot
  bypass.
- SQLite, `immutable`: `chattr +i` on the database and its WAL, so every commit fails with a disk
  I/O error even for root (skipped where the filesystem or capabilities do not allow it).
- PostgreSQL: a server of the test's own (`initdb`, `pg_ctl`), stopped with `-m immediate` and
  started again on the same port and data directory (skipped without the server binaries).

The replay is paced (100x, 6 s) so that the store commits a few dozen times and the outage
starts between two commits, once a seeded share of the bars is stored.

Seeds as in `test_kill.py` (printed; set with MDP_CHAOS_SEEDS=1,2,3).
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import pwd
import random
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS

from mdp.cli import replay_file
from mdp.supervisor import Supervisor, scrape
from tests.chaos.test_kill import SEEDS, stream_messages
from tests.conftest import DATA, PipelineFactory, wait_for
from tests.integration.test_pipeline import assert_store_matches_reference

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

STEM = "lean_equity_20131008_slice"
TICKS = 22_734
# The slice spans 600 s of event time: 6 s at 100x, so the store commits a few dozen times and
# the outage lands between two of them (at full speed the whole slice is two or three commits).
SPEED = "100"
# Small tick batches: hundreds of messages in flight rather than a few dozen.
ENV = {"MDP_PROVIDER__BATCH_MAX_TICKS": "40", "MDP_PROVIDER__BATCH_MAX_DELAY_MS": "20"}
# A write attempt gives up on a held lock after this long (default 30 s: it would just wait).
SQLITE_ENV = {**ENV, "MDP_STORE__WRITE_TIMEOUT_S": "0.25"}
# Failed write attempts the store must have made before the database is restored.
FAILED_ATTEMPTS = 3
ERRORS = "mdp_store_write_errors_total"
ROWS = "mdp_store_rows_written_total"


def expected_bars() -> int:
    """Bars of the slice in the reference (every interval), i.e. the MD_BARS messages of a run."""
    return sum(
        sum(1 for _ in (DATA / f"{STEM}.bars_{interval}.csv").open()) - 1
        for interval in ("1s", "1m")
    )


async def store_write_errors(nc: NATS) -> int:
    """Failed write attempts of the store so far, from its /metrics."""
    return int((await scrape(nc, "store", [ERRORS]))[ERRORS])


async def stored_rows(nc: NATS) -> int:
    """Rows the store has written so far (a revision or a repeat counts again)."""
    return int((await scrape(nc, "store", [ROWS]))[ROWS])


@dataclass
class Outage:
    """What happened: when it began, how long it lasted, what the store did meanwhile."""

    bars_published: int = 0
    rows_stored: int = 0
    failed_attempts: int = 0
    seconds: float = 0.0
    backlog: int = 0
    catch_up_s: float = 0.0
    replay_done_s: float = 0.0


async def run_with_outage(
    nc: NATS,
    sup: Supervisor,
    seed: int,
    break_db: Callable[[], Awaitable[None]],
    restore_db: Callable[[], Awaitable[None]],
    rows: Callable[[], Awaitable[int]] | None = None,
) -> Outage:
    """Replay the slice, break the database at a seeded point for a seeded while, restore it.

    Returns once the replay reports every bar stored. `rows` (when the database can be read
    during the outage) must not grow from the first failed attempt until the restore.
    """
    rng = random.Random(seed)
    fraction, hold_s = rng.uniform(0.1, 0.7), rng.uniform(1.0, 4.0)
    print(
        f"seed={seed}: database down once {fraction:.0%} of the bars are stored, "
        f"for at least {hold_s:.1f} s"
    )
    store_pid = sup.children["store"].proc.pid  # type: ignore[union-attr]
    outage = Outage()
    rows_before = await stored_rows(nc)
    bars_before = await stream_messages(nc, "MD_BARS")
    threshold = rows_before + max(1, int(expected_bars() * fraction))
    errors_before = await store_write_errors(nc)
    replay = asyncio.create_task(replay_file(nc, DATA / f"{STEM}.ticks.csv.gz", SPEED, timeout=90))
    broken = False
    try:
        await _wait_for_rows(nc, threshold, replay)
        await break_db()
        broken = True
        began = time.monotonic()
        outage.rows_stored = await stored_rows(nc)
        outage.bars_published = await stream_messages(nc, "MD_BARS")
        # Mid-stream: bars are still on their way to the store, which must now fail to write them.
        assert not replay.done(), "the replay was stored before the database went down"

        async def failing() -> bool:
            return await store_write_errors(nc) > errors_before

        await wait_for(failing, 20, "the store's first failed write attempt")
        rows_then = await rows() if rows is not None else 0

        async def noticed() -> bool:
            outage.failed_attempts = await store_write_errors(nc) - errors_before
            return outage.failed_attempts >= FAILED_ATTEMPTS and time.monotonic() - began > hold_s

        await wait_for(noticed, 30, f"{FAILED_ATTEMPTS} failed write attempts")
        assert not replay.done(), "the replay finished while the database was down"
        if rows is not None:
            assert await rows() == rows_then, "rows were committed while the database was down"
        # The backlog: every bar published so far that the store has not written.
        published = await stream_messages(nc, "MD_BARS") - bars_before
        outage.backlog = rows_before + published - await stored_rows(nc)
        await restore_db()
        broken = False
        restored = time.monotonic()
        outage.seconds = restored - began

        async def caught_up() -> bool:
            return await stored_rows(nc) >= rows_before + published

        await wait_for(caught_up, 30, f"the store to write the {outage.backlog} bars held back")
        outage.catch_up_s = time.monotonic() - restored
        result = await replay
        outage.replay_done_s = time.monotonic() - restored
    finally:
        if broken:
            await restore_db()
        replay.cancel()
        with contextlib.suppress(BaseException):
            await replay
    assert result["ticks"] == TICKS
    store = sup.children["store"].proc
    assert store is not None and store.poll() is None and store.pid == store_pid, (
        "the store process did not survive the outage (it must recover by itself)"
    )
    print(
        f"outage {outage.seconds:.1f} s, from {outage.bars_published} of {expected_bars()} bars "
        f"published and {outage.rows_stored} stored; {outage.failed_attempts} failed write "
        f"attempts; the {outage.backlog} bars held back stored {outage.catch_up_s:.1f} s after "
        f"the restore, the replay complete after {outage.replay_done_s:.1f} s"
    )
    return outage


async def _wait_for_rows(nc: NATS, threshold: int, replay: asyncio.Task[Any]) -> None:
    """Return as soon as the store has written `threshold` rows."""
    deadline = time.monotonic() + 60
    while await stored_rows(nc) < threshold:
        if replay.done():
            replay.result()  # a replay that failed fails the test with its own error
            raise AssertionError(f"the replay ended before the store wrote {threshold} rows")
        if time.monotonic() > deadline:
            raise AssertionError(f"the store never wrote {threshold} rows")
        await asyncio.sleep(0.01)


# ---------------------------------------------------------------------------------------------
# SQLite


class SqliteLocker:
    """A connection of the test's own that takes (and releases) the database's write lock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # Used from worker threads (one at a time): a lock can wait for a commit in progress.
        self.conn = sqlite3.connect(path, timeout=10, isolation_level=None, check_same_thread=False)

    async def lock(self) -> None:
        """Hold the write lock (in WAL mode EXCLUSIVE is the write lock; readers still read)."""
        await asyncio.to_thread(self.conn.execute, "BEGIN EXCLUSIVE")

    async def unlock(self) -> None:
        """Release it."""
        await asyncio.to_thread(self.conn.execute, "ROLLBACK")

    async def rows(self) -> int:
        """Committed bars, read on a second connection (WAL readers are not blocked)."""

        def count() -> int:
            with contextlib.closing(sqlite3.connect(self.path, timeout=10)) as conn:
                return int(conn.execute("SELECT count(*) FROM bars").fetchone()[0])

        return await asyncio.to_thread(count)

    def close(self) -> None:
        """Drop the connection (and any lock it holds)."""
        self.conn.close()


def chattr(flag: str, *paths: Path) -> None:
    """`chattr +i` / `-i`: an immutable file cannot be written, not even by root."""
    subprocess.run(["chattr", flag, *map(str, paths)], check=True, capture_output=True)


def chattr_works(tmp_path: Path) -> str | None:
    """Why `chattr +i` cannot be used here, or None when it can."""
    if shutil.which("chattr") is None:
        return "chattr is not installed"
    probe = tmp_path / "immutable-probe"
    probe.write_bytes(b"")
    try:
        chattr("+i", probe)
    except subprocess.CalledProcessError as exc:
        return f"chattr +i is not permitted here: {exc.stderr.decode().strip()}"
    chattr("-i", probe)
    return None


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("how", ["lock", "immutable"])
async def test_sqlite_unwritable_mid_stream_then_restored_store_catches_up(
    pipeline: PipelineFactory, nc: NATS, tmp_path: Path, how: str, seed: int
) -> None:
    if how == "immutable" and (reason := chattr_works(tmp_path)):
        pytest.skip(reason)
    db = tmp_path / "bars.db"
    store_url = f"sqlite:///{db}"
    sup = pipeline(store_url=store_url, env=SQLITE_ENV)
    await sup.wait_ready()  # the store has created the file (and its WAL) by now
    locker = SqliteLocker(db)
    # The WAL, not the main file, takes the commits; the shared-memory index (-shm) stays
    # writable: it is mmapped, and a write fault on an immutable mapping is SIGBUS, not an error.
    files = (db, Path(f"{db}-wal"))
    immutable = False

    async def break_db() -> None:
        nonlocal immutable
        if how == "lock":
            await locker.lock()
        else:
            chattr("+i", *files)
            immutable = True

    async def restore_db() -> None:
        nonlocal immutable
        if how == "lock":
            await locker.unlock()
        else:
            chattr("-i", *files)
            immutable = False

    try:
        await run_with_outage(nc, sup, seed, break_db, restore_db, locker.rows)
    finally:
        if immutable:  # else neither the store's shutdown nor pytest's clean-up can write
            chattr("-i", *files)
        locker.close()
    await assert_store_matches_reference(store_url, STEM)


# ---------------------------------------------------------------------------------------------
# PostgreSQL: a server of the test's own, so it can be stopped


@dataclass
class PrivatePostgres:
    """A PostgreSQL cluster in a temporary directory, run as the `postgres` OS user if root."""

    bindir: Path
    datadir: Path
    port: int
    user: str | None  # run the binaries as this OS user (initdb refuses root)

    @property
    def url(self) -> str:
        """Its maintenance database, trust authentication."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def run(self, *args: str, timeout: float = 60) -> None:
        """Run one of the cluster's binaries (as `user`), failing with its output."""
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.user is not None:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr[-2000:]}")

    def init(self) -> None:
        """initdb with trust auth, listening on 127.0.0.1:port only (socket in the data dir)."""
        self.run("initdb", "-D", str(self.datadir), "-U", "postgres", "--auth=trust",
                 "--no-sync", "-E", "UTF8", "--locale=C")  # fmt: skip
        with (self.datadir / "postgresql.conf").open("a") as conf:
            conf.write(
                f"port = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.datadir}'\nmax_connections = 30\n"
            )

    def start(self) -> None:
        """Start and wait until it accepts connections."""
        self.run("pg_ctl", "-D", str(self.datadir), "-l", str(self.datadir / "server.log"),
                 "-w", "-t", "60", "start")  # fmt: skip

    def kill(self) -> None:
        """Stop at once, without a checkpoint: what a crash looks like to its clients."""
        self.run("pg_ctl", "-D", str(self.datadir), "-m", "immediate", "-w", "stop")

    def running(self) -> bool:
        """Whether its postmaster is up."""
        return (self.datadir / "postmaster.pid").exists()


def _postgres_bindir() -> Path | None:
    """The newest PostgreSQL server binaries of this machine (Debian layout, then PATH)."""
    dirs = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(Path(d).parent.name or 0)
    )
    for candidate in reversed(dirs):
        if (Path(candidate) / "initdb").exists() and (Path(candidate) / "pg_ctl").exists():
            return Path(candidate)
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(initdb).parent
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    """A fresh PostgreSQL server on a free port, always stopped and removed afterwards."""
    bindir = _postgres_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl in /usr/lib/postgresql/*/bin)")
    user: str | None = None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` OS user to run initdb as")
        if shutil.which("runuser") is None:
            pytest.skip("running as root and `runuser` is missing (initdb refuses root)")
        user = "postgres"
    # Not under tmp_path: pytest makes that 0700 for root, and the server runs as `postgres`.
    root = Path(tempfile.mkdtemp(prefix="mdp-pg-"))
    datadir = root / "data"
    datadir.mkdir(mode=0o700)
    if user is not None:
        entry = pwd.getpwnam(user)
        for path in (root, datadir):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    server = PrivatePostgres(bindir, datadir, _free_port(), user)
    try:
        server.init()
        server.start()
        yield server
    finally:
        if server.running():
            with contextlib.suppress(Exception):
                server.kill()
        shutil.rmtree(root, ignore_errors=True)
        assert not server.running(), f"PostgreSQL in {datadir} did not stop"


@pytest.mark.postgres
@pytest.mark.parametrize("seed", SEEDS)
async def test_postgres_stopped_mid_stream_then_restarted_store_catches_up(
    private_postgres: PrivatePostgres, pipeline: PipelineFactory, nc: NATS, seed: int
) -> None:
    # The server fixture comes first, so it is torn down last, after the store has stopped.
    server = private_postgres
    sup = pipeline(store_url=server.url, env=ENV)
    await sup.wait_ready()

    async def break_db() -> None:
        await asyncio.to_thread(server.kill)

    async def restore_db() -> None:
        await asyncio.to_thread(server.start)

    outage = await run_with_outage(nc, sup, seed, break_db, restore_db)
    assert outage.failed_attempts >= FAILED_ATTEMPTS
    await assert_store_matches_reference(server.url, STEM)
