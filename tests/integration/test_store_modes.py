"""The store's two inputs and its ingest API, with a real store process and real HTTP servers.

The test plays the aggregator (publishing `BarBatch`es on `store.sync.bus` / `store.sync.http`)
and the control service (writing the policy into KV), so each store path is exercised on its
own; `test_control_gates.py` runs the same paths through the whole pipeline.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web

from mdp.services.store.writers import read_bars
from mdp.shared.config import EffectivePolicy, StoreSyncConfig
from mdp.shared.contract.codec import JSON, MSGPACK
from mdp.shared.contract.messages import Bar, BarBatch, EndOfStream
from mdp.shared.contract.names import CONTENT_TYPE, END_OF_STREAM, KV_STATE, MSG_ID, POLICY_KEY
from mdp.shared.natsserver import EmbeddedNats
from tests.conftest import wait_for
from tests.conftest_control import (  # noqa: F401 (fixtures)
    System,
    module_nats_fixture,
    start_system,
    stop_system,
)

pytestmark = pytest.mark.integration

STORE_TOKEN = "store-secret"
FORWARD_TOKEN = "forward-secret"
START = 1_700_000_000_000_000_000


@pytest.fixture(scope="module", name="store_system")
async def store_system_fixture(
    module_nats: EmbeddedNats, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[System]:
    """The store service alone, its ingest API token-protected."""
    tmp = tmp_path_factory.mktemp("store")
    system = await start_system(
        module_nats,
        tmp,
        ("store",),
        env={"MDP_STORE__HTTP_TOKEN": STORE_TOKEN, "MDP_STORE__FORWARD_TOKEN": FORWARD_TOKEN},
        store_url=f"sqlite:///{tmp / 'bars.db'}",
    )
    yield system
    await stop_system(system)


def bars(symbol: str, count: int = 3, **changes: Any) -> list[Bar]:
    out = []
    for i in range(count):
        start = START + i * 1_000_000_000
        fields: dict[str, Any] = {
            "symbol": symbol, "interval": "1s", "start": start, "end": start + 1_000_000_000,
            "open": 10.0 + i, "high": 11.0 + i, "low": 9.0 + i, "close": 10.5 + i,
            "volume": 100.0, "trade_count": 5, "vwap": 10.2 + i, "provider": "test", "rev": 0,
        }  # fmt: skip
        fields.update(changes)
        out.append(Bar(**fields))
    return out


async def stored(system: System, symbol: str) -> list[Bar]:
    return await read_bars(system.sup.store_url, symbol=symbol)


async def has_rows(system: System, symbol: str, count: int) -> bool:
    return len(await stored(system, symbol)) == count


async def publish(
    system: System, subject: str, batch: BarBatch, headers: dict[str, str] | None = None
) -> None:
    await system.nc.jetstream().publish(
        subject,
        msgspec.json.encode(batch),
        headers={CONTENT_TYPE: JSON, MSG_ID: f"batch:{batch.batch_id}", **(headers or {})},
    )


async def set_policy(system: System, policy: EffectivePolicy) -> None:
    """Write the policy as control does, and wait until the store follows it."""
    kv = await system.nc.jetstream().key_value(KV_STATE)
    await kv.put(POLICY_KEY, policy.model_dump_json().encode())
    await system.wait_policy_seen("store", policy.revision)


async def drained(system: System, durable: str) -> bool:
    info = await system.nc.jetstream().consumer_info("STORE_SYNC", durable)
    return info.num_pending == 0 and info.num_ack_pending == 0


async def test_ingest_api_is_token_protected_and_writes_idempotently(store_system: System) -> None:
    system = store_system
    url = (await system.kv(KV_STATE, "http.store"))["url"]
    assert url.endswith("/v1/bars")
    batch = BarBatch("api-1", bars("API1"))
    body = msgspec.json.encode(batch)
    auth = {"Authorization": f"Bearer {STORE_TOKEN}", CONTENT_TYPE: JSON}
    async with aiohttp.ClientSession() as http:
        async with http.post(url, data=body, headers={CONTENT_TYPE: JSON}) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"]["code"] == "unauthorized"
        wrong = {**auth, "Authorization": "Bearer nope"}
        async with http.post(url, data=body, headers=wrong) as resp:
            assert resp.status == 401
        assert await stored(system, "API1") == []

        async with http.post(url, data=body, headers=auth) as resp:
            assert resp.status == 200
            assert await resp.json() == {"ok": True, "batch_id": "api-1", "rows": 3}
        assert await stored(system, "API1") == batch.bars
        # The same batch again, and a msgspec-encoded one: the upsert changes nothing.
        async with http.post(url, data=body, headers=auth) as resp:
            assert resp.status == 200
        packed = msgspec.msgpack.encode(batch)
        async with http.post(url, data=packed, headers={**auth, CONTENT_TYPE: MSGPACK}) as resp:
            assert resp.status == 200
        assert await stored(system, "API1") == batch.bars

        async with http.post(url, data=b"{nope", headers=auth) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["code"] == "invalid_request"
        nul = msgspec.json.encode(BarBatch("api-2", bars("BAD\x00SYM", 1)))
        async with http.post(url, data=nul, headers=auth) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["code"] == "invalid_bar"
        async with http.post(url, data=body, headers={**auth, CONTENT_TYPE: "text/csv"}) as resp:
            assert resp.status == 415
        async with http.get(url.replace("/v1/bars", "/v1/health")) as resp:
            assert resp.status == 200
    assert await system.metric("store", "mdp_store_http_requests_total", status="401") == 2


async def test_bus_mode_batches_are_written_by_the_store_writer(store_system: System) -> None:
    system = store_system
    api_calls = await system.metric("store", "mdp_store_http_requests_total", status="200")
    await publish(system, "store.sync.bus", BarBatch("bus-1", bars("BUS1")))
    await wait_for(lambda: has_rows(system, "BUS1", 3), 15, "the bus batch in the store")
    await wait_for(lambda: drained(system, "store-writer"), 10, "the bus batch acknowledged")
    # Not through the HTTP path.
    assert await system.metric("store", "mdp_store_http_requests_total", status="200") == api_calls
    assert await system.metric("store", "mdp_store_http_forwards_total", outcome="ok") == 0


async def test_http_mode_posts_to_the_stores_own_api_and_reports_completion(
    store_system: System,
) -> None:
    system = store_system
    completed: list[dict[str, Any]] = []

    async def on_completed(msg: Any) -> None:
        completed.append(msgspec.json.decode(msg.data))

    sub = await system.nc.subscribe("ingest.events.completed", cb=on_completed)
    api_calls = await system.metric("store", "mdp_store_http_requests_total", status="200")
    await publish(system, "store.sync.http", BarBatch("http-1", bars("HTTP1", 4)))
    marker = EndOfStream(run="run-http", symbol="HTTP1", symbols_total=1, ticks=20)
    await publish(
        system,
        "store.sync.http",
        BarBatch("eos:run-http:HTTP1", []),
        {END_OF_STREAM: msgspec.json.encode(marker).decode()},
    )
    await wait_for(lambda: has_rows(system, "HTTP1", 4), 15, "the http batch in the store")
    await wait_for(lambda: completed, 10, "the completed event after the marker")
    assert completed[0]["run"] == "run-http" and completed[0]["symbol"] == "HTTP1"
    await wait_for(lambda: drained(system, "store-http-forwarder"), 10, "the http batch acked")
    assert (
        await system.metric("store", "mdp_store_http_requests_total", status="200") == api_calls + 1
    )
    assert await system.metric("store", "mdp_store_http_forwards_total", outcome="ok") == 1
    await sub.unsubscribe()


class Target:
    """A third-party ingest endpoint that fails the first `failures` POSTs with `status`."""

    def __init__(self) -> None:
        self.failures = 0
        self.status = 503
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((dict(request.headers), await request.read()))
        if self.failures > 0:
            self.failures -= 1
            return web.json_response({"error": "try later"}, status=self.status)
        return web.json_response({"ok": True})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/ingest", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/ingest"


async def test_http_mode_to_an_external_url_acks_only_after_a_2xx(store_system: System) -> None:
    system = store_system
    target = Target()
    await target.start()
    await set_policy(
        system,
        EffectivePolicy(store_sync=StoreSyncConfig(mode="http", http_url=target.url), revision=101),
    )
    try:
        target.failures = 2  # 503, 503, then 200: retried with backoff, acked after the 200
        await publish(system, "store.sync.http", BarBatch("ext-1", bars("EXT1", 2)))
        await wait_for(lambda: len(target.requests) >= 3, 20, "the POST to be retried to a 2xx")
        await wait_for(lambda: drained(system, "store-http-forwarder"), 10, "the batch acked")
        assert len(target.requests) == 3
        for headers, body in target.requests:
            assert headers["Authorization"] == f"Bearer {FORWARD_TOKEN}"
            assert headers[CONTENT_TYPE] == JSON
            assert headers["Idempotency-Key"] == "ext-1"
            assert msgspec.json.decode(body, type=BarBatch) == BarBatch("ext-1", bars("EXT1", 2))
        assert await stored(system, "EXT1") == []  # it went to the target, not our store
        assert await system.metric("store", "mdp_store_http_forwards_total", outcome="retry") >= 2

        # A target that refuses the batch for good: dead-lettered with the reason, acked.
        dead: list[Any] = []

        async def on_dead(msg: Any) -> None:
            dead.append(msg)

        sub = await system.nc.subscribe("md.dlq.store", cb=on_dead)
        target.failures, target.status = 1, 400
        await publish(system, "store.sync.http", BarBatch("ext-2", bars("EXT2", 1)))
        await wait_for(lambda: dead, 15, "the refused batch dead-lettered")
        assert "answered 400" in dead[0].headers["Mdp-Dlq-Reason"]
        assert dead[0].headers["Mdp-Dlq-Subject"] == "store.sync.http"
        await wait_for(
            lambda: drained(system, "store-http-forwarder"), 10, "the refused batch acked"
        )
        await sub.unsubscribe()
    finally:
        await set_policy(system, EffectivePolicy(revision=102))
        assert target.runner is not None
        await target.runner.cleanup()
