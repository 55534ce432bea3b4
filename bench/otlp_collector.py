"""OTLP trace collectors that run inside a test or benchmark process: what an OpenTelemetry collector receives
from Chorus, kept as protobuf spans. `GrpcReceiver` serves opentelemetry-proto's TraceService over gRPC,
`HttpReceiver` takes POST /v1/traces (OTLP/HTTP, protobuf body)."""

from __future__ import annotations

import dataclasses
import http.server
import threading
import time
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@dataclasses.dataclass(frozen=True)
class ReceivedSpan:
    resource: dict
    span: object  # opentelemetry.proto.trace.v1.Span

    @property
    def name(self) -> str:
        return self.span.name

    @property
    def attributes(self) -> dict:
        return _attributes(self.span.attributes)


def _attributes(pairs) -> dict:
    out = {}
    for pair in pairs:
        value = pair.value
        out[pair.key] = getattr(value, value.WhichOneof("value")) if value.WhichOneof("value") else None
    return out


class _Store:
    def __init__(self):
        self._spans: list[ReceivedSpan] = []
        self._lock = threading.Lock()

    def add(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        with self._lock:
            for resource_spans in request.resource_spans:
                resource = _attributes(resource_spans.resource.attributes)
                for scope_spans in resource_spans.scope_spans:
                    self._spans.extend(ReceivedSpan(resource, span) for span in scope_spans.spans)

    def spans(self, trace_id: bytes | None = None) -> list[ReceivedSpan]:
        with self._lock:
            return [s for s in self._spans if trace_id is None or s.span.trace_id == trace_id]

    def wait_for(self, names: set[str], trace_id: bytes | None = None, timeout: float = 30) -> list[ReceivedSpan]:
        """The spans of `trace_id` once every name in `names` has arrived (or fails after `timeout` s)."""
        deadline = time.monotonic() + timeout
        while True:
            spans = self.spans(trace_id)
            if names <= {s.name for s in spans}:
                return spans
            assert time.monotonic() < deadline, (sorted(names), sorted(s.name for s in spans))
            time.sleep(0.2)


class GrpcReceiver(_Store, trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self):
        super().__init__()
        self._server = grpc.server(futures.ThreadPoolExecutor(4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def Export(self, request, context):  # noqa: N802 (the gRPC method's name)
        self.add(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def stop(self) -> None:
        self._server.stop(None)


class HttpReceiver(_Store):
    def __init__(self):
        super().__init__()
        store = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path != "/v1/traces" or self.headers["Content-Type"] != "application/x-protobuf":
                    self.send_response(404)
                else:
                    request = trace_service_pb2.ExportTraceServiceRequest()
                    request.ParseFromString(body)
                    store.add(request)
                    self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()
                self.wfile.write(trace_service_pb2.ExportTraceServiceResponse().SerializeToString())

            def log_message(self, *args):
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}/v1/traces"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
