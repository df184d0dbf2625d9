"""Tracing across hops: the five services with MDP_TRACING__ENABLED send their spans by OTLP/HTTP
to a receiver here, and one tick batch is one trace from the provider to the aggregator, the
store batches continuing it to the store; without the setting nothing is sent and no message
carries a `traceparent`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web
from nats.aio.client import Client as NATS

from mdp.cli import control_request
from mdp.shared import tracing
from mdp.shared.natsserver import free_port
from tests.conftest import PipelineFactory, wait_for

pytest.importorskip("opentelemetry.sdk", reason="the tracing extra is not installed")
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    trace_id: bytes
    span_id: bytes
    parent: bytes
    links: int


class Receiver:
    """An OTLP/HTTP endpoint that keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.port = free_port()

    async def traces(self, request: web.Request) -> web.Response:
        body = ExportTraceServiceRequest.FromString(await request.read())
        for resource_spans in body.resource_spans:
            attrs = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                for s in scope.spans:
                    self.spans.append(
                        Span(attrs["service.name"], s.name, s.trace_id, s.span_id,
                             s.parent_span_id, len(s.links))
                    )  # fmt: skip
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    def chain(self) -> list[Span] | None:
        """provider publish -> router process -> aggregator process, in one trace, if seen."""
        by_id = {s.span_id: s for s in self.spans}
        for span in self.spans:
            if span.service != "mdp-aggregator" or span.name != "process aggregator":
                continue
            router = by_id.get(span.parent)
            provider = by_id.get(router.parent) if router else None
            if (
                router is not None
                and provider is not None
                and (router.service, router.name) == ("mdp-router", "process router")
                and (provider.service, provider.name) == ("mdp-provider", "publish md.raw")
                and provider.trace_id == router.trace_id == span.trace_id
            ):
                return [provider, router, span]
        return None

    def store_continues(self) -> bool:
        """A store batch span whose parent is an aggregator span."""
        by_id = {s.span_id: s for s in self.spans}
        return any(
            s.service == "mdp-store"
            and s.name == "process store-writer"
            and (parent := by_id.get(s.parent)) is not None
            and parent.service == "mdp-aggregator"
            for s in self.spans
        )


async def test_a_tick_batch_is_one_trace_across_the_services(
    pipeline: PipelineFactory, nc: NATS, tmp_path: Path
) -> None:
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/v1/traces", receiver.traces)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", receiver.port).start()
    try:
        env = {
            "MDP_TRACING__ENABLED": "true",
            "MDP_TRACING__ENDPOINT": f"http://127.0.0.1:{receiver.port}",
            "OTEL_BSP_SCHEDULE_DELAY": "200",  # export every 200 ms, not 5 s
        }
        sup = pipeline(store_url=f"sqlite:///{tmp_path / 'bars.db'}", env=env)
        await sup.wait_ready()
        reply = await control_request(
            nc, "start", {"provider": "synthetic", "symbols": ["AAA"], "params": {"rate": 20}}
        )
        assert reply["ok"], reply
        await wait_for(lambda: receiver.chain() is not None, timeout=60, what="a traced chain")
        await wait_for(receiver.store_continues, timeout=60, what="a traced store batch")
    finally:
        await runner.cleanup()


async def test_off_by_default_no_traceparent(pipeline: PipelineFactory, nc: NATS) -> None:
    assert tracing.ON is False
    sup = pipeline(services=("provider", "router", "control"))
    await sup.wait_ready()
    seen: list[dict[str, str]] = []

    async def keep(msg: object) -> None:
        seen.append(dict(getattr(msg, "headers", None) or {}))

    sub = await nc.subscribe("md.quotes.>", cb=keep)
    reply = await control_request(
        nc, "start", {"provider": "synthetic", "symbols": ["AAA"], "params": {"rate": 20}}
    )
    assert reply["ok"], reply
    await wait_for(lambda: len(seen) >= 3, timeout=30, what="quotes")
    await sub.unsubscribe()
    assert not any(tracing.TRACEPARENT in h for h in seen)
