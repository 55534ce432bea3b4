"""The Ray Serve application: one deployment per model group, and a gRPC front end that routes to them.

Why our own grpc.aio front end rather than Ray Serve's gRPC ingress (`gRPCOptions`): as of Ray 2.60 Serve's ingress
has no standard `grpc.health.v1` service (Kubernetes gRPC probes, grpcurl), no TLS, no server interceptors (auth,
tracing) and does not pass the client's deadline on to replicas (Ray Serve 2.60's gRPCOptions). Our front
end is a Serve deployment too, so the whole app is one Serve config (replicas, resources, autoscaling); it serves
`chorus.v1.Decoding`, health and reflection on one port, turns the client's deadline into an engine deadline, and
calls the group deployments through handles (about 1.5 ms a call on loopback here, vs ~10 ms through Serve's
proxy). One front-end replica binds one address; scale it out with one per node behind a Service/LB.

Errors cross the handle in-band: a replica's generator yields a `RemoteError` as its last item instead of raising,
so the status code chosen in the replica reaches the client unchanged. A replica lost mid-request (a crash, an OOM
kill, its node gone) is never INTERNAL: a request the client has seen nothing of yet (no token streamed; every unary
call) is sent once more to a live replica within its deadline, and one that has streamed tokens ends UNAVAILABLE
(retryable) after them. Serve replaces the lost replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from typing import TYPE_CHECKING, AsyncIterator

import ray
from ray import serve
from ray.exceptions import NodeDiedError, RayActorError, WorkerCrashedError
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from decoding.errors import InvalidArgument
from server.config import NODE_IP, ChorusConfig, check_exposure, parse_chorus_config
from server.engines.base import GenerationChunk, GenerationRequest
from server.errors import ChorusError, Unavailable, status_code_name
from server.metrics import FrontendMetrics, GroupMetrics
from server import tracing
from server.strategies import registry
from server.strategies.rerank import RerankJob, RerankOutcome, Reranker


if TYPE_CHECKING:
    from server.service import Route  # the front end's (imported there lazily: a group replica needs no gRPC)

log = logging.getLogger("ray.serve")


@dataclasses.dataclass(frozen=True)
class RemoteError:
    code: str
    message: str
    # The field an INVALID_ARGUMENT names: the front end sends it to the client in the error's details.
    field: str | None = None

    def to_exception(self) -> Exception:
        if self.field is not None:
            return InvalidArgument(self.field, self.message.removeprefix(f"{self.field}: "))
        error = ChorusError(self.message)
        error.code = self.code
        return error


def _remote_error(error: Exception, request_id: str) -> RemoteError:
    """A replica's failure as the in-band error the front end re-raises with the same status code."""
    code = status_code_name(error)
    if code == "INTERNAL":
        log.exception("request %s failed in the engine", request_id)
    return RemoteError(code=code, message=str(error),
                       field=error.field if isinstance(error, InvalidArgument) else None)


@dataclasses.dataclass(frozen=True)
class Placement:
    """Which replica serves a request: the first item of a generate stream, the first half of a rerank reply."""
    replica: str  # Serve's id of the replica, unique within its deployment
    node: str  # the IP address of its Ray node

    def __str__(self) -> str:
        return f"{self.replica}@{self.node}"


def make_engine(config: ChorusConfig, group_name: str):
    group = config.groups[group_name]
    model = config.models[group.base]
    if model.engine == "vllm":
        from server.engines.vllm_engine import VLLMEngine
        return VLLMEngine(model, group, config)
    from server.engines.transformers_engine import TransformersEngine
    return TransformersEngine(model, group, config)


@serve.deployment(name="group", max_ongoing_requests=1024)
class ModelGroup:
    """Hosts one group's models (the base and, with token-level strategies, its guides) in each replica, and runs
    request-level strategies (best-of-N) and reranking over them."""

    async def __init__(self, args: dict, group_name: str):
        self._config = parse_chorus_config(args)
        tracing.configure(self._config.tracing, f"group:{group_name}")
        self._group = self._config.groups[group_name]
        self._engine = make_engine(self._config, group_name)
        self._reranker = Reranker(self._engine, self._group)
        self._placement = Placement(replica=serve.get_replica_context().replica_id.unique_id,
                                    node=ray.util.get_node_ip_address())
        self._metrics = GroupMetrics(group_name)
        self._sampling = asyncio.get_running_loop().create_task(self._metrics.sample_load(self._engine))

    async def generate(self, request: GenerationRequest
                       ) -> AsyncIterator[Placement | GenerationChunk | RemoteError]:
        received = time.time()
        yield self._placement
        span = tracing.start("chorus.group.generate", request.trace_context, kind=tracing.SpanKind.SERVER,
                             attributes=self._span_attributes(request.request_id), start_time=received)
        request = dataclasses.replace(request, trace_context=tracing.carrier_of(span))
        status, message = "CANCELLED", ""
        try:
            strategy = registry.strategy_of(request.strategy).field if request.strategy else "plain"
            span.set_attribute("chorus.strategy", strategy)
            clock = self._metrics.token_clock(strategy)
            async with contextlib.aclosing(registry.generate(self._engine, self._group, request)) as chunks:
                async for chunk in chunks:
                    clock.tokens(len(chunk.token_ids))
                    if chunk.phases is not None:
                        tracing.engine_phases(span, received, chunk.phases, time.time(), {
                            "chorus.completion_tokens": chunk.usage.completion_tokens,
                            **{f"chorus.forward_passes.{model}": n
                               for model, n in chunk.usage.forward_passes.items()}})
                    yield chunk
            status = "OK"
        except Exception as error:
            failure = _remote_error(error, request.request_id)
            status, message = failure.code, failure.message
            yield failure
        finally:
            tracing.end(span, status, message)

    async def rerank(self, job: RerankJob) -> tuple[Placement, RerankOutcome | RemoteError]:
        with tracing.span("chorus.group.rerank", job.trace_context, kind=tracing.SpanKind.SERVER,
                          attributes=self._span_attributes(job.request_id, passages=len(job.params.passages))
                          ) as span:
            try:
                return self._placement, await self._reranker.run(
                    dataclasses.replace(job, trace_context=tracing.carrier_of(span)))
            except Exception as error:
                failure = _remote_error(error, job.request_id)
                tracing.end(span, failure.code, failure.message)
                return self._placement, failure

    def _span_attributes(self, request_id: str, **extra) -> dict:
        return {"chorus.request_id": request_id, "chorus.group": self._group.name, "chorus.model": self._group.base,
                "chorus.replica": str(self._placement), **{f"chorus.{key}": value for key, value in extra.items()}}

    def describe(self) -> dict:
        info, load = self._engine.info(), self._engine.load()
        return {"model": self._group.base, "group": self._group.name, "replica": str(self._placement),
                **dataclasses.asdict(info),
                "running": load.running, "waiting": load.waiting,
                "strategies": {**self._engine.strategy_support(), "rerank": self._reranker.unavailable}}

    def __del__(self):
        sampling = getattr(self, "_sampling", None)
        if sampling is not None:
            sampling.cancel()
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.shutdown()
        tracing.shutdown()


# What a handle call raises when the replica's process or node is gone (or Serve's router learns it is, between
# choosing and calling it); the front end answers UNAVAILABLE or tries a live replica.
REPLICA_LOST = (RayActorError, WorkerCrashedError, NodeDiedError, ReplicaUnavailableError)
# How long ListModels waits for every replica of a group to describe itself before it asks any one of them.
DESCRIBE_TIMEOUT_S = 5.0


def _lost(what: str, error: Exception, after: str) -> Unavailable:
    return Unavailable(f"the replica serving {what} was lost {after} ({type(error).__name__}); Serve is starting "
                       "another: retry the request")


def _may_retry(request_id: str, deadline: float | None, route: "Route", error: Exception, what: str) -> bool:
    """Whether a request the client has seen nothing of yet is sent once more, to a live replica: once at most, and
    only while its deadline leaves time. Says so in the log."""
    if route.retries or (deadline is not None and time.time() >= deadline):
        return False
    route.retries += 1
    replica = f"the replica {route.replica}" if route.replica else "its replica"
    log.warning("request %s: %s serving %s was lost (%s: %s); sending it once more to a live replica",
                request_id, replica, what, type(error).__name__, str(error).splitlines()[0][:200])
    return True


class HandleRouter:
    """Routes a request to its model's group deployment, unpacks the stream and survives the loss of a replica."""

    def __init__(self, config: ChorusConfig, groups: dict[str, DeploymentHandle]):
        self._config = config
        self._handles = {config.groups[name].base: handle for name, handle in groups.items()}

    async def generate(self, model: str, request: GenerationRequest, route: "Route", *, whole: bool = False
                       ) -> AsyncIterator[GenerationChunk]:
        """The request's chunks. `whole`: the caller answers only once the request is done (unary Generate), so
        the chunks are held back until then, and a lost replica's partial work can be redone on another."""
        what = f"model {model!r}"
        while True:
            held: list[GenerationChunk] = []
            streamed = False
            with self._group_call(model, route) as attempt:
                stream = self._handles[model].options(stream=True).generate.remote(
                    dataclasses.replace(request, trace_context=tracing.carrier_of(attempt)))
                try:
                    async for item in stream:
                        if isinstance(item, Placement):
                            route.replica = str(item)
                            attempt.set_attribute("chorus.replica", route.replica)
                        elif isinstance(item, RemoteError):
                            raise item.to_exception()
                        elif whole:
                            held.append(item)
                        else:
                            streamed = True
                            yield item
                except REPLICA_LOST as error:
                    if streamed:
                        raise _lost(what, error, "after streaming part of the answer") from error
                    if not _may_retry(request.request_id, request.deadline, route, error, what):
                        raise _lost(what, error, "before answering") from error
                    tracing.end(attempt, "UNAVAILABLE", f"replica lost: {type(error).__name__}")
                    continue
                finally:
                    stream.cancel()  # no-op when the stream ended; aborts the engine work when the client went away
            for chunk in held:
                yield chunk
            return

    @staticmethod
    def _group_call(model: str, route: "Route"):
        """The span of one call to a group's replica (a retry gets its own), the parent of the replica's spans."""
        return tracing.span("chorus.group_call", route.trace_context, kind=tracing.SpanKind.CLIENT,
                            attributes={"chorus.model": model, "chorus.attempt": route.retries})

    async def rerank(self, model: str, job: RerankJob, route: "Route") -> RerankOutcome:
        what = f"model {model!r}"
        while True:
            with self._group_call(model, route) as attempt:
                response = self._handles[model].rerank.remote(
                    dataclasses.replace(job, trace_context=tracing.carrier_of(attempt)))
                try:
                    placement, outcome = await response
                except asyncio.CancelledError:
                    response.cancel()  # the client went away: abort the windows in the engine
                    raise
                except REPLICA_LOST as error:
                    if not _may_retry(job.request_id, job.deadline, route, error, what):
                        raise _lost(what, error, "before answering") from error
                    tracing.end(attempt, "UNAVAILABLE", f"replica lost: {type(error).__name__}")
                    continue
                route.replica = str(placement)
                attempt.set_attribute("chorus.replica", route.replica)
                if isinstance(outcome, RemoteError):
                    raise outcome.to_exception()
                return outcome

    async def describe(self) -> list[dict]:
        """Each group as its replicas see it: running and waiting requests summed over its live replicas."""
        return list(await asyncio.gather(*(self._describe_group(h) for h in self._handles.values())))

    @staticmethod
    async def _describe_group(handle: DeploymentHandle) -> dict:
        try:
            answers = [a for a in await handle.broadcast("describe").results_async(
                timeout_s=DESCRIBE_TIMEOUT_S, return_exceptions=True) if isinstance(a, dict)]
        # No replica yet (starting, or all being replaced), or one on a node that is going away and not yet known
        # to be gone.
        except (DeploymentUnavailableError, TimeoutError):
            answers = []
        if not answers:  # wait for one (raises DeploymentUnavailableError if the group failed to deploy)
            try:
                answers = [await handle.describe.remote()]
            except REPLICA_LOST as error:
                raise _lost("a model group", error, "while describing it") from error
        merged = {key: value for key, value in answers[0].items() if key != "replica"}
        merged["running"] = sum(a["running"] for a in answers)
        merged["waiting"] = sum(a["waiting"] for a in answers)
        merged["replicas"] = sorted(a["replica"] for a in answers)
        return merged


@serve.deployment(name="frontend", num_replicas=1, ray_actor_options={"num_cpus": 0})
class Frontend:
    """The gRPC front end: chorus.v1.Decoding, grpc.health.v1 and reflection on one port. Run one per node
    (`max_replicas_per_node: 1`) to serve the same API from every node; `frontend.host: node-ip` binds each to its
    node's address."""

    async def __init__(self, args: dict, groups: dict[str, DeploymentHandle]):
        import grpc
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
        from grpc_reflection.v1alpha import reflection

        from chorus.client import SERVICE
        from chorus.v1 import decoding_pb2_grpc
        from server import security
        from server.service import DecodingService

        config = parse_chorus_config(args)
        tracing.configure(config.tracing, "frontend")
        frontend = config.frontend
        host = ray.util.get_node_ip_address() if frontend.host == NODE_IP else frontend.host
        check_exposure(frontend, host)
        security.warn_about_exposure(frontend, host)
        self._drain_grace_s = frontend.drain_grace_s
        self._drained: asyncio.Future | None = None
        self._router = HandleRouter(config, groups)
        self._health = health.aio.HealthServicer()
        interceptors = [security.BearerTokenInterceptor(security.TokenStore(frontend.auth),
                                                        frontend.auth.open_services)] if frontend.auth else []
        self._server = grpc.aio.server(
            interceptors=interceptors, maximum_concurrent_rpcs=frontend.max_concurrent_rpcs,
            options=[("grpc.max_receive_message_length", frontend.limits.max_message_bytes)])
        decoding_pb2_grpc.add_DecodingServicer_to_server(DecodingService(config, self._router, FrontendMetrics()),
                                                         self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server)
        self._services = ("", SERVICE)
        for name in self._services:
            await self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self._address = f"{host}:{frontend.port}"
        credentials = security.server_credentials(frontend.tls) if frontend.tls else None
        bound = (self._server.add_secure_port(self._address, credentials) if credentials
                 else self._server.add_insecure_port(self._address))
        if bound == 0:
            raise ChorusError(f"cannot bind the gRPC front end to {self._address}")
        # Probes that cannot speak TLS (Kubernetes' gRPC probes) get health alone, in the clear, on its own port.
        self._health_server = None
        if frontend.health_port is not None:
            self._health_server = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(self._health, self._health_server)
            if self._health_server.add_insecure_port(f"{host}:{frontend.health_port}") == 0:
                raise ChorusError(f"cannot bind the health port to {host}:{frontend.health_port}")
            await self._health_server.start()
        await self._server.start()
        log.info("chorus gRPC front end listening on %s (%s%s%s)", self._address,
                 "TLS" + (", client certificates" if frontend.tls and frontend.tls.client_ca else "")
                 if frontend.tls else "plaintext", ", bearer tokens" if frontend.auth else "",
                 f"; health alone on port {frontend.health_port}" if self._health_server else "")
        self._ready = asyncio.get_running_loop().create_task(self._mark_serving_when_groups_answer())

    async def _mark_serving_when_groups_answer(self) -> None:
        from grpc_health.v1 import health_pb2
        await self._router.describe()  # waits for one replica of every group
        for name in self._services:
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("chorus is SERVING on %s", self._address)

    def address(self) -> str:
        """Where this front end listens (host:port)."""
        return self._address

    def serving(self) -> bool:
        """Whether health says SERVING (every group answered, not draining): what `chorus serve` waits for,
        through Serve rather than over gRPC, so it needs neither the TLS trust root nor a token."""
        return self._drained is None and self._ready.done() and not self._ready.cancelled() \
            and self._ready.exception() is None

    async def drain(self) -> None:
        """Graceful drain: health turns NOT_SERVING for good, new RPCs are refused (UNAVAILABLE), and those in
        flight get `frontend.drain_grace_s` seconds to finish before they are cancelled. Idempotent."""
        if self._drained is None:
            self._drained = asyncio.ensure_future(self._drain())
        await asyncio.shield(self._drained)

    async def _drain(self) -> None:
        log.info("chorus front end %s draining: NOT_SERVING; requests in flight get up to %.0f s", self._address,
                 self._drain_grace_s)
        self._ready.cancel()
        await self._health.enter_graceful_shutdown()
        await self._server.stop(grace=self._drain_grace_s)
        if self._health_server is not None:
            await self._health_server.stop(grace=None)
        tracing.shutdown()  # sends the spans still buffered
        log.info("chorus front end %s drained", self._address)

    async def check_health(self) -> None:
        if self._ready.done() and not self._ready.cancelled() and self._ready.exception() is not None:
            raise RuntimeError(f"model groups failed to start: {self._ready.exception()!r}")

    async def __del__(self):
        if hasattr(self, "_ready"):  # started: Serve stopping this replica (scale-down, redeploy, shutdown) drains it
            await self.drain()


def build_app(args: dict) -> serve.Application:
    """Serve's application builder (`import_path: server.app:build_app`); `args` are the Chorus config."""
    config = parse_chorus_config(args)
    groups = {name: ModelGroup.options(name=group.deployment_name).bind(args, name)
              for name, group in config.groups.items()}
    return Frontend.bind(args, groups)
