"""End to end: real nats-server, the five services as subprocesses, replays into real stores."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
from nats.aio.client import Client as NATS

from mdp.cli import replay_file
from mdp.services.store.writers import read_bars
from mdp.shared.contract import names
from mdp.shared.contract.messages import Bar
from tests.conftest import DATA, PipelineFactory
from tests.reference import compare_bars, load_reference

pytestmark = pytest.mark.integration

SLICES = ["lean_equity_20131008_slice", "binance_20240808_09_slice"]


async def assert_store_matches_reference(store_url: str, stem: str) -> None:
    bars = await read_bars(store_url)
    assert bars, "nothing was stored"
    for interval in ("1s", "1m"):
        reference = load_reference(DATA / f"{stem}.bars_{interval}.csv")
        problems = compare_bars([b for b in bars if b.interval == interval], reference, interval)
        assert not problems, f"{stem} {interval}: {len(problems)} problems, e.g. {problems[:5]}"


@pytest.mark.parametrize("stem", SLICES)
async def test_replay_into_sqlite_equals_reference(
    pipeline: PipelineFactory, nc: NATS, tmp_path: Path, stem: str
) -> None:
    store_url = f"sqlite:///{tmp_path / 'bars.db'}"
    sup = pipeline(store_url=store_url)
    await sup.wait_ready()
    result = await replay_file(nc, DATA / f"{stem}.ticks.csv.gz", "max", timeout=120)
    assert result["ticks"] > 1000
    await assert_store_matches_reference(store_url, stem)


async def test_replay_into_postgres_equals_reference(
    pipeline: PipelineFactory, nc: NATS, postgres_url: str
) -> None:
    sup = pipeline(store_url=postgres_url)
    await sup.wait_ready()
    stem = SLICES[0]
    await replay_file(nc, DATA / f"{stem}.ticks.csv.gz", "max", timeout=120)
    await assert_store_matches_reference(postgres_url, stem)


async def test_bars_are_published_on_public_subjects(
    pipeline: PipelineFactory, nc: NATS, tmp_path: Path
) -> None:
    """Another service can subscribe to `md.bars.<interval>.<sym>` and get decoded Bars."""
    received: list[tuple[str, Bar]] = []

    async def on_bar(msg: object) -> None:
        received.append((msg.subject, msgspec.json.decode(msg.data, type=Bar)))  # type: ignore[attr-defined]

    await nc.subscribe("md.bars.1m.*", cb=on_bar)
    sup = pipeline()
    await sup.wait_ready()
    await replay_file(nc, DATA / "binance_20240808_09_slice.ticks.csv.gz", "max", timeout=120)
    await nc.flush()
    symbols = {bar.symbol for _, bar in received}
    assert "BTCUSD_PERP.BINANCE" in symbols
    for subject, bar in received:
        assert bar.interval == "1m"
        assert subject == names.bars("1m", bar.symbol)
        assert names.symbol_of(subject) == bar.symbol
    assert "md.bars.1m.BTCUSD_5FPERP_2EBINANCE" in {subject for subject, _ in received}
