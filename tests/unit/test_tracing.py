"""mdp.shared.tracing, in-memory exporter: producer spans, parents and links by traceparent."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from mdp.shared import tracing

pytest.importorskip("opentelemetry.sdk", reason="the tracing extra is not installed")
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter


class FakeMsg:
    def __init__(self, headers: dict[str, str] | None) -> None:
        self.headers = headers


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    yield exporter
    tracing.uninstall()


def test_off_by_default() -> None:
    assert tracing.ON is False


def test_a_publish_outside_a_span_starts_one_and_a_batch_continues_it(
    spans: InMemorySpanExporter,
) -> None:
    original = {"Content-Type": "application/json"}
    first = tracing.outgoing("md.raw.synthetic.AAA", original)
    assert tracing.TRACEPARENT not in original, "the caller's headers are not changed"
    second = tracing.outgoing("md.raw.synthetic.BBB", None)
    (a, b) = spans.get_finished_spans()
    assert a.name == b.name == "publish md.raw"
    assert first[tracing.TRACEPARENT].split("-")[2] == f"{a.context.span_id:016x}"

    msgs = [FakeMsg(first), FakeMsg(None), FakeMsg(second)]
    with tracing.consuming("MD_RAW", "router", msgs):  # type: ignore[arg-type]
        forwarded = tracing.outgoing("md.quotes.AAA", {})
    process = spans.get_finished_spans()[-1]
    assert process.name == "process router"
    assert process.parent is not None and process.parent.span_id == a.context.span_id
    assert process.context.trace_id == a.context.trace_id
    assert [link.context.span_id for link in process.links] == [b.context.span_id]
    assert process.attributes is not None
    assert process.attributes["messaging.batch.message_count"] == 3
    # inside the batch span a publish carries it, without a span of its own
    assert forwarded[tracing.TRACEPARENT].split("-")[2] == f"{process.context.span_id:016x}"
    assert len(spans.get_finished_spans()) == 3
