"""server/tracing.py against real OTLP receivers in this process (gRPC and HTTP/protobuf), and the `tracing:`
config. The spans across the real server's processes are checked in tests/integration/test_server.py."""

from __future__ import annotations

import asyncio
import time

import pytest

from server import tracing
from server.config import TracingSpec, parse_chorus_config
from server.engines.base import PhaseTimes
from server.errors import ConfigError, ResourceExhausted
from bench.otlp_collector import GrpcReceiver, HttpReceiver

GOOD = {"models": {"m": {"path": "embedded:smollm2-135m-instruct"}}, "groups": {"g": {"base": "m"}}}
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


def traceparent(sampled: bool = True) -> tracing.Carrier:
    return (("traceparent", f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-{'01' if sampled else '00'}"),)


@pytest.fixture
def receiver():
    receiver = GrpcReceiver()
    yield receiver
    tracing.shutdown()
    receiver.stop()


def test_tracing_is_off_without_the_key_and_its_knobs_default():
    assert parse_chorus_config(GOOD).tracing is None
    spec = parse_chorus_config({**GOOD, "tracing": {"endpoint": "http://collector:4317"}}).tracing
    assert spec == TracingSpec(endpoint="http://collector:4317", protocol="grpc", sample_ratio=1.0,
                               service_name="chorus", export_interval_ms=5000)


@pytest.mark.parametrize("raw, message", [
    ({}, "tracing.endpoint: required"),
    ({"endpoint": "collector:4317"}, "tracing.endpoint: a URL starting with http:// or https://"),
    ({"endpoint": "http://c:4317", "protocol": "zipkin"}, "tracing.protocol: one of ('grpc', 'http/protobuf')"),
    ({"endpoint": "http://c:4317", "sample_ratio": 1.5}, "tracing.sample_ratio: a number from 0 to 1"),
    ({"endpoint": "http://c:4317", "sample_ratio": True}, "tracing.sample_ratio: a number from 0 to 1"),
    ({"endpoint": "http://c:4317", "service_name": ""}, "tracing.service_name: a non-empty string"),
    ({"endpoint": "http://c:4317", "export_interval_ms": 0}, "tracing.export_interval_ms: a whole number"),
    ({"endpoint": "http://c:4317", "headers": {"a": "b"}}, "tracing: unknown key(s) ['headers']; allowed:"),
    ("http://c:4317", "tracing: expected a mapping"),
])
def test_bad_tracing_configs_are_refused_naming_the_field(raw, message):
    with pytest.raises(ConfigError) as info:
        parse_chorus_config({**GOOD, "tracing": raw})
    assert message in str(info.value)


def test_a_request_tree_reaches_the_collector_under_the_clients_trace(receiver):
    tracing.configure(TracingSpec(endpoint=receiver.endpoint, export_interval_ms=50), "frontend")
    rpc = tracing.start("chorus.v1.Decoding/Generate", traceparent(), kind=tracing.SpanKind.SERVER,
                        attributes={"chorus.request_id": "r1"})
    # What crosses to the replica: the carrier, as the replica's process would read it.
    carried = tracing.carrier_of(rpc)
    assert [key for key, _ in carried] == ["traceparent"]
    replica = tracing.start("chorus.group.generate", carried, kind=tracing.SpanKind.SERVER)
    received = time.time() - 3
    phases = PhaseTimes(admitted=received + 1, first_token=received + 2)
    tracing.engine_phases(replica, received, phases, received + 3, {"chorus.completion_tokens": 5})
    tracing.end(replica, "OK")
    tracing.end(rpc, "RESOURCE_EXHAUSTED", "3 requests are waiting")
    tracing.shutdown()  # flushes

    spans = {s.name: s.span for s in receiver.wait_for(set(), timeout=0)}
    assert set(spans) == {"chorus.v1.Decoding/Generate", "chorus.group.generate", "chorus.engine.queue",
                          "chorus.engine.prefill", "chorus.engine.decode"}
    assert {s.trace_id.hex() for s in spans.values()} == {CLIENT_TRACE}
    assert spans["chorus.v1.Decoding/Generate"].parent_span_id.hex() == CLIENT_SPAN
    assert spans["chorus.group.generate"].parent_span_id == spans["chorus.v1.Decoding/Generate"].span_id
    for phase in ("queue", "prefill", "decode"):
        assert spans[f"chorus.engine.{phase}"].parent_span_id == spans["chorus.group.generate"].span_id
    times = [(spans[f"chorus.engine.{p}"].start_time_unix_nano, spans[f"chorus.engine.{p}"].end_time_unix_nano)
             for p in ("queue", "prefill", "decode")]
    assert [round(t / 1e9 - received, 3) for pair in times for t in pair] == [0, 1, 1, 2, 2, 3]
    decode = next(s for s in receiver.spans() if s.name == "chorus.engine.decode")
    assert decode.attributes == {"chorus.completion_tokens": 5}
    assert decode.resource["service.name"] == "chorus" and decode.resource["chorus.component"] == "frontend"
    error = spans["chorus.v1.Decoding/Generate"].status
    assert error.code == error.STATUS_CODE_ERROR and error.message == "RESOURCE_EXHAUSTED: 3 requests are waiting"
    assert spans["chorus.group.generate"].status.code == error.STATUS_CODE_UNSET


def test_the_http_protobuf_exporter_reaches_an_http_collector():
    receiver = HttpReceiver()
    try:
        tracing.configure(TracingSpec(endpoint=receiver.endpoint, protocol="http/protobuf"), "group:g")
        tracing.end(tracing.start("chorus.group.rerank", ()), "OK")
        tracing.shutdown()
        [span] = receiver.wait_for({"chorus.group.rerank"}, timeout=0)
        assert span.resource["chorus.component"] == "group:g" and len(span.span.trace_id) == 16
    finally:
        tracing.shutdown()
        receiver.stop()


def test_off_records_nothing_and_carries_nothing(receiver):
    tracing.configure(None, "frontend")
    assert not tracing.enabled()
    span = tracing.start("chorus.v1.Decoding/Generate", traceparent())
    assert not span.is_recording() and tracing.carrier_of(span) == ()
    tracing.engine_phases(span, 0.0, PhaseTimes(1.0, 2.0), 3.0)
    tracing.end(span, "OK")
    assert receiver.spans() == []


def test_the_sample_ratio_applies_to_new_traces_and_a_clients_decision_is_kept(receiver):
    tracing.configure(TracingSpec(endpoint=receiver.endpoint, sample_ratio=0.0), "frontend")
    assert not tracing.start("new trace", ()).is_recording()
    assert not tracing.start("client did not sample", traceparent(sampled=False)).is_recording()
    sampled = tracing.start("client sampled", traceparent(sampled=True))
    assert sampled.is_recording()
    tracing.end(sampled, "OK")
    tracing.shutdown()
    assert [s.name for s in receiver.wait_for({"client sampled"}, timeout=0)] == ["client sampled"]


def test_a_span_block_ends_with_the_status_it_ends_with(receiver):
    tracing.configure(TracingSpec(endpoint=receiver.endpoint), "group:g")
    with pytest.raises(ResourceExhausted):
        with tracing.span("full", ()):
            raise ResourceExhausted("queue full")

    async def cancelled():
        with tracing.span("cancelled", ()):
            await asyncio.sleep(10)

    async def main():
        task = asyncio.ensure_future(cancelled())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    with tracing.span("fine", ()):
        pass
    tracing.shutdown()
    spans = {s.name: s for s in receiver.wait_for({"full", "cancelled", "fine"}, timeout=0)}
    assert spans["full"].span.status.message == "RESOURCE_EXHAUSTED: queue full"
    assert spans["cancelled"].attributes["chorus.status"] == "CANCELLED"
    assert spans["fine"].attributes["chorus.status"] == "OK"
    assert spans["fine"].span.status.code == spans["fine"].span.status.STATUS_CODE_UNSET


def test_from_metadata_takes_only_the_w3c_headers():
    metadata = (("authorization", "Bearer x"), ("traceparent", "00-a-b-01"), ("tracestate", "k=v"),
                ("x-request-id", "r"), ("traceparent-bin", b"\x00"))
    assert tracing.from_metadata(metadata) == (("traceparent", "00-a-b-01"), ("tracestate", "k=v"))
    assert tracing.from_metadata(None) == ()
