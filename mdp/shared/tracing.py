"""Optional OpenTelemetry tracing across hops, with the W3C `traceparent` in NATS headers.

Off by default (`MDP_TRACING__ENABLED`): then nothing of OpenTelemetry is imported and the two
places that trace, `JsPublisher.publish` and `PullConsumer`'s handler call, read one module
attribute (`ON`) per message or batch. On (the `tracing` extra installed):
- every batch a consumer hands to its service is a CONSUMER span `process <durable>`, child of
  the first message's `traceparent`, linked to the others' (up to `MAX_LINKS`);
- every publish carries the current span's `traceparent`; a publish outside any span (a
  provider's tick batch, a batch a timer cut) starts a PRODUCER span `publish <md.raw>` (the
  subject's first two tokens) of its own, so a trace starts where the data enters.
A tick batch is then one trace: provider `publish md.raw` -> router `process router` ->
aggregator `process aggregator` -> store `process store-writer` for the store batches it
completes. Spans are sent by OTLP/HTTP to `MDP_TRACING__ENDPOINT` (`/v1/traces`), sampled by
trace id (`MDP_TRACING__SAMPLE_RATIO`, parent-based: a trace is kept or dropped whole).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from structlog.typing import FilteringBoundLogger

if TYPE_CHECKING:
    from nats.aio.msg import Msg

    from mdp.shared.settings import TracingSettings

__all__ = ["MAX_LINKS", "ON", "TRACEPARENT", "configure", "consuming", "install", "outgoing"]

ON = False  # read on the hot paths: True once a tracer provider is installed
TRACEPARENT = "traceparent"
MAX_LINKS = 32
_state: dict[str, Any] = {}  # tracer, propagator and the span API, once installed


def configure(service: str, settings: TracingSettings, log: FilteringBoundLogger) -> bool:
    """Install OTLP/HTTP tracing for `service` when enabled; whether tracing is on."""
    if not settings.enabled:
        return False
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    except ImportError as exc:
        log.error("tracing_unavailable", error=str(exc), hint="pip install 'mdp[tracing]'")
        return False
    provider = TracerProvider(
        resource=Resource.create({"service.name": f"mdp-{service}"}),
        sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
    )
    endpoint = settings.endpoint.rstrip("/") + "/v1/traces"
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    install(provider)
    log.info("tracing_on", endpoint=endpoint, sample_ratio=settings.sample_ratio)
    return True


def install(provider: Any) -> None:
    """Trace with this `TracerProvider` from now on (tests pass one with an in-memory exporter)."""
    global ON
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    _state.update(
        tracer=provider.get_tracer("mdp"), propagator=TraceContextTextMapPropagator(), trace=trace
    )
    ON = True


def uninstall() -> None:
    """Stop tracing (tests)."""
    global ON
    ON = False
    _state.clear()


def outgoing(subject: str, headers: dict[str, str] | None) -> dict[str, str]:
    """A copy of `headers` with the current span's `traceparent` (a new PRODUCER span's when
    there is none)."""
    trace, propagator = _state["trace"], _state["propagator"]
    out = dict(headers) if headers else {}
    if trace.get_current_span().get_span_context().is_valid:
        propagator.inject(out)
        return out
    destination = ".".join(subject.split(".", 2)[:2])
    with _state["tracer"].start_as_current_span(
        f"publish {destination}",
        kind=trace.SpanKind.PRODUCER,
        attributes={"messaging.system": "nats", "messaging.destination.name": subject},
    ):
        propagator.inject(out)
    return out


@contextlib.contextmanager
def consuming(stream: str, durable: str, msgs: Sequence[Msg]) -> Iterator[None]:
    """The CONSUMER span of one batch, current while the service handles it."""
    trace, propagator = _state["trace"], _state["propagator"]
    contexts = [
        propagator.extract(m.headers) for m in msgs if m.headers and TRACEPARENT in m.headers
    ]
    links = [
        trace.Link(trace.get_current_span(c).get_span_context())
        for c in contexts[1 : MAX_LINKS + 1]
    ]
    with _state["tracer"].start_as_current_span(
        f"process {durable}",
        context=contexts[0] if contexts else None,
        kind=trace.SpanKind.CONSUMER,
        links=links,
        attributes={
            "messaging.system": "nats",
            "messaging.destination.name": stream,
            "messaging.consumer.group.name": durable,
            "messaging.batch.message_count": len(msgs),
        },
    ):
        yield
