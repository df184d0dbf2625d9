"""Provider adapters (synthetic, replay) and their registry, driven through a recording sink."""

from __future__ import annotations

import asyncio
import csv
import gzip
import itertools
import math
import tempfile
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mdp.services.provider.adapters import base, synthetic
from mdp.services.provider.adapters.base import (
    AdapterError,
    TickSink,
    get_adapter,
    load_adapters,
)
from mdp.services.provider.adapters.ibkr.adapter import IbkrAdapter
from mdp.services.provider.adapters.replay import MAX_BAD_ROWS, ReplayAdapter
from mdp.services.provider.adapters.synthetic import SyntheticAdapter
from mdp.services.provider.batching import TickBatcher
from mdp.services.provider.pacing import unlimited
from mdp.services.provider.service import JobSink
from mdp.shared.contract.control import JobSpec
from mdp.shared.contract.messages import Tick

DATA = Path(__file__).resolve().parents[1] / "data"
HEADER = "ts_ns,ts_utc,symbol,price,size"
S = 1_000_000_000


class RecordingSink:
    """A TickSink that keeps every put (with the fake time it happened at) and the end marker."""

    def __init__(self, clock: FakeTime | None = None) -> None:
        self.puts: list[tuple[str, list[Tick]]] = []
        self.put_times: list[float] = []
        self.eos: list[tuple[list[str], dict[str, int]]] = []
        self._clock = clock
        self.pacer = unlimited("test")

    async def put(self, symbol: str, ticks: list[Tick]) -> None:
        assert ticks, "adapters never put an empty list"
        assert not self.eos, "no put after end_of_stream"
        self.puts.append((symbol, ticks))
        self.put_times.append(self._clock.now if self._clock else 0.0)

    async def end_of_stream(
        self, symbols: Sequence[str], ticks_per_symbol: Mapping[str, int]
    ) -> None:
        self.eos.append((list(symbols), dict(ticks_per_symbol)))

    def by_symbol(self) -> dict[str, list[Tick]]:
        out: dict[str, list[Tick]] = {}
        for symbol, ticks in self.puts:
            out.setdefault(symbol, []).extend(ticks)
        return out


class FakeTime:
    """A monotonic clock, a wall clock and an asyncio-compatible sleep that only moves them."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def wall_ns(self) -> int:
        return 1_700_000_000 * S + round(self.now * S)

    async def sleep(self, delay: float) -> None:
        assert delay >= 0
        self.sleeps.append(delay)
        self.now += delay
        await asyncio.sleep(0)


def job(provider: str, symbols: list[str] | None = None, **params: Any) -> JobSpec:
    return JobSpec(job="test", provider=provider, symbols=symbols or [], params=params)


def quote_fields(ticks: list[Tick]) -> list[tuple[Any, ...]]:
    """Everything of a tick except its times."""
    return [(t.seq, t.price, t.size, t.bid, t.ask, t.bid_size, t.ask_size) for t in ticks]


def test_sinks_satisfy_the_protocol() -> None:
    assert isinstance(RecordingSink(), TickSink)
    # The provider's own sink, without a budget configured: unlimited.
    sink = JobSink(None, job("synthetic"), 1.0, TickBatcher(10, 1))  # type: ignore[arg-type]
    assert isinstance(sink, TickSink) and not sink.pacer.limited


# ---------------------------------------------------------------------------------------------
# Registry


def test_registry_finds_both_builtin_adapters() -> None:
    adapters = load_adapters()
    assert adapters["synthetic"] is SyntheticAdapter
    assert adapters["replay"] is ReplayAdapter
    assert SyntheticAdapter.name == "synthetic" and ReplayAdapter.name == "replay"
    assert get_adapter("replay") is ReplayAdapter


def test_registry_falls_back_to_builtins_without_metadata(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(base.metadata, "entry_points", lambda **_: metadata.EntryPoints(()))
    adapters = load_adapters()
    assert adapters == {"synthetic": SyntheticAdapter, "replay": ReplayAdapter, "ibkr": IbkrAdapter}


def test_a_broken_plugin_is_reported_not_fatal(monkeypatch: pytest.MonkeyPatch) -> None:
    broken = metadata.EntryPoint("ghost", "no_such_module_xyz:Ghost", base.ENTRY_POINT_GROUP)
    not_a_class = metadata.EntryPoint("fn", "os.path:join", base.ENTRY_POINT_GROUP)
    monkeypatch.setattr(
        base.metadata, "entry_points", lambda **_: metadata.EntryPoints((broken, not_a_class))
    )
    errors: dict[str, str] = {}
    adapters = load_adapters(errors)
    assert set(adapters) == {"synthetic", "replay", "ibkr"}
    assert "no_such_module_xyz" in errors["ghost"]
    assert "not an adapter class" in errors["fn"]


def test_unknown_adapter_names_the_known_ones() -> None:
    with pytest.raises(AdapterError, match=r"unknown adapter 'nope' \(registered: .*replay"):
        get_adapter("nope")


# ---------------------------------------------------------------------------------------------
# Synthetic


async def run_synthetic(
    symbols: list[str], resume: Mapping[str, int] | None = None, **params: Any
) -> tuple[RecordingSink, FakeTime, SyntheticAdapter]:
    clock = FakeTime()
    adapter = SyntheticAdapter(
        job("synthetic", symbols, **params),
        clock=clock.monotonic,
        wall_ns=clock.wall_ns,
        sleep=clock.sleep,
    )
    sink = RecordingSink(clock)
    await asyncio.wait_for(adapter.run(sink, resume), timeout=30)
    return sink, clock, adapter


async def test_synthetic_is_deterministic_for_a_seed() -> None:
    first, _, _ = await run_synthetic(["AAPL", "MSFT"], rate=500, seed=7, max_ticks=300)
    second, _, _ = await run_synthetic(["AAPL", "MSFT"], rate=500, seed=7, max_ticks=300)
    other, _, _ = await run_synthetic(["AAPL", "MSFT"], rate=500, seed=8, max_ticks=300)
    a, b, c = first.by_symbol(), second.by_symbol(), other.by_symbol()
    for symbol in ("AAPL", "MSFT"):
        assert quote_fields(a[symbol]) == quote_fields(b[symbol])
        assert quote_fields(a[symbol]) != quote_fields(c[symbol])
    assert quote_fields(a["AAPL"]) != quote_fields(a["MSFT"])


async def test_synthetic_paths_do_not_depend_on_the_other_symbols() -> None:
    alone, _, _ = await run_synthetic(["AAPL"], seed=3, max_ticks=200)
    crowd, _, _ = await run_synthetic(["ZZZ", "AAPL", "BRK.B"], seed=3, max_ticks=200)
    assert quote_fields(alone.by_symbol()["AAPL"]) == quote_fields(crowd.by_symbol()["AAPL"])


async def test_synthetic_ticks_are_well_formed() -> None:
    sink, _, _ = await run_synthetic(["AAPL", "X"], rate=1000, start_price=0.05, max_ticks=2000)
    for symbol, ticks in sink.by_symbol().items():
        assert [t.seq for t in ticks] == list(range(1, 2001)), symbol
        for prev, tick in itertools.pairwise(ticks):
            assert tick.ts >= prev.ts
        for t in ticks:
            assert t.recv == t.ts > 0
            assert t.price > 0 and round(t.price * 100) == pytest.approx(t.price * 100)
            assert t.bid is not None and t.ask is not None
            assert 0 < t.bid < t.price < t.ask
            assert round(t.bid * 100) == pytest.approx(t.bid * 100)
            assert isinstance(t.size, int) and t.size > 0
            assert isinstance(t.bid_size, int) and t.bid_size > 0
            assert isinstance(t.ask_size, int) and t.ask_size > 0


async def test_synthetic_keeps_its_rate_in_steps_and_ends_a_bounded_run() -> None:
    sink, clock, adapter = await run_synthetic(["A", "B"], rate=1000, max_ticks=500)
    assert sink.eos == [(["A", "B"], {"A": 500, "B": 500})]
    counts = {sym: len(ticks) for sym, ticks in sink.by_symbol().items()}
    assert counts == {"A": 500, "B": 500}
    # 500 ticks at 1000/s take 0.5 s of (fake) time, delivered in 25 ms steps of 25 ticks,
    # one put per symbol per step.
    assert clock.now - 1000.0 == pytest.approx(0.5, abs=0.03)
    sizes = [len(ticks) for sym, ticks in sink.puts if sym == "A"]
    assert len(sizes) == 20 and set(sizes) == {25}
    assert adapter.clock_rate == 1.0
    assert adapter.skipped_ticks == 0
    # Event time is the wall clock of the step, spread over the step.
    ticks = sink.by_symbol()["A"]
    assert ticks[-1].ts == clock.wall_ns()
    assert ticks[0].ts > 1_700_000_000 * S + 1000 * S


async def test_synthetic_carries_fractional_ticks_between_steps() -> None:
    sink, clock, _ = await run_synthetic(["A"], rate=30, max_ticks=30)  # 0.75 tick per step
    assert len(sink.by_symbol()["A"]) == 30
    assert clock.now - 1000.0 == pytest.approx(1.0, abs=0.03)
    assert max(len(ticks) for _, ticks in sink.puts) == 1


async def test_synthetic_skips_rather_than_bursts_after_a_long_stall() -> None:
    clock = FakeTime()
    stalls = iter([0.025, 0.025, 10.0])

    async def stalling_sleep(delay: float) -> None:
        await clock.sleep(next(stalls, delay))

    adapter = SyntheticAdapter(
        job("synthetic", ["A"], rate=100, max_ticks=400),
        clock=clock.monotonic,
        wall_ns=clock.wall_ns,
        sleep=stalling_sleep,
    )
    sink = RecordingSink(clock)
    await adapter.run(sink)
    assert max(len(ticks) for _, ticks in sink.puts) <= 100  # at most one second of catch-up
    assert adapter.skipped_ticks > 800
    assert [t.seq for t in sink.by_symbol()["A"]] == list(range(1, 401))


async def test_synthetic_resume_continues_the_same_path() -> None:
    full, _, _ = await run_synthetic(["A", "B"], seed=5, max_ticks=50)
    resumed, _, _ = await run_synthetic(["A", "B"], {"A": 20, "B": 49}, seed=5, max_ticks=50)
    expected, got = full.by_symbol(), resumed.by_symbol()
    assert quote_fields(got["A"]) == quote_fields(expected["A"])[20:]
    assert quote_fields(got["B"]) == quote_fields(expected["B"])[49:]
    assert resumed.eos == [(["A", "B"], {"A": 50, "B": 50})]
    done, _, _ = await run_synthetic(["A"], {"A": 50}, max_ticks=50)
    assert done.puts == [] and done.eos == [(["A"], {"A": 50})]


async def test_synthetic_resume_far_in_starts_a_fresh_path_with_continuing_seq(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(synthetic, "FAST_FORWARD_LIMIT", 10)
    full, _, _ = await run_synthetic(["A"], max_ticks=30)
    far, _, _ = await run_synthetic(["A"], {"A": 20}, max_ticks=30)
    again, _, _ = await run_synthetic(["A"], {"A": 20}, max_ticks=30)
    ticks = far.by_symbol()["A"]
    assert [t.seq for t in ticks] == list(range(21, 31))
    assert quote_fields(ticks) != quote_fields(full.by_symbol()["A"])[20:]
    assert quote_fields(ticks) == quote_fields(again.by_symbol()["A"])  # still deterministic


async def test_synthetic_runs_until_cancelled() -> None:
    clock = FakeTime()
    adapter = SyntheticAdapter(
        job("synthetic", ["A"]), clock=clock.monotonic, wall_ns=clock.wall_ns, sleep=clock.sleep
    )
    ten_puts = asyncio.Event()

    class Sink(RecordingSink):
        async def put(self, symbol: str, ticks: list[Tick]) -> None:
            await super().put(symbol, ticks)
            if len(self.puts) >= 10:
                ten_puts.set()

    sink = Sink(clock)
    task = asyncio.create_task(adapter.run(sink))
    await asyncio.wait_for(ten_puts.wait(), timeout=10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sink.eos == []
    assert adapter.ticks_per_symbol["A"] == len(sink.by_symbol()["A"])


# One model checks a job's params, in control's guards and here: the same messages.
@pytest.mark.parametrize(
    ("params", "symbols", "message"),
    [
        ({"rate": "abc"}, ["A"], "synthetic: params.rate: Input should be a valid number"),
        ({"rate": "250"}, ["A"], "params.rate: Input should be a valid number"),  # strict
        ({"rate": 0}, ["A"], "params.rate: Input should be greater than 0"),
        ({"rate": -5}, ["A"], "params.rate: Input should be greater than 0"),
        ({"rate": True}, ["A"], "params.rate: Input should be a valid number"),
        ({"rate": float("nan")}, ["A"], "params.rate: Input should be a finite number"),
        ({"rate": 1e9}, ["A"], "params.rate: Input should be less than or equal to 1000000"),
        ({"seed": "x1"}, ["A"], "synthetic: params.seed: Input should be a valid integer"),
        ({"start_price": 0}, ["A"], "params.start_price: Input should be greater than or equal"),
        ({"start_price": 0.01}, ["A"], "than or equal to 0.02"),
        ({"start_price": float("inf")}, ["A"], "params.start_price: Input should be a finite"),
        ({"max_ticks": 0}, ["A"], "params.max_ticks: Input should be greater than or equal to 1"),
        ({"max_ticks": 1.5}, ["A"], "params.max_ticks: Input should be a valid integer"),
        ({"rtae": 5}, ["A"], "synthetic: params.rtae: unknown parameter"),
        ({"rate": 0, "x": 1}, ["A"], "params.rate: Input should be greater than 0; params.x: "),
        ({}, [], "synthetic: job.symbols is empty"),
        ({}, ["A", ""], "job.symbols must be non-empty strings"),
    ],
)
def test_synthetic_rejects_bad_params(
    params: dict[str, Any], symbols: list[str], message: str
) -> None:
    with pytest.raises(AdapterError) as info:
        SyntheticAdapter(job("synthetic", symbols, **params))
    assert message in str(info.value)


def test_synthetic_params_and_defaults() -> None:
    adapter = SyntheticAdapter(job("synthetic", ["A", "A"], rate=250, seed=9, max_ticks=3))
    assert (adapter.rate, adapter.seed, adapter.max_ticks) == (250.0, 9, 3)
    assert adapter.symbols == ["A"]
    unset = SyntheticAdapter(job("synthetic", ["A"], rate=None, seed=None, start_price=None))
    assert (unset.rate, unset.seed, unset.start_price) == (100.0, 1, 100.0)
    default = SyntheticAdapter(job("synthetic", ["A"]))
    assert (default.rate, default.seed, default.start_price, default.max_ticks) == (
        100.0,
        1,
        100.0,
        None,
    )


# ---------------------------------------------------------------------------------------------
# Replay: helpers


def write(path: Path, text: str, *, gz: bool = False) -> Path:
    data = text.encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


async def run_replay(
    path: Path,
    symbols: list[str] | None = None,
    resume: Mapping[str, int] | None = None,
    **kwargs: Any,
) -> tuple[RecordingSink, ReplayAdapter]:
    params = {"path": str(path)}
    params.update(kwargs.pop("params", {}))
    adapter = ReplayAdapter(job("replay", symbols, **params), **kwargs)
    sink = RecordingSink()
    await asyncio.wait_for(adapter.run(sink, resume), timeout=60)
    assert len(sink.eos) == 1
    return sink, adapter


def reference(path: Path, symbols: set[str] | None = None) -> dict[str, list[tuple[Any, ...]]]:
    """What a replay must produce, by the slowest obvious code: csv.DictReader row by row."""
    opener: Any = gzip.open if path.read_bytes()[:2] == b"\x1f\x8b" else open
    out: dict[str, list[tuple[Any, ...]]] = {}
    with opener(path, "rt", newline="") as stream:
        for row in csv.DictReader(stream):
            symbol = row["symbol"]
            if symbols and symbol not in symbols:
                continue
            ts = int(row["ts_ns"])
            price, size = float(row["price"]), float(row["size"])
            recv = int(row["recv_ns"]) if row.get("recv_ns") else ts
            assert ts > 0 and math.isfinite(price) and math.isfinite(size) and size >= 0
            ticks = out.setdefault(symbol, [])
            ticks.append((ts, recv, len(ticks) + 1, price, size))
    return out


def as_rows(sink: RecordingSink) -> dict[str, list[tuple[Any, ...]]]:
    return {
        symbol: [(t.ts, t.recv, t.seq, t.price, t.size) for t in ticks]
        for symbol, ticks in sink.by_symbol().items()
    }


TINY = (
    f"{HEADER}\n"
    "1000000000,x,AAA,10.5,100\n"
    "1000000001,x,BBB,20,1\n"
    "1000000001,x,AAA,10.25,0\n"
    "1000000003,x,AAA,10.5,7\n"
    "1000000002,x,BBB,21.5,2.5\n"
)


# ---------------------------------------------------------------------------------------------
# Replay: reading


@pytest.mark.parametrize(("name", "gz"), [("t.csv", False), ("t.csv.gz", True), ("t.dat", True)])
async def test_replay_numbers_ticks_per_symbol_in_file_order(
    tmp_path: Path, name: str, gz: bool
) -> None:
    sink, adapter = await run_replay(write(tmp_path / name, TINY, gz=gz))
    assert as_rows(sink) == {
        "AAA": [
            (1000000000, 1000000000, 1, 10.5, 100.0),
            (1000000001, 1000000001, 2, 10.25, 0.0),
            (1000000003, 1000000003, 3, 10.5, 7.0),
        ],
        "BBB": [(1000000001, 1000000001, 1, 20.0, 1.0), (1000000002, 1000000002, 2, 21.5, 2.5)],
    }
    assert sink.eos == [(["AAA", "BBB"], {"AAA": 3, "BBB": 2})]
    assert adapter.bad_rows == [] and adapter.bad_row_count == 0
    assert adapter.clock_rate == 0.0


async def test_replay_finds_columns_by_name_and_uses_recv_ns(tmp_path: Path) -> None:
    text = (
        "exchange,size,recv_ns,symbol,ts_ns,price\n"
        "Q,5,2000000005,BTCUSD_PERP.BINANCE,1000000000,61000.5\n"
        "Q,6,,BTCUSD_PERP.BINANCE,1000000001,61000.25\n"
    )
    sink, _ = await run_replay(write(tmp_path / "r.csv", text))
    assert as_rows(sink) == {
        "BTCUSD_PERP.BINANCE": [
            (1000000000, 2000000005, 1, 61000.5, 5.0),
            (1000000001, 1000000001, 2, 61000.25, 6.0),  # empty recv_ns: recv = ts
        ]
    }


async def test_replay_handles_crlf_bom_blank_lines_quotes_and_no_final_newline(
    tmp_path: Path,
) -> None:
    text = (
        '\ufeff"ts_ns","ts_utc","symbol","price","size"\r\n'
        '1000000000,x,"A,B",1.5,1\r\n'
        "\r\n"
        "1000000001,x,C,2.5,2"
    )
    sink, adapter = await run_replay(write(tmp_path / "q.csv", text))
    assert as_rows(sink) == {
        "A,B": [(1000000000, 1000000000, 1, 1.5, 1.0)],
        "C": [(1000000001, 1000000001, 1, 2.5, 2.0)],
    }
    assert adapter.bad_row_count == 0


async def test_replay_of_a_crlf_file_with_the_symbol_last(tmp_path: Path) -> None:
    rows = "".join(f"{i + 1},{i}.5,{i},S{i % 3}\r\n" for i in range(3000))
    path = write(tmp_path / "crlf.csv", "ts_ns,price,size,symbol\r\n" + rows)
    sink, adapter = await run_replay(path, chunk_bytes=1000)
    assert sorted(sink.by_symbol()) == ["S0", "S1", "S2"]
    assert sum(len(ticks) for ticks in sink.by_symbol().values()) == 3000
    assert adapter.bad_row_count == 0


async def test_replay_symbols_filter(tmp_path: Path) -> None:
    sink, _ = await run_replay(write(tmp_path / "t.csv", TINY), symbols=["BBB", "ZZZ"])
    assert list(sink.by_symbol()) == ["BBB"]
    assert [t.seq for t in sink.by_symbol()["BBB"]] == [1, 2]
    # A requested symbol missing from the file still ends, with no ticks.
    assert sink.eos == [(["BBB", "ZZZ"], {"BBB": 2, "ZZZ": 0})]


async def test_replay_resume_after_skips_exactly(tmp_path: Path) -> None:
    path = write(tmp_path / "t.csv", TINY)
    full, _ = await run_replay(path)
    resumed, _ = await run_replay(path, resume={"AAA": 2, "BBB": 0, "NOPE": 4})
    expected = as_rows(full)
    assert as_rows(resumed) == {"AAA": expected["AAA"][2:], "BBB": expected["BBB"]}
    # The end marker still counts the whole stream: the last seq of each symbol.
    assert resumed.eos == full.eos == [(["AAA", "BBB"], {"AAA": 3, "BBB": 2})]
    everything, _ = await run_replay(path, resume={"AAA": 3, "BBB": 9})
    assert everything.puts == [] and everything.eos == full.eos


async def test_replay_collects_bad_rows_and_keeps_the_good_ones(tmp_path: Path) -> None:
    text = (
        f"{HEADER}\n"
        "1000000000,x,A,1.5,1\n"  # 2
        "1000000001,x,A,abc,1\n"  # 3
        "1000000002,x,A,nan,1\n"  # 4
        "1000000003,x,A,1.5,-2\n"  # 5
        "0,x,A,1.5,1\n"  # 6
        "-7,x,A,1.5,1\n"  # 7
        "1000000004,x,A\n"  # 8
        "1000000005,x,,1.5,1\n"  # 9
        "1.5e9,x,A,1.5,1\n"  # 10
        "1000000006,x,A,inf,1\n"  # 11
        "1000000007,x,A,1.5,\n"  # 12
        "1000000008,x,A,2.5,3\n"  # 13
    )
    sink, adapter = await run_replay(write(tmp_path / "bad.csv", text))
    assert as_rows(sink) == {
        "A": [(1000000000, 1000000000, 1, 1.5, 1.0), (1000000008, 1000000008, 2, 2.5, 3.0)]
    }
    assert adapter.bad_row_count == 10
    assert [line for line, _ in adapter.bad_rows] == list(range(3, 13))
    reasons = dict(adapter.bad_rows)
    # What was wrong, never the field's text: a file may be anything (`/etc/shadow`).
    assert reasons[3] == "price is not a number"
    assert reasons[4] == "price is not finite (NaN or infinity)"
    assert reasons[5] == "size is negative"
    assert reasons[6] == "ts_ns is not positive"
    assert reasons[7] == "ts_ns is not positive"
    assert reasons[8].startswith("missing fields: 3 of the 5 needed")
    assert reasons[9].startswith("symbol is empty, over 64 characters, not UTF-8")
    assert reasons[10] == "ts_ns is not an integer"
    assert reasons[11] == "price is not finite (NaN or infinity)"
    assert reasons[12] == "size is not a number"
    assert sink.eos == [(["A"], {"A": 2})]


async def test_replay_keeps_the_first_thousand_reasons_and_counts_all(tmp_path: Path) -> None:
    rows = [
        f"{1000 + i},x,A,{'oops' if i % 2 else '1.0'},1" for i in range(2 * (MAX_BAD_ROWS + 200))
    ]
    sink, adapter = await run_replay(
        write(tmp_path / "many.csv", HEADER + "\n" + "\n".join(rows) + "\n")
    )
    assert adapter.bad_row_count == MAX_BAD_ROWS + 200
    assert len(adapter.bad_rows) == MAX_BAD_ROWS
    assert adapter.bad_rows[0] == (3, "price is not a number")
    assert adapter.bad_rows[-1][0] == 2 * MAX_BAD_ROWS + 1
    assert len(sink.by_symbol()["A"]) == MAX_BAD_ROWS + 200


async def test_replay_bad_rows_of_filtered_out_symbols_are_not_reported(tmp_path: Path) -> None:
    text = f"{HEADER}\n1,x,A,1,1\n2,x,B,bad,1\n3,x,A,2,1\n"
    sink, adapter = await run_replay(write(tmp_path / "f.csv", text), symbols=["A"])
    assert [t.seq for t in sink.by_symbol()["A"]] == [1, 2]
    assert adapter.bad_row_count == 0


# Rows for the property test: mostly good, some bad in every way the reader must catch.
_good_row = st.tuples(
    st.integers(1, 2 * 10**18).map(str),
    st.sampled_from(["SPY", "AIG", "BTC-USD", "ETH_X.Y", "Ünï"]),
    st.floats(0.01, 1e6, allow_nan=False).map(repr),
    st.one_of(st.integers(0, 10**6).map(str), st.floats(0, 1e6).map(repr)),
)
_bad_row = st.one_of(
    _good_row.map(lambda r: (r[0], r[1], "NaN", r[3])),
    _good_row.map(lambda r: (r[0], r[1], r[2], "-1")),
    _good_row.map(lambda r: ("0", r[1], r[2], r[3])),
    _good_row.map(lambda r: ("12x", r[1], r[2], r[3])),
    _good_row.map(lambda r: (r[0], "", r[2], r[3])),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.lists(
        st.one_of(_good_row, _good_row, _good_row, _bad_row, st.just(None)), max_size=400
    ),
    with_recv=st.booleans(),
    gz=st.booleans(),
    chunk_bytes=st.sampled_from([1, 7, 100, 4096, 1 << 18]),  # rows straddle block boundaries
    crlf=st.booleans(),
)
def test_replay_matches_a_row_by_row_reference(
    rows: list[tuple[str, str, str, str] | None],
    with_recv: bool,
    gz: bool,
    chunk_bytes: int,
    crlf: bool,
) -> None:
    lines = ["ts_ns,ts_utc,symbol,price,size" + (",recv_ns" if with_recv else "")]
    bad_lines = []
    for number, row in enumerate(rows, start=2):
        if row is None:
            lines.append("123,x,SHORT")  # a row missing fields
            bad_lines.append(number)
            continue
        ts, symbol, price, size = row
        lines.append(f"{ts},u,{symbol},{price},{size}" + (f",{ts}7" if with_recv else ""))
        if (
            not ts.isdigit()
            or int(ts) <= 0
            or not symbol
            or not math.isfinite(float(price))
            or float(size) < 0
        ):
            bad_lines.append(number)
    good = "\n".join(line for n, line in enumerate(lines, start=1) if n == 1 or n not in bad_lines)
    with tempfile.TemporaryDirectory() as tmp:
        newline = "\r\n" if crlf else "\n"
        path = write(Path(tmp) / "p.csv", newline.join(lines) + newline, gz=gz)
        sink, adapter = asyncio.run(run_replay(path, chunk_bytes=chunk_bytes))
        clean = write(Path(tmp) / "clean.csv", good + "\n")
        assert as_rows(sink) == reference(clean)
    assert [line for line, _ in adapter.bad_rows] == bad_lines
    assert adapter.bad_row_count == len(bad_lines)


# ---------------------------------------------------------------------------------------------
# Replay: errors at construction


def test_replay_requires_an_existing_file(tmp_path: Path) -> None:
    missing = tmp_path / "x.csv"
    with pytest.raises(AdapterError) as info:
        ReplayAdapter(job("replay", path=str(missing)))
    assert str(info.value) == f"replay: params.path '{missing}' does not exist"
    required = "replay: params.path is required (the .csv or .csv.gz file to replay)"
    for params in ({}, {"path": ""}, {"path": None}):
        with pytest.raises(AdapterError) as info:
            ReplayAdapter(job("replay", **params))
        assert str(info.value) == required
    with pytest.raises(AdapterError, match="is not a regular file"):
        ReplayAdapter(job("replay", path=str(tmp_path)))
    with pytest.raises(AdapterError, match=r"params\.path: Input should be a valid string"):
        ReplayAdapter(job("replay", path=5))


def test_replay_names_the_missing_column(tmp_path: Path) -> None:
    path = write(tmp_path / "c.csv", "ts_ns,symbol,size\n1,A,1\n")
    with pytest.raises(AdapterError) as info:
        ReplayAdapter(job("replay", path=str(path)))
    assert str(info.value) == (
        f"replay: params.path '{path}': line 1 (the header, 3 columns) has no column 'price'; "
        "required: ts_ns, symbol, price, size (any order, extra columns allowed)"
    )


def test_replay_rejects_empty_and_non_gzip_files(tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="has no header line"):
        ReplayAdapter(job("replay", path=str(write(tmp_path / "e.csv", ""))))
    with pytest.raises(AdapterError, match="is not a valid gzip file"):
        ReplayAdapter(job("replay", path=str(write(tmp_path / "g.csv.gz", TINY))))


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"speed": "fast"}, "replay: params.speed.literal['max']: Input should be 'max'; "),
        ({"speed": "2"}, "params.speed: Input should be a valid number"),
        ({"speed": 0}, 'replay: params.speed: Value error, must be "max" or a number > 0'),
        ({"speed": -2}, 'params.speed: Value error, must be "max" or a number > 0'),
        ({"speed": float("inf")}, 'params.speed: Value error, must be "max" or a number > 0'),
        ({"sped": 2}, "replay: params.sped: unknown parameter"),
    ],
)
def test_replay_rejects_bad_params(tmp_path: Path, params: dict[str, Any], message: str) -> None:
    path = write(tmp_path / "t.csv", TINY)
    with pytest.raises(AdapterError) as info:
        ReplayAdapter(job("replay", path=str(path), **params))
    assert message in str(info.value)


async def test_replay_reports_a_truncated_gzip_while_running(tmp_path: Path) -> None:
    rows = "".join(f"{i + 1},x,S{i % 7},{i}.5,{i}\n" for i in range(50_000))
    data = gzip.compress((HEADER + "\n" + rows).encode())
    path = tmp_path / "cut.csv.gz"
    path.write_bytes(data[: len(data) // 2])
    adapter = ReplayAdapter(job("replay", path=str(path)))
    sink = RecordingSink()
    with pytest.raises(AdapterError, match="could not be read after line"):
        await adapter.run(sink)
    assert sink.puts and not sink.eos


# ---------------------------------------------------------------------------------------------
# Replay: pacing


async def test_replay_at_max_speed_never_sleeps(tmp_path: Path) -> None:
    clock = FakeTime()
    _, adapter = await run_replay(
        write(tmp_path / "t.csv", TINY), clock=clock.monotonic, sleep=clock.sleep
    )
    assert clock.sleeps == [] and adapter.clock_rate == 0.0


async def test_replay_paces_by_event_time(tmp_path: Path) -> None:
    # Ten rows one second apart; at speed 10 each is due 0.1 s after the previous one.
    text = HEADER + "\n" + "".join(f"{(100 + i) * S},x,A,{i + 1},1\n" for i in range(10))
    clock = FakeTime()
    adapter = ReplayAdapter(
        job("replay", path=str(write(tmp_path / "p.csv", text)), speed=10),
        clock=clock.monotonic,
        sleep=clock.sleep,
    )
    sink = RecordingSink(clock)
    await adapter.run(sink)
    assert adapter.clock_rate == 10.0
    assert [len(ticks) for _, ticks in sink.puts] == [1] * 10
    assert sink.put_times == pytest.approx([1000.0 + i / 10 for i in range(10)])
    assert sum(clock.sleeps) == pytest.approx(0.9)


async def test_replay_pacing_sends_a_quantum_at_once_and_never_early(tmp_path: Path) -> None:
    # 1000 rows 1 ms apart at speed 1: 10 ms quanta mean about 100 puts, none ahead of time.
    text = HEADER + "\n" + "".join(f"{S + i * 1_000_000},x,A,1,1\n" for i in range(1000))
    clock = FakeTime()
    adapter = ReplayAdapter(
        job("replay", path=str(write(tmp_path / "p.csv", text)), speed=1),
        clock=clock.monotonic,
        sleep=clock.sleep,
    )
    sink = RecordingSink(clock)
    await adapter.run(sink)
    assert 90 <= len(sink.puts) <= 110
    for (_, ticks), at in zip(sink.puts, sink.put_times, strict=True):
        due = 1000.0 + (ticks[-1].ts - S) / S
        assert at >= due - 1e-9
        assert at - (1000.0 + (ticks[0].ts - S) / S) <= 0.0100001
    assert clock.now - 1000.0 == pytest.approx(0.999)


async def test_replay_pacing_sends_a_row_whose_time_goes_back_at_once(tmp_path: Path) -> None:
    text = f"{HEADER}\n{10 * S},x,A,1,1\n{12 * S},x,B,1,1\n{11 * S},x,A,2,1\n{13 * S},x,B,2,1\n"
    clock = FakeTime()
    adapter = ReplayAdapter(
        job("replay", path=str(write(tmp_path / "p.csv", text)), speed=1),
        clock=clock.monotonic,
        sleep=clock.sleep,
    )
    sink = RecordingSink(clock)
    await adapter.run(sink)
    # A's second row (11 s) comes after B's 12 s in the file: it is due with it, not before.
    assert [(sym, [t.seq for t in ticks]) for sym, ticks in sink.puts] == [
        ("A", [1]),
        ("A", [2]),
        ("B", [1]),
        ("B", [2]),
    ]
    assert sink.put_times == pytest.approx([1000.0, 1002.0, 1002.0, 1003.0])


async def test_replay_paced_resume_does_not_wait_for_skipped_rows(tmp_path: Path) -> None:
    text = HEADER + "\n" + "".join(f"{(100 + i) * S},x,A,{i + 1},1\n" for i in range(10))
    clock = FakeTime()
    adapter = ReplayAdapter(
        job("replay", path=str(write(tmp_path / "p.csv", text)), speed=1),
        clock=clock.monotonic,
        sleep=clock.sleep,
    )
    sink = RecordingSink(clock)
    await adapter.run(sink, {"A": 6})
    assert [t.seq for t in sink.by_symbol()["A"]] == [7, 8, 9, 10]
    assert sum(clock.sleeps) == pytest.approx(3.0)  # from row 7 (t=106 s) to row 10 (t=109 s)


# ---------------------------------------------------------------------------------------------
# Replay: the recorded slices in tests/data


SLICES = sorted(DATA.glob("*.ticks.csv.gz"))


@pytest.mark.skipif(not SLICES, reason="no recorded slices in tests/data")
@pytest.mark.parametrize("path", SLICES, ids=lambda p: p.name)
async def test_replay_of_recorded_slices_matches_the_reference(path: Path) -> None:
    sink, adapter = await run_replay(path)
    expected = reference(path)
    assert adapter.bad_row_count == 0
    assert as_rows(sink) == expected
    symbols, counts = sink.eos[0]
    assert sorted(symbols) == sorted(expected)
    assert counts == {symbol: len(rows) for symbol, rows in expected.items()}
    # The same through a symbols filter, and resumed half-way.
    some = sorted(expected)[:2]
    half = {symbol: len(expected[symbol]) // 2 for symbol in some}
    filtered, _ = await run_replay(path, symbols=some, resume=half)
    assert as_rows(filtered) == {symbol: expected[symbol][half[symbol] :] for symbol in some}


@pytest.mark.skipif(not SLICES, reason="no recorded slices in tests/data")
@pytest.mark.parametrize("path", SLICES, ids=lambda p: p.name)
async def test_paced_replay_of_recorded_slices(path: Path) -> None:
    speed = 50.0
    clock = FakeTime()
    adapter = ReplayAdapter(
        job("replay", path=str(path), speed=speed), clock=clock.monotonic, sleep=clock.sleep
    )
    sink = RecordingSink(clock)
    await adapter.run(sink)
    assert as_rows(sink) == reference(path)
    with gzip.open(path, "rt") as stream:
        next(stream)
        first = int(next(stream).split(",", 1)[0])
    last = max(t.ts for ticks in sink.by_symbol().values() for t in ticks)
    assert clock.now - 1000.0 == pytest.approx((last - first) / speed / S, abs=0.011)
    for (_, ticks), at in zip(sink.puts, sink.put_times, strict=True):
        assert at >= 1000.0 + (max(t.ts for t in ticks) - first) / speed / S - 1e-6
