"""`mdp.client.PipelineRuntime` against a real nats-server and the five services as processes."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TypeVar

import pytest

from mdp.client import ControlRequestError, PipelineRuntime, _highest_rev_only
from mdp.shared.contract.control import StartReply, StatusReply, StopReply
from mdp.shared.contract.messages import Bar, TickBatch
from mdp.shared.natsserver import EmbeddedNats
from tests.conftest import PipelineFactory, wait_for

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SYMBOLS = ["AAPL", "BRK.B"]
T = TypeVar("T")


async def take(it: AsyncIterator[T], n: int, timeout: float = 30.0) -> list[T]:
    """The next `n` items of `it`, failing after `timeout` seconds."""
    items: list[T] = []
    deadline = time.monotonic() + timeout
    while len(items) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"got {len(items)} of {n} items within {timeout} s")
        items.append(await asyncio.wait_for(anext(it), left))
    return items


def seqs(batches: list[TickBatch]) -> list[int]:
    """Every tick seq of the batches, in order."""
    return [tick.seq for batch in batches for tick in batch.ticks]


async def test_control_quotes_bars_and_the_example(
    pipeline: PipelineFactory, nats_server: EmbeddedNats
) -> None:
    sup = pipeline()
    await sup.wait_ready()
    async with PipelineRuntime(nats_server.url) as rt:
        with pytest.raises(ControlRequestError) as refused:
            await rt.start("no-such-provider", symbols=["AAPL"])
        assert refused.value.code == "unknown_provider"

        quotes = rt.stream_quotes(SYMBOLS)  # new messages only, from the first `anext`
        bars = rt.stream_bars(SYMBOLS, interval="1s")
        started = await rt.start("synthetic", symbols=SYMBOLS, params={"rate": 100})
        assert isinstance(started, StartReply)
        assert started.job.symbols == SYMBOLS

        got = await take(quotes, 20)
        assert {b.symbol for b in got} == set(SYMBOLS)  # real symbols, the dot included
        assert all(b.provider == "synthetic" and b.ticks for b in got)
        for symbol in SYMBOLS:
            mine = seqs([b for b in got if b.symbol == symbol])
            assert mine == sorted(set(mine)), f"{symbol}: out of order or doubled"

        revs: dict[tuple[str, int], int] = {}
        for bar in await take(bars, 6):
            assert isinstance(bar, Bar) and bar.interval == "1s" and bar.symbol in SYMBOLS
            key = (bar.symbol, bar.start)
            assert bar.rev > revs.get(key, -1), f"rev {bar.rev} after {revs[key]} for {key}"
            revs[key] = bar.rev
        assert {symbol for symbol, _ in revs} == set(SYMBOLS)

        status = await rt.status()
        assert isinstance(status, StatusReply)
        [job] = [j for j in status.jobs if j.job == "default"]
        assert job.provider == "synthetic" and job.symbols == SYMBOLS

        stopped = await rt.stop()
        assert isinstance(stopped, StopReply) and stopped.status == "stopped"

    example = await asyncio.create_subprocess_exec(
        sys.executable, str(REPO / "examples" / "run_quote_stream.py"), nats_server.url,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(example.communicate(), 90)
    text = out.decode()
    assert example.returncode == 0, text
    assert "BRK.B" in text and "status: job example" in text and "stop: stopped" in text


async def test_no_control_service_is_a_clear_timeout(nats_server: EmbeddedNats) -> None:
    async with PipelineRuntime(nats_server.url, request_timeout=0.5) as rt:
        with pytest.raises(TimeoutError, match=r"ingest\.control\.status.*control service"):
            await rt.status()


async def test_durable_quotes_resume_after_the_client_restarts(
    pipeline: PipelineFactory, nats_server: EmbeddedNats
) -> None:
    sup = pipeline()
    await sup.wait_ready()
    durable = "client-test"
    async with PipelineRuntime(nats_server.url) as rt:
        first_feed = rt.stream_quotes(["BRK.B"], durable=durable)
        await rt.start("synthetic", symbols=["BRK.B"], params={"rate": 50})
        first = await take(first_feed, 5)
        # The iterator is left suspended, as after a `break`: closing the runtime acks the
        # item taken last and hands the fetched rest back to the durable consumer.
    async with PipelineRuntime(nats_server.url) as probe:
        at_close = (await probe.js.consumer_info("MD_QUOTES", durable)).num_pending
        await wait_for(
            lambda: _pending_above(probe, durable, at_close + 10),
            what="quotes published while no client is connected",
        )
    async with PipelineRuntime(nats_server.url) as rt:
        second = await take(rt.stream_quotes(["BRK.B"], durable=durable), 15)
        await rt.stop()
    before, after = seqs(first), seqs(second)
    assert all(b.symbol == "BRK.B" for b in first + second)
    assert after[0] == before[-1] + 1, f"resumed at {after[0]} after {before[-1]}"
    assert before + after == sorted(set(before + after)), "a tick came twice or out of order"


async def _pending_above(rt: PipelineRuntime, durable: str, n: int) -> bool:
    info = await rt.js.consumer_info("MD_QUOTES", durable)
    return info.num_pending >= n


async def test_quotes_continue_across_a_server_restart_with_partitions(
    pipeline: PipelineFactory, nats_server: EmbeddedNats
) -> None:
    """Quote partitioning on (md.quotes.<p>.<sym> stored), then the server restarts."""
    sup = pipeline(env={"MDP_STREAM__QUOTE_PARTITIONS": "3"})
    await sup.wait_ready()
    async with PipelineRuntime(nats_server.url) as rt:
        info = await rt.js.stream_info("MD_QUOTES")
        assert info.config.subject_transform is not None  # partitioned
        feeds = {
            "ordered": rt.stream_quotes(SYMBOLS),
            "durable": rt.stream_quotes(SYMBOLS, durable="across-restart"),
        }
        await rt.start("synthetic", symbols=SYMBOLS, params={"rate": 50})
        got: dict[str, list[TickBatch]] = {kind: [] for kind in feeds}
        for kind, feed in feeds.items():
            got[kind] = await take(feed, 6)
            assert {b.symbol for b in got[kind]} == set(SYMBOLS), kind

        nats_server.stop()
        restarted_ns = time.time_ns()
        nats_server.start()  # the same port and store directory

        deadline = time.monotonic() + 60
        for kind, feed in feeds.items():
            while not any(b.ticks[0].recv > restarted_ns for b in got[kind]):
                assert time.monotonic() < deadline, f"{kind}: no quotes after the server restart"
                got[kind] += await take(feed, 1, timeout=deadline - time.monotonic())
            for symbol in SYMBOLS:
                mine = seqs([b for b in got[kind] if b.symbol == symbol])
                assert mine == sorted(set(mine)), f"{kind} {symbol}: doubled or out of order"
        await wait_for(lambda: _stop_ok(rt), timeout=30, what="stop after the restart")


def test_bars_keep_only_a_higher_rev() -> None:
    """The revision filter of `stream_bars`: higher rev passes again, lower or equal never."""
    keep = _highest_rev_only()

    def bar(symbol: str, start: int, rev: int) -> Bar:
        return Bar(symbol, "1s", start, start + 1, 1, 1, 1, 1, 1, 1, 1.0, "synthetic", rev)

    sequence = [("A", 1, 0), ("A", 1, 0), ("A", 1, 2), ("A", 1, 1), ("A", 2, 0), ("B", 1, 0)]
    assert [keep(bar(*args)) for args in sequence] == [True, False, True, False, True, True]


async def _stop_ok(rt: PipelineRuntime) -> bool:
    try:
        await rt.stop()
    except TimeoutError:
        return False
    return True
