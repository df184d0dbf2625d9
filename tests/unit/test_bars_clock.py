"""Live and replay give the same bars for the same ticks, whatever the replay speed.

The same real ticks go through the engine the way the service would see them:
- at full speed (`clock_rate` 0, the wall clock irrelevant),
- live (`clock_rate` 1, the wall clock being the recorded receive time),
- paced at N times the recorded speed (`clock_rate` N, the wall clock advancing as event time / N,
  as the replay provider paces it, plus a transport latency that varies from batch to batch),
with the service's periodic `advance()` in between and a realistic grace of 500 ms. The final
bars are identical in every mode and equal the reference; a bar is revised only when its ticks
really arrive later than grace allows.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

from mdp.services.aggregator.bars import BarEngine, LateTick
from mdp.shared.contract.messages import Bar, Tick
from tests.reference import compare_bars, latest_revisions, load_reference, load_ticks

DATA = Path(__file__).resolve().parents[1] / "data"
SLICES = ["lean_equity_20131008_slice", "binance_20240808_09_slice"]
INTERVALS = ("1s", "1m")
S = 1_000_000_000
MS = 1_000_000
GRACE = 500 * MS
WINDOW = 60 * S
WALL0 = 1_000_000 * S  # the wall clock at the start of a run, unrelated to event time
TIMER = 50 * MS  # the service's advance() period
BATCH_DELAY = 100 * MS  # the provider's batch_max_delay_ms


@cache
def ticks_of(stem: str) -> list[tuple[str, Tick]]:
    return load_ticks(DATA / f"{stem}.ticks.csv.gz")


def runs(ticks: list[tuple[str, Tick]], limit: int = 1000) -> Iterator[tuple[str, list[Tick]]]:
    """Consecutive ticks of one symbol, at most `limit`: what one TickBatch carries."""
    symbol, batch = "", []
    for sym, tick in ticks:
        if batch and (sym != symbol or len(batch) >= limit):
            yield symbol, batch
            batch = []
        symbol = sym
        batch.append(tick)
    if batch:
        yield symbol, batch


class Run:
    """Feeds one engine like the service does and collects everything it emits."""

    def __init__(self) -> None:
        self.engine = BarEngine(INTERVALS, grace_ns=GRACE, revise_window_ns=WINDOW)
        self.bars: list[Bar] = []
        self.late: list[LateTick] = []
        self.by_timer = 0  # bars the wall clock closed (idle symbols), not a tick
        self.now = WALL0
        self.next_timer = WALL0 + TIMER

    def deliver(self, symbol: str, ticks: list[Tick], now: int, rate: float) -> None:
        """The timer fires while waiting for `now`, then the batch is folded."""
        now = max(now, self.now)  # one consumer: batches are handled in order, time moves on
        while self.next_timer <= now:
            closed = self.engine.advance(self.next_timer).bars
            self.bars += closed
            self.by_timer += len(closed)
            self.next_timer += TIMER
        self.now = now
        out = self.engine.on_ticks(symbol, "replay", ticks, now, clock_rate=rate)
        self.bars += out.bars
        self.late += out.late

    def finish(self) -> list[Bar]:
        for symbol in self.engine.symbols:
            self.bars += self.engine.end_of_stream(symbol).bars
        assert self.engine.open_bars() == 0
        return self.bars


def full_speed(ticks: list[tuple[str, Tick]]) -> Run:
    run = Run()
    for symbol, batch in runs(ticks):
        run.deliver(symbol, batch, run.now, 0.0)
    return run


def live(ticks: list[tuple[str, Tick]]) -> Run:
    """Each batch arrives when its last tick was received (the file's receive time)."""
    run = Run()
    offset = WALL0 - ticks[0][1].recv
    for symbol, batch in runs(ticks, limit=1):  # live feeds are not batched by the source
        run.deliver(symbol, batch, batch[-1].recv + offset, 1.0)
    return run


def paced(
    ticks: list[tuple[str, Tick]], speed: float, max_latency: int, stalls: int = 0, seed: int = 7
) -> Run:
    """The replay provider at `speed`, then `[0, max_latency]` ns of transport per batch.

    A row is due at the running maximum event time / speed; rows are batched per symbol like
    the provider does (a batch leaves when it holds 1000 ticks or its first tick has waited
    50 ms). `stalls` batches are held up 3 s of wall clock (a slow consumer, a reconnect), and
    everything behind them waits too: the stream keeps its order.
    """
    rng = random.Random(seed)
    run = Run()
    buffers: dict[str, tuple[int, list[Tick]]] = {}  # symbol -> (first due, ticks)
    sent: list[tuple[int, str, list[Tick]]] = []
    ts0 = running_max = ticks[0][1].ts
    for symbol, tick in ticks:
        running_max = max(running_max, tick.ts)
        due = WALL0 + int((running_max - ts0) / speed)
        for sym, (first, batch) in sorted(buffers.items(), key=lambda kv: kv[1][0]):
            if first + BATCH_DELAY <= due:
                sent.append((first + BATCH_DELAY, sym, batch))
                del buffers[sym]
        first, batch = buffers.setdefault(symbol, (due, []))
        batch.append(tick)
        if len(batch) >= 1000:
            sent.append((due, symbol, batch))
            del buffers[symbol]
    for sym, (first, batch) in sorted(buffers.items(), key=lambda kv: kv[1][0]):
        sent.append((first + BATCH_DELAY, sym, batch))
    stalled = set(rng.sample(range(len(sent)), stalls))
    for i, (at, symbol, batch) in enumerate(sent):
        latency = 3 * S if i in stalled else rng.randint(0, max_latency)
        run.deliver(symbol, batch, at + latency, speed)
    return run


def final(bars: list[Bar]) -> dict[tuple[str, str, int], tuple[object, ...]]:
    """The latest revision of every bar, without its rev and provider."""
    return {
        key: (b.open, b.high, b.low, b.close, b.volume, b.trade_count, b.vwap, b.end)
        for key, b in latest_revisions(bars).items()
    }


def assert_reference(bars: list[Bar], stem: str) -> None:
    for interval in INTERVALS:
        reference = load_reference(DATA / f"{stem}.bars_{interval}.csv")
        problems = compare_bars(bars, reference, interval)
        assert problems == [], f"{stem} {interval}: {len(problems)} problems: {problems[:5]}"


def revisions(bars: list[Bar]) -> int:
    return sum(b.rev > 0 for b in bars)


@pytest.mark.parametrize("stem", SLICES)
def test_full_speed_live_and_paced_give_identical_bars(stem: str) -> None:
    ticks = ticks_of(stem)
    reference_run = full_speed(ticks)
    expected = reference_run.finish()
    assert_reference(expected, stem)
    assert revisions(expected) == 0 and reference_run.late == []
    assert reference_run.by_timer == 0  # at full speed only event time closes bars

    # Batching (up to 50 ms) and transport (up to 200 ms) on top of the feed's own disorder
    # (Binance: up to 214 ms behind the other symbols, 220 ms of receive jitter) stay within
    # the 500 ms grace.
    modes = {"live": live(ticks)} | {
        f"paced x{speed:g}": paced(ticks, speed, max_latency=200 * MS)
        for speed in (1.0, 10.0, 1000.0)
    }
    for name, run in modes.items():
        bars = run.finish()
        assert run.late == [], name
        assert final(bars) == final(expected), name
        # nothing arrived later than grace allows: every bar was emitted once, complete
        assert revisions(bars) == 0, f"{name}: {revisions(bars)} revisions"
        assert len(bars) == len(expected), name
    # The wall clock closed bars of symbols that went quiet, as live must; at 1000x the next
    # tick of a symbol always comes sooner than 500 ms of wall clock (500 s of event time).
    assert all(modes[name].by_timer > 0 for name in ("live", "paced x1", "paced x10"))


@pytest.mark.parametrize("stem", SLICES)
@pytest.mark.parametrize("speed", [1.0, 1000.0])
def test_stalled_batches_are_revised_never_dropped(stem: str, speed: float) -> None:
    """Batches held up far beyond grace (3 s of wall clock; 50 min of event time at 1000x).

    The wall clock closes their bars without them; when they arrive they revise those bars
    (they are not behind their symbols' data, only behind the clock). Nothing is dead-lettered
    and the final bars are still exactly the reference.
    """
    ticks = ticks_of(stem)
    run = paced(ticks, speed, max_latency=50 * MS, stalls=20)
    bars = run.finish()
    assert run.late == []
    assert revisions(bars) > 0
    assert_reference(bars, stem)
    assert final(bars) == final(full_speed(ticks).finish())
