"""`/healthz` and `/readyz` on every service's metrics port; a lost NATS makes it not ready."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import msgspec
import pytest
from nats.aio.client import Client as NATS

from mdp.shared.natsserver import EmbeddedNats
from tests.conftest import PipelineFactory, wait_for

pytestmark = pytest.mark.integration
SERVICES = ("provider", "router", "aggregator", "store", "control")


def get(port: int, path: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except OSError:
        return 0, {}


async def test_every_service_is_alive_and_ready_and_not_ready_without_nats(
    pipeline: PipelineFactory, nc: NATS, nats_server: EmbeddedNats
) -> None:
    sup = pipeline()
    await sup.wait_ready()
    ports = {}
    for service in SERVICES:
        info = await nc.request(f"$SRV.INFO.mdp-{service}", b"", timeout=5)
        ports[service] = int(msgspec.json.decode(info.data)["metadata"]["metrics_port"])
    for service, port in ports.items():
        assert await asyncio.to_thread(get, port, "/healthz") == (200, {"alive": True}), service
        status, body = await asyncio.to_thread(get, port, "/readyz")
        assert status == 200 and body["ready"] is True, (service, body)
        assert body["checks"] == {"nats": True, "streams": True, "started": True}
    _, aggregator = await asyncio.to_thread(get, ports["aggregator"], "/readyz")
    assert aggregator["lease"] == "active"

    nats_server.stop()
    try:

        async def not_ready() -> bool:
            status, body = await asyncio.to_thread(get, ports["router"], "/readyz")
            return status == 503 and body["checks"] == {
                "nats": False,
                "streams": True,
                "started": True,
            }

        await wait_for(not_ready, 20, "the router to report not ready without NATS")
        assert (await asyncio.to_thread(get, ports["router"], "/healthz"))[0] == 200
    finally:
        nats_server.start()

    async def ready_again() -> bool:
        return (await asyncio.to_thread(get, ports["router"], "/readyz"))[0] == 200

    await wait_for(ready_again, 30, "the router to be ready once NATS is back")
