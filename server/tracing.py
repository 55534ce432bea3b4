"""OpenTelemetry tracing of requests, off unless the deploy file has `tracing:` (server/config.py TracingSpec).

Each front-end and group replica process configures its own tracer provider (`configure`), exporting over OTLP
(gRPC or HTTP/protobuf) in batches. A traced Generate call makes this tree, across processes:

    chorus.v1.Decoding/Generate       SERVER  front end; the child of the client's span when it sends a W3C
    │                                          `traceparent` in its gRPC metadata (its sampling decision is kept)
    └─ chorus.group_call               CLIENT  front end: one per handle call (a retry after a lost replica: two)
       └─ chorus.group.generate        SERVER  group replica (the context travels in GenerationRequest.trace_context)
          ├─ chorus.engine.queue               waiting for the engine to schedule it (KV slots / vLLM's scheduler)
          ├─ chorus.engine.prefill             scheduled → its first token
          ├─ chorus.engine.decode              first token → last
          └─ chorus.best_of_n.*                a request-level strategy's phases (candidates, each judging round)

and Rerank: `chorus.v1.Decoding/Rerank` → `chorus.group_call` → `chorus.group.rerank` → a `chorus.rerank.window`
per window. The engine phases are recorded when the sequence ends, from the times the engine reports
(GenerationChunk.phases); the token-level strategies' work happens inside the engine's steps (decode), and their
forward passes per model are attributes of the decode span. Spans carry the request id (`chorus.request_id`) and
end with the request's gRPC status (an error status with its message unless OK).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Iterator, Mapping

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from server.config import TracingSpec
from server.engines.base import PhaseTimes
from server.errors import status_code_name

log = logging.getLogger("ray.serve.chorus")

# W3C trace context headers as (key, value) pairs: gRPC metadata in, GenerationRequest.trace_context across Serve.
Carrier = tuple[tuple[str, str], ...]
_PROPAGATOR = TraceContextTextMapPropagator()
_tracer: trace.Tracer | None = None
_provider = None


def configure(spec: TracingSpec | None, component: str) -> None:
    """Sets up this process's tracer from the config (None: tracing off). `component` names the process in the
    spans' resource (`chorus.component`: "frontend" or "group:<name>")."""
    global _tracer, _provider
    shutdown()
    if spec is None:
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    if spec.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    exporter = OTLPSpanExporter(endpoint=spec.endpoint)
    _provider = TracerProvider(
        resource=Resource.create({"service.name": spec.service_name, "chorus.component": component}),
        sampler=ParentBased(TraceIdRatioBased(spec.sample_ratio)))
    _provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=spec.export_interval_ms))
    _tracer = _provider.get_tracer("chorus")
    log.info("tracing: %s spans to %s (%s), sample ratio %g", component, spec.endpoint, spec.protocol,
             spec.sample_ratio)


def shutdown() -> None:
    """Sends the spans still buffered and stops this process's tracer (a replica stopping)."""
    global _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    _tracer = _provider = None


def enabled() -> bool:
    return _tracer is not None


def from_metadata(metadata) -> Carrier:
    """The client's W3C trace context (traceparent, tracestate) from its gRPC invocation metadata."""
    fields = set(_PROPAGATOR.fields)
    return tuple((key, value) for key, value in metadata or () if key in fields and isinstance(value, str))


def _context(carrier: Carrier):
    return _PROPAGATOR.extract(dict(carrier)) if carrier else None


def carrier_of(span: trace.Span) -> Carrier:
    """The W3C context that makes the receiver's spans children of `span`; empty when tracing is off."""
    if _tracer is None:
        return ()
    headers: dict[str, str] = {}
    _PROPAGATOR.inject(headers, trace.set_span_in_context(span))
    return tuple(sorted(headers.items()))


def start(name: str, parent: Carrier, *, kind: SpanKind = SpanKind.INTERNAL, attributes: Mapping | None = None,
          start_time: float | None = None) -> trace.Span:
    """A span (ended by `end`) under the span `parent` names; a no-op span when tracing is off. `start_time`: a
    time.time() in the past."""
    if _tracer is None:
        return trace.INVALID_SPAN
    return _tracer.start_span(name, context=_context(parent), kind=kind, attributes=attributes,
                              start_time=_ns(start_time) if start_time is not None else None)


def end(span: trace.Span, status: str, message: str = "", end_time: float | None = None) -> None:
    """Ends a span with the request's gRPC status name: an error status (with `message`) unless OK."""
    if not span.is_recording():
        return
    span.set_attribute("chorus.status", status)
    if status != "OK":
        span.set_status(Status(StatusCode.ERROR, f"{status}: {message}"[:1000] if message else status))
    span.end(end_time=_ns(end_time) if end_time is not None else None)


@contextlib.contextmanager
def span(name: str, parent: Carrier, *, kind: SpanKind = SpanKind.INTERNAL, attributes: Mapping | None = None
         ) -> Iterator[trace.Span]:
    """A span around a block, ended with the status the block ends with: OK, the status of the error it raises,
    or CANCELLED when it is cancelled or closed early."""
    current = start(name, parent, kind=kind, attributes=attributes)
    try:
        yield current
    except (asyncio.CancelledError, GeneratorExit):
        end(current, "CANCELLED")
        raise
    except Exception as error:
        end(current, status_code_name(error), str(error))
        raise
    else:
        end(current, "OK")


def engine_phases(parent: trace.Span, received: float, phases: PhaseTimes, finished: float,
                  attributes: Mapping | None = None) -> None:
    """The engine's queue, prefill and decode spans of one generated sequence under `parent`, from the times it
    reported; `received`: when the replica got the request, `finished`: when its last token came. `attributes` go
    on the decode span (tokens, forward passes per model)."""
    if not parent.is_recording():
        return
    context = trace.set_span_in_context(parent)
    for name, begin, stop, extra in (("chorus.engine.queue", received, phases.admitted, None),
                                     ("chorus.engine.prefill", phases.admitted, phases.first_token, None),
                                     ("chorus.engine.decode", phases.first_token, finished, attributes)):
        child = _tracer.start_span(name, context=context, start_time=_ns(begin), attributes=extra)
        child.end(end_time=_ns(max(begin, stop)))


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)
