"""The gRPC servicer: translates between protobuf and domain objects, and maps errors to status codes here only.

It holds no model: each request is routed by `model` to the Ray Serve deployment of that model's group through
a `GroupRouter`. Streaming results arrive from the replica as GenerationChunks; errors the replica reports arrive
in-band (a `RemoteError` as the stream's last item) so their status code survives the hop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import time
import uuid
from typing import AsyncIterator, Protocol

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from chorus.client import REQUEST_ID_METADATA, SERVICE, STRATEGIES
from chorus.v1 import decoding_pb2 as pb
from chorus.v1 import decoding_pb2_grpc as pb_grpc
from decoding.errors import InvalidArgument
from decoding.sampling import SamplingParams
from server.config import ChorusConfig, GroupSpec, LimitsSpec
from server.engines.base import GenerationChunk, GenerationRequest
from server.errors import NotFound, ResourceExhausted, status_code_name
from server.metrics import FrontendMetrics
from server import tracing
from server.security import bearer_token
from server.strategies import registry, rerank
from server.strategies.protobuf import chat_messages

log = logging.getLogger("ray.serve.chorus")  # a child of Serve's logger: same format, same files

NOT_BUILT = "not implemented yet"
_FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}


@dataclasses.dataclass
class Route:
    """Where the router sent one request, for its log line: the replica that answered (the last one tried) and how
    many times the request was sent again because a replica was lost before answering; and the trace context of
    the RPC's span, the parent of the router's group calls."""
    replica: str | None = None
    retries: int = 0
    trace_context: tracing.Carrier = ()

    def __str__(self) -> str:
        return f"replica={self.replica or '-'} retries={self.retries}"


class GroupRouter(Protocol):
    def generate(self, model: str, request: GenerationRequest, route: Route, *, whole: bool = False
                 ) -> AsyncIterator[GenerationChunk]: ...

    async def rerank(self, model: str, job: rerank.RerankJob, route: Route) -> rerank.RerankOutcome: ...

    async def describe(self) -> list[dict]: ...


def to_sampling(proto: pb.SamplingParams) -> SamplingParams:
    def opt(name, default):
        return getattr(proto, name) if proto.HasField(name) else default

    return SamplingParams(
        max_tokens=opt("max_tokens", SamplingParams.max_tokens),
        temperature=opt("temperature", SamplingParams.temperature),
        top_p=opt("top_p", SamplingParams.top_p),
        top_k=opt("top_k", SamplingParams.top_k),
        seed=opt("seed", None),
        stop=tuple(proto.stop),
        ignore_eos=proto.ignore_eos,
    ).validate()


def to_strategy(proto: pb.GenerateRequest):
    """The strategy oneof as validated domain params (the registry entry's `from_proto`); None: plain sampling."""
    which = proto.WhichOneof("strategy")
    if which is None:
        return None
    return registry.strategy(which).from_proto(getattr(proto, which))


def report_proto(field: str, report) -> pb.StrategyReport:
    return pb.StrategyReport(**{field: registry.strategy(field).report_to_proto(report)})


def progress_proto(field: str, progress) -> pb.StrategyProgress:
    return pb.StrategyProgress(**{field: registry.strategy(field).progress_to_proto(progress)})


def to_generation_request(proto: pb.GenerateRequest, request_id: str, deadline: float | None
                          ) -> GenerationRequest:
    if proto.prompt and proto.messages:
        raise InvalidArgument("prompt", "give either prompt or messages, not both")
    if not proto.prompt and not proto.messages:
        raise InvalidArgument("prompt", "empty: give a non-empty prompt or at least one message")
    return GenerationRequest(
        request_id=request_id,
        sampling=to_sampling(proto.sampling),
        prompt=proto.prompt or None,
        messages=chat_messages(proto.messages),
        deadline=deadline,
        strategy=to_strategy(proto),
    )


# A client may send its own request id in the metadata REQUEST_ID_METADATA (when the message's `request_id` is
# empty); every answer carries the id in its trailing metadata under the same key.
MAX_REQUEST_ID_CHARS = 128


def _request_id(field: str, context) -> tuple[str, InvalidArgument | None]:
    """The request's id: the message's `request_id`, else the client's x-request-id metadata, else a new one; an id
    that is not 1-128 printable ASCII characters without spaces is refused (it goes into logs and metadata)."""
    given = field or next((v for k, v in context.invocation_metadata() or () if k == REQUEST_ID_METADATA), "")
    if not given:
        return uuid.uuid4().hex, None
    if len(given) > MAX_REQUEST_ID_CHARS or not all("!" <= c <= "~" for c in given):
        source = "" if field else f" (from the {REQUEST_ID_METADATA} metadata)"
        return uuid.uuid4().hex, InvalidArgument(
            "request_id", f"1-{MAX_REQUEST_ID_CHARS} printable ASCII characters without spaces, got "
            f"{len(given)} characters{source}")
    return given, None


def check_limits(request: GenerationRequest, limits: LimitsSpec) -> None:
    """What a request may ask for (frontend.limits), before it goes to a group: INVALID_ARGUMENT naming the field
    and the limit."""
    sampling = request.sampling
    if sampling.max_tokens > limits.max_tokens:
        raise InvalidArgument("sampling.max_tokens", f"at most {limits.max_tokens} (frontend.limits.max_tokens), "
                                                     f"got {sampling.max_tokens}")
    if len(sampling.stop) > limits.max_stop_strings:
        raise InvalidArgument("sampling.stop", f"at most {limits.max_stop_strings} stop strings "
                                               f"(frontend.limits.max_stop_strings), got {len(sampling.stop)}")
    for i, stop in enumerate(sampling.stop):
        if len(stop) > limits.max_stop_string_chars:
            raise InvalidArgument(f"sampling.stop[{i}]", f"at most {limits.max_stop_string_chars} characters "
                                                         f"(frontend.limits.max_stop_string_chars), got {len(stop)}")
    messages = request.messages or ()
    if len(messages) > limits.max_messages:
        raise InvalidArgument("messages", f"at most {limits.max_messages} messages (frontend.limits.max_messages), "
                                          f"got {len(messages)}")
    chars = len(request.prompt) if request.prompt else sum(len(m.content) for m in messages)
    if chars > limits.max_prompt_chars:
        raise InvalidArgument("prompt" if request.prompt else "messages",
                              f"at most {limits.max_prompt_chars} characters (frontend.limits.max_prompt_chars), "
                              f"got {chars}")


def client_identity(context, by_token: bool) -> str:
    """Whose call this is, for max_rpcs_per_client: its bearer token when the server takes tokens, else its IP
    address (the peer without the port)."""
    if by_token:
        token = bearer_token(context.invocation_metadata())
        if token is not None:
            return "token:" + token.decode()
    peer = context.peer() or ""  # "ipv4:127.0.0.1:50312", "ipv6:[::1]:50312", "unix:/path"
    return peer.rsplit(":", 1)[0] if peer.startswith(("ipv4:", "ipv6:")) else peer


class ClientSlots:
    """Calls in flight per client, against frontend.limits.max_rpcs_per_client."""

    def __init__(self, limit: int, by_token: bool):
        self._limit, self._by_token = limit, by_token
        self._in_flight: collections.Counter[str] = collections.Counter()

    @contextlib.asynccontextmanager
    async def held(self, context):
        client = client_identity(context, self._by_token)
        if self._in_flight[client] >= self._limit:
            raise ResourceExhausted(f"this client already has {self._limit} calls in flight on this front end "
                                    "(frontend.limits.max_rpcs_per_client): wait for one to finish")
        self._in_flight[client] += 1
        try:
            yield
        finally:
            self._in_flight[client] -= 1
            if not self._in_flight[client]:
                del self._in_flight[client]


def _cancellation_status(context) -> str:
    """Why a call ended early. grpc cancels the handler when the deadline passes, a few ms either side of it by
    the server's clock (the deadline travels as a relative timeout), hence the margin."""
    remaining = context.time_remaining()
    return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0.05 else "CANCELLED"


def _field_details(error: Exception, message: str) -> tuple[tuple[str, bytes], ...]:
    """For an INVALID_ARGUMENT, the field it names as gRPC's rich error details (a google.rpc.Status with a
    BadRequest field violation in the trailing metadata `grpc-status-details-bin`), which gRPC clients in any
    language read; nothing for other errors."""
    if not isinstance(error, InvalidArgument):
        return ()
    violation = error_details_pb2.BadRequest(field_violations=[
        error_details_pb2.BadRequest.FieldViolation(field=error.field, description=error.reason)])
    detail = any_pb2.Any()
    detail.Pack(violation)
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=message, details=[detail])
    return tuple(rpc_status.to_status(status).trailing_metadata)


def other_contexts(config: ChorusConfig, group: GroupSpec) -> str:
    """Where a group's strategies run its base model on other contexts (ModelInfo.other_contexts)."""
    if config.models[group.base].engine != "vllm":
        return "rows"
    return "vllm companions" if group.vllm_companions else "transformers copy"


def _usage_proto(chunk: GenerationChunk) -> pb.Usage:
    return pb.Usage(prompt_tokens=chunk.usage.prompt_tokens, completion_tokens=chunk.usage.completion_tokens,
                    forward_passes=chunk.usage.forward_passes, companion_waits=chunk.usage.companion_waits)


class _Call:
    """One RPC's bookkeeping: its id (returned in the trailing metadata), its deadline for the engine, the status it
    ends with, its log line, its metrics and its span (a child of the client's when its metadata has a W3C
    traceparent)."""

    def __init__(self, context, field_id: str, metrics: FrontendMetrics, rpc: str):
        self.context, self.metrics = context, metrics
        self.request_id, self._bad_id = _request_id(field_id, context)
        self.trailing = ((REQUEST_ID_METADATA, self.request_id),)
        context.set_trailing_metadata(self.trailing)
        self.started = time.monotonic()
        self.status: str | None = None
        self._message = ""
        self.span = tracing.start(
            f"{SERVICE}/{rpc}", tracing.from_metadata(context.invocation_metadata()),
            kind=tracing.SpanKind.SERVER, attributes={"rpc.system": "grpc", "rpc.service": SERVICE,
                                                      "rpc.method": rpc, "chorus.request_id": self.request_id})
        self.route = Route(trace_context=tracing.carrier_of(self.span))

    def deadline(self) -> float | None:
        """The client's deadline as an absolute time.time(), for the engine; None without one."""
        remaining = self.context.time_remaining()
        return time.time() + remaining if remaining is not None else None

    @contextlib.asynccontextmanager
    async def answering(self):
        """Maps every failure inside to its status code and aborts the call with it."""
        try:
            if self._bad_id is not None:
                raise self._bad_id
            yield
            self.status = "OK"
        except asyncio.CancelledError:
            raise  # the client went away or its deadline passed; `log` tells which
        except Exception as error:
            self.status, self._message = status_code_name(error), str(error)
            if self.status == "INTERNAL":
                log.exception("request %s failed", self.request_id)
            message = str(error)[:4000]
            await self.context.abort(getattr(grpc.StatusCode, self.status), message,
                                     self.trailing + _field_details(error, message))

    def finish(self, rpc: str, model: str, strategy: str, prompt_tokens: int, completion_tokens: int,
               forward_passes: dict[str, int], details: str = "") -> None:
        """The request's one log line, and its metrics."""
        status = self.status or _cancellation_status(self.context)
        latency_s = time.monotonic() - self.started
        log.info("request id=%s rpc=%s model=%s strategy=%s %sprompt_tokens=%d completion_tokens=%d %s "
                 "latency_ms=%.1f status=%s", self.request_id, rpc, model, strategy, details, prompt_tokens,
                 completion_tokens, self.route, 1000 * latency_s, status)
        self.metrics.record(rpc, model, strategy, status, latency_s, prompt_tokens, completion_tokens, forward_passes)
        if self.span.is_recording():
            self.span.set_attributes({"chorus.model": model, "chorus.strategy": strategy,
                                      "chorus.prompt_tokens": prompt_tokens,
                                      "chorus.completion_tokens": completion_tokens,
                                      "chorus.replica": self.route.replica or "", "chorus.retries": self.route.retries})
            tracing.end(self.span, status, self._message)


class DecodingService(pb_grpc.DecodingServicer):
    def __init__(self, config: ChorusConfig, router: GroupRouter, metrics: FrontendMetrics):
        self._config = config
        self._router = router
        self._metrics = metrics
        self._limits = config.frontend.limits
        self._clients = ClientSlots(self._limits.max_rpcs_per_client, by_token=config.frontend.auth is not None)

    async def Generate(self, request, context):
        text, token_ids, last = [], [], None
        async with contextlib.aclosing(self._generate(request, context, "Generate")) as chunks:
            async for model, request_id, chunk in chunks:
                text.append(chunk.text)
                token_ids.extend(chunk.token_ids)
                last = chunk
        response = pb.GenerateResponse(
            text="".join(text), token_ids=token_ids, finish_reason=_FINISH[last.finish_reason],
            usage=_usage_proto(last), request_id=request_id, model=model, seed=last.seed)
        if last.report is not None:
            response.report.CopyFrom(report_proto(request.WhichOneof("strategy"), last.report))
        return response

    async def GenerateStream(self, request, context):
        async with contextlib.aclosing(self._generate(request, context, "GenerateStream")) as chunks:
            async for model, request_id, chunk in chunks:
                message = pb.GenerateResponse(text=chunk.text, token_ids=chunk.token_ids, request_id=request_id,
                                              model=model)
                if chunk.progress is not None:
                    message.progress.CopyFrom(progress_proto(request.WhichOneof("strategy"), chunk.progress))
                if chunk.finish_reason is not None:
                    message.finish_reason = _FINISH[chunk.finish_reason]
                    message.usage.CopyFrom(_usage_proto(chunk))
                    message.seed = chunk.seed
                    if chunk.report is not None:
                        message.report.CopyFrom(report_proto(request.WhichOneof("strategy"), chunk.report))
                yield message

    def _check_model(self, model: str) -> None:
        if model not in self._config.base_models:
            raise NotFound(f"model {model!r} is not served here; ListModels lists {self._config.base_models}")

    async def _generate(self, request, context, rpc: str):
        """Validates, routes and streams one request; logs one line for it; maps every failure to a status."""
        call = _Call(context, request.request_id, self._metrics, rpc)
        model = request.model or self._config.default_model
        strategy = request.WhichOneof("strategy") or "plain"
        prompt_tokens = completion_tokens = 0
        forward_passes: dict[str, int] = {}
        try:
            async with call.answering(), self._clients.held(context):
                self._check_model(model)
                domain = to_generation_request(request, call.request_id, call.deadline())
                check_limits(domain, self._limits)
                chunks = self._router.generate(model, domain, call.route, whole=rpc == "Generate")
                async with contextlib.aclosing(chunks):
                    async for chunk in chunks:
                        completion_tokens += len(chunk.token_ids)  # what was streamed, if it ends early
                        if chunk.usage is not None:
                            prompt_tokens = chunk.usage.prompt_tokens
                            completion_tokens = chunk.usage.completion_tokens
                            forward_passes = dict(chunk.usage.forward_passes)
                        yield model, call.request_id, chunk
        finally:
            call.finish(rpc, model, strategy, prompt_tokens, completion_tokens, forward_passes)

    async def Rerank(self, request, context):
        call = _Call(context, request.request_id, self._metrics, "Rerank")
        model = request.model or self._config.default_reranker
        usage = pb.Usage()
        try:
            async with call.answering(), self._clients.held(context):
                self._check_model(model)
                params = rerank.from_proto(request)
                outcome = await self._router.rerank(model, rerank.RerankJob(call.request_id, params, call.deadline()),
                                                    call.route)
                response = rerank.outcome_to_proto(outcome, params, call.request_id, model)
                usage = response.usage
                return response
        finally:
            call.finish("Rerank", model, "rerank", usage.prompt_tokens, usage.completion_tokens,
                        dict(usage.forward_passes), details=f"passages={len(request.passages)} "
                        f"forward_passes={sum(usage.forward_passes.values())} ")

    async def ListModels(self, request, context):
        models = []
        for entry in await self._router.describe():
            model_name = entry["model"]
            support = entry["strategies"]
            models.append(pb.ModelInfo(
                name=model_name, role="base", group=entry["group"], engine=entry["engine"],
                device=entry["device"], dtype=entry["dtype"], max_model_len=entry["max_model_len"],
                is_default=model_name == self._config.default_model,
                strategies=[pb.StrategySupport(strategy="plain", available=True)] + [
                    pb.StrategySupport(strategy=s, available=support.get(s, NOT_BUILT) is None,
                                       reason=support.get(s, NOT_BUILT) or "")
                    for s in (*STRATEGIES, "rerank")],
                running_requests=entry["running"], waiting_requests=entry["waiting"], replicas=entry["replicas"],
                other_contexts=other_contexts(self._config, self._config.groups[entry["group"]])))
            group = self._config.groups[entry["group"]]
            for guide in group.guides.values():
                models.append(pb.ModelInfo(
                    name=guide.name, role=",".join(guide.roles), group=group.name, engine="transformers",
                    device=self._config.models[guide.model].device, dtype=self._config.models[guide.model].dtype,
                    max_model_len=entry["max_model_len"]))
        return pb.ListModelsResponse(models=models)
