"""Dry run, the write-path gate and the store modes through the whole running pipeline.

One pipeline (provider, router, aggregator, store, control; 1 s bars only) serves the module;
each test changes the policy by rewriting `ingestion_policy.yaml` and sending `reload`, and uses
symbols of its own. Nothing here sleeps on hope: a job's bars are known to be complete when their
trade counts add up to the ticks the provider reports at its stop, and "nothing reached the store"
is checked after a later symbol's bars did reach it (the store consumes in order).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
import yaml
from aiohttp import web

from mdp.services.store.writers import read_bars
from mdp.shared.contract import names
from mdp.shared.contract.messages import Bar, BarBatch
from mdp.shared.natsserver import EmbeddedNats
from tests.conftest import wait_for
from tests.conftest_control import (  # noqa: F401 (fixtures)
    REPO,
    System,
    module_nats_fixture,
    start_system,
    stop_system,
)

pytestmark = pytest.mark.integration

FORWARD_TOKEN = "fwd-token"
SHIPPED_POLICY = yaml.safe_load((REPO / "mdp" / "configs" / "ingestion_policy.yaml").read_text())


@pytest.fixture(scope="module", name="pipeline_system")
async def pipeline_system_fixture(
    module_nats: EmbeddedNats, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[System]:
    """All five services with 1 s bars."""
    tmp = tmp_path_factory.mktemp("gates")
    system = await start_system(
        module_nats,
        tmp,
        ("provider", "router", "aggregator", "store", "control"),
        env={
            "MDP_POLICY__BARS__INTERVALS": '["1s"]',
            "MDP_STORE__FORWARD_TOKEN": FORWARD_TOKEN,
        },
        store_url=f"sqlite:///{tmp / 'bars.db'}",
    )
    yield system
    await stop_system(system)


async def apply_policy(system: System, **sections: dict[str, Any]) -> int:
    """Write the shipped policy with `sections` changed, reload, wait until services follow."""
    data = yaml.safe_load(yaml.safe_dump(SHIPPED_POLICY))
    for name, values in sections.items():
        data[name].update(values)
    system.write_config("ingestion_policy.yaml", yaml.safe_dump(data))
    revision = int((await system.ok("reload", {}))["policy_revision"])
    await system.wait_policy_seen("aggregator", revision)
    await system.wait_policy_seen("store", revision)
    return revision


async def stored(system: System, symbol: str) -> list[Bar]:
    return await read_bars(system.sup.store_url, symbol=symbol)


def latest(bars: list[Bar]) -> dict[int, Bar]:
    """The latest revision of each bar, by start."""
    out: dict[int, Bar] = {}
    for bar in bars:
        if bar.start not in out or bar.rev > out[bar.start].rev:
            out[bar.start] = bar
    return out


async def run_job(
    system: System, symbol: str, dry_run: bool | None = None, bars_wanted: int = 2
) -> tuple[dict[str, Any], dict[int, Bar]]:
    """Run a synthetic job of one symbol until `bars_wanted` bars, stop it, wait for its last bar.

    Returns the job as control started it and every bar published for the symbol.
    """
    published: list[Bar] = []

    async def on_bar(msg: Any) -> None:
        published.append(msgspec.json.decode(msg.data, type=Bar))

    sub = await system.nc.subscribe(names.bars("1s", symbol), cb=on_bar)
    body: dict[str, Any] = {
        "provider": "synthetic",
        "symbols": [symbol],
        "job": f"job-{symbol}",
        "params": {"rate": 20},
    }
    if dry_run is not None:
        body["dry_run"] = dry_run
    job = (await system.ok("start", body))["job"]
    await wait_for(lambda: len(published) >= bars_wanted, 30, f"{bars_wanted} bars of {symbol}")
    await system.ok("stop", {"job": job["job"]})

    async def final_ticks() -> int | None:
        state = await system.kv("ingest_state", f"provider.{job['job']}")
        if state and state.get("run") == job["run"] and state.get("state") == "stopped":
            return int(state["ticks"])
        return None

    await wait_for(final_ticks, 15, f"the provider to report the ticks of {symbol}")
    ticks = await final_ticks()
    assert ticks
    await wait_for(
        lambda: sum(b.trade_count for b in latest(published).values()) == ticks,
        15,
        f"every tick of {symbol} to be in a published bar",
    )
    await sub.unsubscribe()
    return job, latest(published)


async def all_stored(system: System, symbol: str, bars: dict[int, Bar]) -> bool:
    rows = latest(await stored(system, symbol))
    return rows == bars


async def suppressed(system: System, reason: str) -> float:
    return await system.metric("control", "ingest_writes_suppressed_total", reason=reason)


async def test_dry_run_publishes_bars_and_stores_nothing(pipeline_system: System) -> None:
    system = pipeline_system
    await apply_policy(system)
    before = await suppressed(system, "dry_run")

    job, bars = await run_job(system, "DRY1", dry_run=True)
    assert job["dry_run"] is True and bars
    await wait_for(
        lambda: _greater(suppressed(system, "dry_run"), before), 15, "the dry_run counter to grow"
    )
    middle = await suppressed(system, "dry_run")

    # The policy's default applies to a request that does not say.
    await apply_policy(system, write_path={"dry_run": True})
    job, bars = await run_job(system, "DRY2")
    assert job["dry_run"] is True and bars
    await wait_for(
        lambda: _greater(suppressed(system, "dry_run"), middle), 15, "the dry_run counter to grow"
    )

    await apply_policy(system)
    job, bars = await run_job(system, "LIVE1")
    assert job["dry_run"] is False
    await wait_for(lambda: all_stored(system, "LIVE1", bars), 15, "LIVE1 bars in the store")
    assert await stored(system, "DRY1") == []
    assert await stored(system, "DRY2") == []


async def test_disabled_write_path_publishes_bars_and_stores_nothing(
    pipeline_system: System,
) -> None:
    system = pipeline_system
    before = await suppressed(system, "write_path_disabled")
    await apply_policy(system, write_path={"enabled": False})
    job, bars = await run_job(system, "OFF1")
    assert job["dry_run"] is False and bars
    await wait_for(
        lambda: _greater(suppressed(system, "write_path_disabled"), before),
        15,
        "the write_path_disabled counter to grow",
    )
    await apply_policy(system)
    _job, bars = await run_job(system, "LIVE2", bars_wanted=1)
    await wait_for(lambda: all_stored(system, "LIVE2", bars), 15, "LIVE2 bars in the store")
    assert await stored(system, "OFF1") == []


async def test_bus_mode_reaches_the_store_through_the_writer(pipeline_system: System) -> None:
    system = pipeline_system
    await apply_policy(system, store_sync={"mode": "bus"})
    forwarded = await system.metric("store", "mdp_store_http_forwards_total", outcome="ok")
    _job, bars = await run_job(system, "BUS1", bars_wanted=1)
    await wait_for(lambda: all_stored(system, "BUS1", bars), 15, "BUS1 bars in the store")
    assert await system.metric("store", "mdp_store_http_forwards_total", outcome="ok") == forwarded


async def test_http_mode_reaches_the_store_through_its_ingest_api(pipeline_system: System) -> None:
    system = pipeline_system
    await apply_policy(system, store_sync={"mode": "http", "http_url": ""})
    forwarded = await system.metric("store", "mdp_store_http_forwards_total", outcome="ok")
    api = await system.metric("store", "mdp_store_http_requests_total", status="200")
    try:
        _job, bars = await run_job(system, "HTTP1", bars_wanted=1)
        await wait_for(lambda: all_stored(system, "HTTP1", bars), 15, "HTTP1 bars in the store")
        assert (
            await system.metric("store", "mdp_store_http_forwards_total", outcome="ok") > forwarded
        )
        assert await system.metric("store", "mdp_store_http_requests_total", status="200") > api
    finally:
        await apply_policy(system)


async def test_http_mode_to_an_external_api(pipeline_system: System) -> None:
    system = pipeline_system
    received: list[tuple[str, BarBatch]] = []

    async def ingest(request: web.Request) -> web.Response:
        batch = msgspec.json.decode(await request.read(), type=BarBatch)
        received.append((request.headers.get("Authorization", ""), batch))
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/bars", ingest)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    await apply_policy(
        system, store_sync={"mode": "http", "http_url": f"http://127.0.0.1:{port}/bars"}
    )
    try:
        _job, bars = await run_job(system, "EXT1", bars_wanted=1)

        def posted() -> dict[int, Bar]:
            return latest([b for _, batch in received for b in batch.bars if b.symbol == "EXT1"])

        await wait_for(lambda: posted() == bars, 15, "every EXT1 bar POSTed to the external API")
        assert {auth for auth, _ in received} == {f"Bearer {FORWARD_TOKEN}"}
    finally:
        await apply_policy(system)
        await runner.cleanup()
    _job, bars = await run_job(system, "LIVE3", bars_wanted=1)
    await wait_for(lambda: all_stored(system, "LIVE3", bars), 15, "LIVE3 bars in the store")
    assert await stored(system, "EXT1") == []


async def test_none_mode_publishes_no_batch(pipeline_system: System) -> None:
    system = pipeline_system
    batches: list[tuple[str, BarBatch]] = []

    async def on_batch(msg: Any) -> None:
        batches.append((msg.subject, msgspec.json.decode(msg.data, type=BarBatch)))

    sub = await system.nc.subscribe("store.sync.>", cb=on_batch)
    await apply_policy(system, store_sync={"mode": "none"})
    _job, bars = await run_job(system, "NONE1")
    assert bars
    await apply_policy(system)
    _job, bars = await run_job(system, "LIVE4", bars_wanted=1)
    await wait_for(lambda: all_stored(system, "LIVE4", bars), 15, "LIVE4 bars in the store")
    await sub.unsubscribe()
    assert any(b.symbol == "LIVE4" for _, batch in batches for b in batch.bars)
    assert not [b for _, batch in batches for b in batch.bars if b.symbol == "NONE1"]
    assert await stored(system, "NONE1") == []


async def _greater(value: Any, than: float) -> bool:
    return bool(await value > than)
