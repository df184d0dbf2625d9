"""Bars you can trust, through the running services: late ticks, revisions, dead letters, speed.

Each test replays a real slice (or a copy of it with some ticks moved later in the file) through
a real nats-server and the five services as subprocesses, then checks the stored bars, the
aggregator's `mdp_aggregator_late_ticks_total{interval}` (and, opted in,
`mdp_aggregator_late_ticks_by_symbol_total{symbol}`) and the `md.dlq.aggregator` dead letters.

How a displaced tick fares is computed here, independently of the engine, from the definition:
the aggregator folds one provider batch at a time and judges it against the largest event time
of the symbol before the batch (`wm`, a full-speed replay has no wall-clock part). For interval
I, a tick at `ts` whose bar ends at `end` is late when `end <= wm - grace`; a late tick is
dropped (counted and dead-lettered) when `wm - ts > revise_window`, else it revises its bar. A
batch holds at most K consecutive ticks of one symbol (`MDP_PROVIDER__BATCH_MAX_TICKS`), so `wm`
is known only to lie between the symbol's maximum K-1 ticks before the displaced tick and its
maximum just before it: only ticks whose fate is the same over that whole range are displaced,
which makes every expectation exact whatever the provider's batch boundaries turn out to be.
"""

from __future__ import annotations

import asyncio
import csv
import gzip
import random
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client as NATS
from prometheus_client.parser import text_string_to_metric_families

from mdp.cli import replay_file
from mdp.services.store.writers import read_bars
from mdp.shared.contract.messages import Bar, interval_ns
from mdp.shared.contract.names import DLQ_REASON
from tests.batch_bars import RawTick, batch_bars, raw_ticks, read_raw_ticks
from tests.conftest import DATA, PipelineFactory, wait_for
from tests.reference import compare_bars, load_reference

pytestmark = pytest.mark.integration

S = 1_000_000_000
MS = 1_000_000
INTERVALS = ("1s", "1m")
SLICES = ["lean_equity_20131008_slice", "binance_20240808_09_slice"]
BATCH = 25  # MDP_PROVIDER__BATCH_MAX_TICKS for the shuffled replays


# -- displacing ticks ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Fate:
    """What the aggregator must do with one displaced tick, per interval."""

    dropped: frozenset[str]  # intervals for which it is beyond the window: dead-lettered
    revises_1s: bool  # its 1 s bar surely closed before it arrived (within the window)


def fate_at(ts: int, wm: int, grace: int, window: int) -> tuple[frozenset[str], bool]:
    """The definition: late when the bar's end <= wm - grace; dropped when also wm - ts > window."""
    dropped = set()
    closed_1s = False
    for interval in INTERVALS:
        width = interval_ns(interval)
        closed = ts - ts % width + width <= wm - grace
        if closed and wm - ts > window:
            dropped.add(interval)
        elif closed and interval == "1s":
            closed_1s = True
    return frozenset(dropped), closed_1s


@dataclass
class Shuffled:
    """A copy of a slice with some ticks moved later; `ticks` in the new file order."""

    path: Path
    ticks: list[RawTick]
    fates: dict[int, Fate]  # index in `ticks` -> fate, for every displaced tick

    def dropped(self) -> set[tuple[str, int]]:
        """(interval, index) of every tick the aggregator must drop."""
        return {(iv, i) for i, fate in self.fates.items() for iv in fate.dropped}


def displace(
    src: Path,
    dst: Path,
    *,
    seed: int,
    per_symbol: int,
    lags: list[tuple[int, int]],
    grace: int,
    window: int,
    batch: int = BATCH,
) -> Shuffled:
    """Move up to `per_symbol` ticks of each symbol later in the file, `lags` behind its maximum.

    A displaced tick is reinserted right after the first tick of its symbol that puts the
    symbol's maximum event time at least the drawn lag ahead of it. It stays displaced only if
    the lag there is within the drawn range and its fate does not depend on batch boundaries
    (see the module docstring); the others go back to their place, and the check is repeated
    until it holds for all. Only ticks with a timestamp unique within their symbol are moved:
    among equal timestamps arrival order decides open and close, and the reference bars assume
    the original order.
    """
    header, rows = read_raw_ticks(src)
    original = raw_ticks(header, rows)
    rng = random.Random(seed)
    same_ts = Counter((t.symbol, t.ts) for t in original)
    by_symbol: dict[str, list[int]] = defaultdict(list)
    for i, t in enumerate(original):
        by_symbol[t.symbol].append(i)
    wanted: dict[int, tuple[int, int]] = {}  # original index -> lag range
    for symbol in sorted(by_symbol):
        unique = [i for i in by_symbol[symbol] if same_ts[(symbol, original[i].ts)] == 1]
        for i in rng.sample(unique, min(per_symbol, len(unique))):
            lo, hi = rng.choice(lags)
            wanted[i] = (rng.randint(lo, hi), hi)

    while True:
        after: dict[int, list[int]] = defaultdict(list)  # staying row -> rows reinserted after
        for indices in by_symbol.values():
            running, maxima, stay = 0, [], []
            for j in indices:
                if j not in wanted:
                    running = max(running, original[j].ts)
                    maxima.append(running)
                    stay.append(j)
            for i in (i for i in indices if i in wanted):
                lag = wanted[i][0]
                pos = next((k for k, m in enumerate(maxima) if m >= original[i].ts + lag), None)
                if pos is not None:
                    after[stay[pos]].append(i)
        order: list[int] = []
        for i in range(len(original)):
            if i not in wanted:
                order.append(i)
                order.extend(sorted(after.get(i, [])))
        placed = set(order)
        bad = {i for i in wanted if i not in placed}  # no tick far enough ahead: leave it
        seen: dict[str, list[int]] = defaultdict(list)  # symbol -> its event times so far
        fates: dict[int, Fate] = {}
        for k, i in enumerate(order):
            tick = original[i]
            history = seen[tick.symbol]
            if i in wanted:
                wm_hi = max(history)
                # the batch may start up to `batch - 1` ticks of the symbol earlier
                wm_lo = max(history[: len(history) - (batch - 1)], default=0)
                dropped_hi, _ = fate_at(tick.ts, wm_hi, grace, window)
                dropped_lo, revises_lo = fate_at(tick.ts, wm_lo, grace, window)
                if dropped_lo != dropped_hi or wm_hi - tick.ts > wanted[i][1]:
                    bad.add(i)
                fates[k] = Fate(dropped_hi, revises_lo)
            history.append(tick.ts)
        if not bad:
            break
        for i in bad:
            del wanted[i]

    with gzip.open(dst, "wt", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows[i] for i in order)
    ticks = raw_ticks(header, [rows[i] for i in order])  # seq renumbered in the new order
    return Shuffled(dst, ticks, fates)


# -- reading what the services did --------------------------------------------------------------


async def late_ticks(nc: NATS, by: str = "symbol") -> dict[str, float]:
    """Late ticks by symbol (`mdp_aggregator_late_ticks_by_symbol_total`, opt-in) or by
    interval (`mdp_aggregator_late_ticks_total`), scraped from the aggregator's /metrics."""
    name = f"mdp_aggregator_late_ticks{'_by_symbol' if by == 'symbol' else ''}_total"
    info = await nc.request("$SRV.INFO.mdp-aggregator", b"", timeout=2)
    port = msgspec.json.decode(info.data)["metadata"]["metrics_port"]

    def fetch() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            return str(resp.read().decode())

    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(await asyncio.to_thread(fetch)):
        for sample in family.samples:
            if sample.name == name:
                totals[sample.labels[by]] = sample.value
    return totals


async def aggregator_dead_letters(nc: NATS) -> list[tuple[dict[str, Any], str]]:
    """Every message on `md.dlq.aggregator`: (JSON body, reason header)."""
    js = nc.jetstream()
    state = (await js.stream_info("MD_DLQ")).state
    out = []
    for seq in range(state.first_seq, state.last_seq + 1) if state.messages else ():
        msg = await js.get_msg("MD_DLQ", seq)
        if msg.subject == "md.dlq.aggregator":
            out.append((msgspec.json.decode(msg.data), (msg.headers or {}).get(DLQ_REASON, "")))
    return out


def revised_1s_bars(shuffled: Shuffled, skip: set[tuple[str, int]]) -> set[tuple[str, str, int]]:
    """1 s bars that a displaced tick must have revised (rev >= 1 in the store).

    The tick's bar surely closed before it arrived, within the window, and some other tick of
    that bar arrived before it (otherwise the bar is created late, at rev 0).
    """
    width = interval_ns("1s")
    first_arrival: dict[tuple[str, int], int] = {}
    for k, t in enumerate(shuffled.ticks):
        if ("1s", k) not in skip:
            first_arrival.setdefault((t.symbol, t.ts // width), k)
    keys = set()
    for k, fate in shuffled.fates.items():
        t = shuffled.ticks[k]
        if fate.revises_1s and first_arrival[(t.symbol, t.ts // width)] < k:
            keys.add((t.symbol, "1s", t.ts // width * width))
    return keys


def assert_bars(bars: list[Bar], expected: dict[Any, Any], what: str) -> None:
    for interval in INTERVALS:
        problems = compare_bars(bars, expected, interval)
        assert not problems, f"{what} {interval}: {len(problems)} problems, e.g. {problems[:3]}"


# -- the tests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("stem", SLICES)
async def test_late_ticks_within_the_window_revise_to_the_reference(
    pipeline: PipelineFactory, nc: NATS, tmp_path: Path, stem: str
) -> None:
    """Ticks 2-20 s behind their symbol (default 500 ms grace, 60 s window) revise, never drop."""
    shuffled = displace(
        DATA / f"{stem}.ticks.csv.gz",
        tmp_path / f"{stem}.late.csv.gz",
        seed=4,
        per_symbol=12,
        lags=[(2 * S, 20 * S)],
        grace=500 * MS,
        window=60 * S,
    )
    must_revise = revised_1s_bars(shuffled, set())
    assert len(shuffled.fates) >= 40 and len(must_revise) >= 10  # the generator did its job
    store_url = f"sqlite:///{tmp_path / 'bars.db'}"
    # The shuffled file is in tmp_path, outside the default replay roots.
    env = {"MDP_PROVIDER__BATCH_MAX_TICKS": str(BATCH), "MDP_REPLAY__ROOTS": str(tmp_path)}
    sup = pipeline(store_url=store_url, env=env)
    await sup.wait_ready()

    result = await replay_file(nc, shuffled.path, "max", timeout=120)
    assert result["ticks"] == len(shuffled.ticks)

    bars = await read_bars(store_url)
    reference = {}
    for interval in INTERVALS:
        reference |= load_reference(DATA / f"{stem}.bars_{interval}.csv")
    assert_bars(bars, reference, stem)
    stored_rev = {(b.symbol, b.interval, b.start): b.rev for b in bars}
    assert {key: stored_rev[key] for key in must_revise if stored_rev[key] < 1} == {}
    # within the window nothing is dropped, and receive-order disorder across symbols is normal
    assert sum((await late_ticks(nc, "interval")).values()) == 0
    assert await aggregator_dead_letters(nc) == []


@pytest.mark.parametrize("stem", SLICES)
async def test_late_ticks_beyond_the_window_are_counted_and_dead_lettered(
    pipeline: PipelineFactory, nc: NATS, tmp_path: Path, stem: str
) -> None:
    """A 5 s window, no grace: ticks 7-40 s behind are dropped, each one accounted for.

    A tick beyond the window for 1 s may still fold into a 1 m bar that is open: lateness is
    per interval, and so are the dead letters. Ticks 1-4 s behind revise as before.
    """
    window, grace = 5 * S, 0
    shuffled = displace(
        DATA / f"{stem}.ticks.csv.gz",
        tmp_path / f"{stem}.later.csv.gz",
        seed=4,
        per_symbol=12,
        lags=[(1 * S, 4 * S), (7 * S, 40 * S)],
        grace=grace,
        window=window,
    )
    dropped = shuffled.dropped()
    dropped_1s = {k for iv, k in dropped if iv == "1s"}
    assert len(dropped_1s) >= 10 and len(dropped) > len(dropped_1s)
    assert {k for iv, k in dropped if iv == "1m"} < dropped_1s  # 1m is dropped less often
    store_url = f"sqlite:///{tmp_path / 'bars.db'}"
    env = {
        "MDP_PROVIDER__BATCH_MAX_TICKS": str(BATCH),
        "MDP_POLICY__BARS__REVISE_WINDOW_SECONDS": "5",
        "MDP_POLICY__BARS__GRACE_MS": "0",
        "MDP_REPLAY__ROOTS": str(tmp_path),
        "MDP_AGGREGATOR__LATE_TICKS_BY_SYMBOL": "true",
    }
    sup = pipeline(store_url=store_url, env=env)
    await sup.wait_ready()

    result = await replay_file(nc, shuffled.path, "max", timeout=120)
    assert result["ticks"] == len(shuffled.ticks)

    # the dead letters: exactly the dropped ticks, once per interval, with the reason
    letters: list[tuple[dict[str, Any], str]] = []

    async def all_letters() -> bool:
        letters[:] = await aggregator_dead_letters(nc)
        return len(letters) >= len(dropped)

    await wait_for(all_letters, timeout=10, what=f"{len(dropped)} dead letters")
    expected_letters = Counter(
        (interval, t.symbol, t.seq, t.ts, t.recv, float(t.price), float(t.size))
        for interval, k in dropped
        for t in [shuffled.ticks[k]]
    )
    got_letters = Counter(
        (body["interval"], body["symbol"], tick["seq"], tick["ts"], tick["recv"], tick["price"],
         tick["size"])
        for body, _ in letters
        for tick in [body["tick"]]
    )  # fmt: skip
    assert got_letters == expected_letters
    for _, reason in letters:
        assert reason.startswith("beyond revise window:") and "(window 5 s)" in reason, reason

    # the counters: one per dropped tick and interval, by interval and (opted in) by symbol
    per_symbol = Counter(shuffled.ticks[k].symbol for _, k in dropped)
    assert await late_ticks(nc) == {s: float(n) for s, n in per_symbol.items()}
    per_interval = Counter(interval for interval, _ in dropped)
    assert await late_ticks(nc, "interval") == {i: float(n) for i, n in per_interval.items()}

    # the stored bars: the definition applied to every tick that was not dropped
    bars = await read_bars(store_url)
    expected = batch_bars(shuffled.ticks, INTERVALS, skip=dropped)
    assert_bars(bars, expected, f"{stem} without the dropped ticks")
    reference_1s = load_reference(DATA / f"{stem}.bars_1s.csv")
    assert compare_bars(bars, reference_1s, "1s") != []  # the drops are visible, not hidden
    stored_rev = {(b.symbol, b.interval, b.start): b.rev for b in bars}
    must_revise = revised_1s_bars(shuffled, dropped)
    assert must_revise and all(stored_rev[key] >= 1 for key in must_revise)


@pytest.mark.parametrize(("stem", "speed"), [(SLICES[0], 1000), (SLICES[1], 200)])
async def test_paced_replay_stores_the_reference_bars(
    pipeline: PipelineFactory, nc: NATS, tmp_path: Path, stem: str, speed: int
) -> None:
    """Replayed at N x the recorded pace, bars close by the wall clock and still equal the
    reference: transport latency is wall-clock time, never mistaken for late data."""
    store_url = f"sqlite:///{tmp_path / 'bars.db'}"
    sup = pipeline(store_url=store_url)
    await sup.wait_ready()
    await replay_file(nc, DATA / f"{stem}.ticks.csv.gz", str(speed), timeout=60)
    bars = await read_bars(store_url)
    reference = {}
    for interval in INTERVALS:
        reference |= load_reference(DATA / f"{stem}.bars_{interval}.csv")
    assert_bars(bars, reference, f"{stem} at {speed}x")
    assert sum((await late_ticks(nc, "interval")).values()) == 0
    assert await aggregator_dead_letters(nc) == []
