"""The gRPC servicer: translates between protobuf and domain objects, and maps errors to status codes here only.

It holds no model: each request is routed by `model` to the Ray Serve deployment of that model's group through
a `GroupRouter`. Streaming results arrive from the replica as GenerationChunks; errors the replica reports arrive
in-band (a `RemoteError` as the stream's last item) so their status code survives the hop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from typing import AsyncIterator, Protocol

import grpc

from chorus.v1 import decoding_pb2 as pb
from chorus.v1 import decoding_pb2_grpc as pb_grpc
from decoding.errors import InvalidArgument
from decoding.sampling import SamplingParams
from server.config import ChorusConfig
from server.engines.base import GenerationChunk, GenerationRequest
from server.errors import NotFound, status_code_name
from server.strategies import registry, rerank
from server.strategies.protobuf import chat_messages

log = logging.getLogger("ray.serve.chorus")  # a child of Serve's logger: same format, same files

NOT_BUILT = "not implemented yet"
# Every strategy the API declares (the GenerateRequest oneof), whether or not the registry serves it yet.
API_STRATEGIES = tuple(f.name for f in pb.GenerateRequest.DESCRIPTOR.oneofs_by_name["strategy"].fields)
_FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}


@dataclasses.dataclass
class Route:
    """Where the router sent one request, for its log line: the replica that answered (the last one tried) and how
    many times the request was sent again because a replica was lost before answering."""
    replica: str | None = None
    retries: int = 0

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


def _cancellation_status(context) -> str:
    """Why a call ended early. grpc cancels the handler when the deadline passes, a few ms either side of it by
    the server's clock (the deadline travels as a relative timeout), hence the margin."""
    remaining = context.time_remaining()
    return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0.05 else "CANCELLED"


def _usage_proto(chunk: GenerationChunk) -> pb.Usage:
    return pb.Usage(prompt_tokens=chunk.usage.prompt_tokens, completion_tokens=chunk.usage.completion_tokens,
                    forward_passes=chunk.usage.forward_passes)


class _Call:
    """One RPC's bookkeeping: its id, its deadline for the engine, the status it ends with, and its log line."""

    def __init__(self, context, request_id: str):
        self.context, self.request_id = context, request_id
        self.started = time.monotonic()
        self.status: str | None = None
        self.route = Route()

    def deadline(self) -> float | None:
        """The client's deadline as an absolute time.time(), for the engine; None without one."""
        remaining = self.context.time_remaining()
        return time.time() + remaining if remaining is not None else None

    @contextlib.asynccontextmanager
    async def answering(self):
        """Maps every failure inside to its status code and aborts the call with it."""
        try:
            yield
            self.status = "OK"
        except asyncio.CancelledError:
            raise  # the client went away or its deadline passed; `log` tells which
        except Exception as error:
            self.status = status_code_name(error)
            if self.status == "INTERNAL":
                log.exception("request %s failed", self.request_id)
            await self.context.abort(getattr(grpc.StatusCode, self.status), str(error)[:4000])

    def log(self, fields: str) -> None:
        """The request's one log line."""
        status = self.status or _cancellation_status(self.context)
        log.info("request id=%s %s %s latency_ms=%.1f status=%s", self.request_id, fields, self.route,
                 1000 * (time.monotonic() - self.started), status)


class DecodingService(pb_grpc.DecodingServicer):
    def __init__(self, config: ChorusConfig, router: GroupRouter):
        self._config = config
        self._router = router

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
        call = _Call(context, request.request_id or uuid.uuid4().hex)
        model = request.model or self._config.default_model
        strategy = request.WhichOneof("strategy") or "plain"
        prompt_tokens = completion_tokens = 0
        try:
            async with call.answering():
                self._check_model(model)
                domain = to_generation_request(request, call.request_id, call.deadline())
                chunks = self._router.generate(model, domain, call.route, whole=rpc == "Generate")
                async with contextlib.aclosing(chunks):
                    async for chunk in chunks:
                        completion_tokens += len(chunk.token_ids)  # what was streamed, if it ends early
                        if chunk.usage is not None:
                            prompt_tokens = chunk.usage.prompt_tokens
                            completion_tokens = chunk.usage.completion_tokens
                        yield model, call.request_id, chunk
        finally:
            call.log(f"rpc={rpc} model={model} strategy={strategy} prompt_tokens={prompt_tokens} "
                     f"completion_tokens={completion_tokens}")

    async def Rerank(self, request, context):
        call = _Call(context, request.request_id or uuid.uuid4().hex)
        model = request.model or self._config.default_reranker
        usage = pb.Usage()
        try:
            async with call.answering():
                self._check_model(model)
                params = rerank.from_proto(request)
                outcome = await self._router.rerank(model, rerank.RerankJob(call.request_id, params, call.deadline()),
                                                    call.route)
                response = rerank.outcome_to_proto(outcome, params, call.request_id, model)
                usage = response.usage
                return response
        finally:
            call.log(f"rpc=Rerank model={model} passages={len(request.passages)} prompt_tokens={usage.prompt_tokens} "
                     f"completion_tokens={usage.completion_tokens} "
                     f"forward_passes={sum(usage.forward_passes.values())}")

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
                    for s in API_STRATEGIES + ("rerank",)],
                running_requests=entry["running"], waiting_requests=entry["waiting"], replicas=entry["replicas"]))
            group = self._config.groups[entry["group"]]
            for guide in group.guides.values():
                models.append(pb.ModelInfo(
                    name=guide.name, role=",".join(guide.roles), group=group.name, engine="transformers",
                    device=self._config.models[guide.model].device, dtype=self._config.models[guide.model].dtype,
                    max_model_len=entry["max_model_len"]))
        return pb.ListModelsResponse(models=models)
