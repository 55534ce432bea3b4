"""The Ray Serve application: one deployment per model group, and a gRPC front end that routes to them.

Why our own grpc.aio front end rather than Ray Serve's gRPC ingress (`gRPCOptions`): as of Ray 2.60 Serve's ingress
has no standard `grpc.health.v1` service (Kubernetes gRPC probes, grpcurl), no TLS, no server interceptors (auth,
tracing) and does not pass the client's deadline on to replicas (Ray Serve 2.60's gRPCOptions). Our front
end is a Serve deployment too, so the whole app is one Serve config (replicas, resources, autoscaling); it serves
`chorus.v1.Decoding`, health and reflection on one port, turns the client's deadline into an engine deadline, and
calls the group deployments through handles (about 1.5 ms a call on loopback here, vs ~10 ms through Serve's
proxy). One front-end replica binds one address; scale it out with one per node behind a Service/LB.

Errors cross the handle in-band: a replica's generator yields a `RemoteError` as its last item instead of raising,
so the status code chosen in the replica reaches the client unchanged. A replica that dies mid-request (a crash, an
OOM kill, its node gone) is UNAVAILABLE: Serve starts a new one, and the client's retry reaches it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from typing import AsyncIterator

from ray import serve
from ray.exceptions import NodeDiedError, RayActorError, WorkerCrashedError
from ray.serve.handle import DeploymentHandle

from server.config import ChorusConfig, parse_chorus_config
from server.engines.base import GenerationChunk, GenerationRequest
from server.errors import ChorusError, Unavailable, status_code_name
from server.strategies import registry
from server.strategies.rerank import RerankJob, RerankOutcome, Reranker

log = logging.getLogger("ray.serve")


@dataclasses.dataclass(frozen=True)
class RemoteError:
    code: str
    message: str

    def to_exception(self) -> ChorusError:
        error = ChorusError(self.message)
        error.code = self.code
        return error


def _remote_error(error: Exception, request_id: str) -> RemoteError:
    """A replica's failure as the in-band error the front end re-raises with the same status code."""
    code = status_code_name(error)
    if code == "INTERNAL":
        log.exception("request %s failed in the engine", request_id)
    return RemoteError(code=code, message=str(error))


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

    def __init__(self, args: dict, group_name: str):
        self._config = parse_chorus_config(args)
        self._group = self._config.groups[group_name]
        self._engine = make_engine(self._config, group_name)
        self._reranker = Reranker(self._engine, self._group)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk | RemoteError]:
        try:
            async with contextlib.aclosing(registry.generate(self._engine, self._group, request)) as chunks:
                async for chunk in chunks:
                    yield chunk
        except Exception as error:
            yield _remote_error(error, request.request_id)

    async def rerank(self, job: RerankJob) -> RerankOutcome | RemoteError:
        try:
            return await self._reranker.run(job)
        except Exception as error:
            return _remote_error(error, job.request_id)

    def describe(self) -> dict:
        info, load = self._engine.info(), self._engine.load()
        return {"model": self._group.base, "group": self._group.name, **dataclasses.asdict(info),
                "running": load.running, "waiting": load.waiting,
                "strategies": {**self._engine.strategy_support(), "rerank": self._reranker.unavailable}}

    def __del__(self):
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.shutdown()


# What a handle call raises when the replica's process or node is gone; the front end answers UNAVAILABLE.
REPLICA_LOST = (RayActorError, WorkerCrashedError, NodeDiedError)


@contextlib.contextmanager
def _replica_loss_is_unavailable(what: str):
    try:
        yield
    except REPLICA_LOST as error:
        raise Unavailable(f"the replica serving {what} was lost ({type(error).__name__}); Serve is starting another: "
                          "retry the request") from error


class HandleRouter:
    """Routes a request to its model's group deployment and unpacks the stream."""

    def __init__(self, config: ChorusConfig, groups: dict[str, DeploymentHandle]):
        self._config = config
        self._handles = {config.groups[name].base: handle for name, handle in groups.items()}

    async def generate(self, model: str, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        stream = self._handles[model].options(stream=True).generate.remote(request)
        try:
            with _replica_loss_is_unavailable(f"model {model!r}"):
                async for item in stream:
                    if isinstance(item, RemoteError):
                        raise item.to_exception()
                    yield item
        finally:
            stream.cancel()  # no-op when the stream ended; aborts the engine work when the client went away

    async def rerank(self, model: str, job: RerankJob) -> RerankOutcome:
        response = self._handles[model].rerank.remote(job)
        try:
            with _replica_loss_is_unavailable(f"model {model!r}"):
                outcome = await response
        except asyncio.CancelledError:
            response.cancel()  # the client went away: abort the windows in the engine
            raise
        if isinstance(outcome, RemoteError):
            raise outcome.to_exception()
        return outcome

    async def describe(self) -> list[dict]:
        with _replica_loss_is_unavailable("a model group"):
            return list(await asyncio.gather(*(h.describe.remote() for h in self._handles.values())))


@serve.deployment(name="frontend", num_replicas=1, ray_actor_options={"num_cpus": 0})
class Frontend:
    """The gRPC front end: chorus.v1.Decoding, grpc.health.v1 and reflection on one port."""

    async def __init__(self, args: dict, groups: dict[str, DeploymentHandle]):
        import grpc
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
        from grpc_reflection.v1alpha import reflection

        from chorus.v1 import decoding_pb2, decoding_pb2_grpc
        from server.service import DecodingService

        config = parse_chorus_config(args)
        self._router = HandleRouter(config, groups)
        self._health = health.aio.HealthServicer()
        self._server = grpc.aio.server(maximum_concurrent_rpcs=config.frontend.max_concurrent_rpcs)
        decoding_pb2_grpc.add_DecodingServicer_to_server(DecodingService(config, self._router), self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        service_name = decoding_pb2.DESCRIPTOR.services_by_name["Decoding"].full_name
        reflection.enable_server_reflection((service_name, health.SERVICE_NAME, reflection.SERVICE_NAME),
                                            self._server)
        self._services = ("", service_name)
        for name in self._services:
            await self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{config.frontend.host}:{config.frontend.port}"
        if self._server.add_insecure_port(address) == 0:
            raise ChorusError(f"cannot bind the gRPC front end to {address}")
        await self._server.start()
        log.info("chorus gRPC front end listening on %s", address)
        self._ready = asyncio.get_running_loop().create_task(self._mark_serving_when_groups_answer())

    async def _mark_serving_when_groups_answer(self) -> None:
        from grpc_health.v1 import health_pb2
        await self._router.describe()  # waits for one replica of every group
        for name in self._services:
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("chorus is SERVING")

    async def check_health(self) -> None:
        if self._ready.done() and self._ready.exception() is not None:
            raise RuntimeError(f"model groups failed to start: {self._ready.exception()!r}")

    async def __del__(self):
        await self._server.stop(grace=5)


def build_app(args: dict) -> serve.Application:
    """Serve's application builder (`import_path: server.app:build_app`); `args` are the Chorus config."""
    config = parse_chorus_config(args)
    groups = {name: ModelGroup.options(name=group.deployment_name).bind(args, name)
              for name, group in config.groups.items()}
    return Frontend.bind(args, groups)
