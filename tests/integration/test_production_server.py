"""The real server set up as in production, on one machine: TLS and bearer tokens (deploy/local-secure.yaml: the
self-signed certificate `chorus serve` makes into the cache, tokens from $CHORUS_TOKEN), calls in flight limited per
token (frontend.limits.max_rpcs_per_client: 2), and the group autoscaled from the deploy file (Serve's
`autoscaling_config`: 1 to 2 replicas, a target of 2 requests in flight per replica, reacting within seconds).

Against real clients: the right CA and token, a wrong CA, no TLS, no token, a wrong token; health and reflection
without a token; health in the clear on its own port; the CLI; and a bounded load that scales the group to 2
replicas (ListModels sums the requests over both) and back to 1 once it is gone."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from bench.run import free_port
from chorus.v1 import decoding_pb2 as pb
from chorus.v1 import decoding_pb2_grpc as pb_grpc
from server.security import MISSING_TOKEN, WRONG_TOKEN, self_signed_certificate
from tests.integration.conftest import ROOT, Server, left_running, ray_processes_of, status_of, wait_for_log_line

pytestmark = pytest.mark.integration

TOKEN = "s3cret-token-for-the-tests"
# Every token the server accepts: one client each (frontend.limits.max_rpcs_per_client counts per token).
TOKENS = (TOKEN, "another-token", "a-third-token", "a-fourth-token")
QUESTION = pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="What is the capital of France?")],
                              sampling=pb.SamplingParams(max_tokens=8, temperature=0))


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    raw = yaml.safe_load((ROOT / "deploy" / "local-secure.yaml").read_text())
    health_port = free_port()
    app = raw["applications"][0]
    app["args"]["frontend"].update(health_port=health_port, limits={"max_rpcs_per_client": 2})
    # Serve's defaults wait 30 s to scale up and 10 min to scale down.
    app["args"]["groups"]["smollm2"]["torch_threads"] = 1
    group = next(d for d in app["deployments"] if d["name"].startswith("group-"))
    del group["num_replicas"]
    group["autoscaling_config"] = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
                                   "upscale_delay_s": 1, "downscale_delay_s": 5, "look_back_period_s": 2}
    config = tmp_path_factory.mktemp("deploy") / "secure.yaml"
    config.write_text(yaml.safe_dump(raw))
    server = Server(str(config), env={"CHORUS_TOKEN": ",".join(TOKENS)})
    server.health_address = f"127.0.0.1:{health_port}"
    cluster = {}
    try:
        server.wait_serving(address=server.health_address)
        cluster = ray_processes_of(server)
        yield server
    finally:
        code = server.stop()
    assert code == 0, f"server exited with {code} on SIGINT:\n{server.log()[-3000:]}"
    assert cluster and left_running(cluster) == {}, f"Ray processes were left behind: {cluster}"


@pytest.fixture(scope="module")
def certificate(server) -> bytes:
    """The self-signed certificate the server made (into the cache it shares with this process)."""
    path, _ = self_signed_certificate()
    assert str(path) in server.log(), "chorus serve prints the certificate's path"
    return path.read_bytes()


@pytest.fixture(scope="module")
def channel(server, certificate):
    with grpc.secure_channel(server.address, grpc.ssl_channel_credentials(certificate)) as channel:
        yield channel


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


class WithToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds the bearer token to every call of a channel."""

    def __init__(self, token: str):
        self._metadata = bearer(token)

    def _with_token(self, details):
        return details._replace(metadata=tuple(details.metadata or ()) + self._metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_token(details), request)


@pytest.fixture(scope="module")
def stub(channel):
    """Calls with the right token."""
    return pb_grpc.DecodingStub(grpc.intercept_channel(channel, WithToken(TOKEN)))


# ---- autoscaling (first: it starts from one replica) -----------------------------------------------------------------

def base_model(stub) -> pb.ModelInfo:
    return stub.ListModels(pb.ListModelsRequest(), timeout=30).models[0]


def wait_for(stub, condition, timeout: float) -> float:
    """Seconds until ListModels' base model satisfies `condition`."""
    begun = time.monotonic()
    while not condition(model := base_model(stub)):
        assert time.monotonic() - begun < timeout, f"{len(model.replicas)} replicas, {model.running_requests} running"
        time.sleep(1)
    return time.monotonic() - begun


class Streams:
    """Long greedy streams kept open on their own threads until `cancel()`."""

    def __init__(self, stub, count: int):
        request = pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="Tell me a long story.")],
                                     sampling=pb.SamplingParams(max_tokens=1500, temperature=0, ignore_eos=True))
        self.calls = [stub.GenerateStream(request, timeout=600) for _ in range(count)]
        self.threads = [threading.Thread(target=self._drain, args=(call,)) for call in self.calls]
        for thread in self.threads:
            thread.start()

    @staticmethod
    def _drain(call) -> None:
        try:
            for _ in call:
                pass
        except grpc.RpcError:
            pass

    def cancel(self) -> None:
        for call in self.calls:
            call.cancel()
        for thread in self.threads:
            thread.join(30)


def test_a_bounded_load_scales_the_group_to_two_replicas_and_back_to_one(channel, stub):
    def client(token: str):
        return pb_grpc.DecodingStub(grpc.intercept_channel(channel, WithToken(token)))

    assert len(base_model(stub).replicas) == 1
    # 6 in flight (three clients: 2 each is the per-token limit), a target of 2 a replica: Serve wants 3, at most 2.
    first = [Streams(client(token), 2) for token in TOKENS[:3]]
    try:
        up_s = wait_for(stub, lambda m: len(m.replicas) == 2, timeout=180)
        second = Streams(client(TOKENS[3]), 2)  # routed to the new, idle replica
        try:
            # ListModels sums over both replicas: the 6 on the first and the 2 on the second.
            wait_for(stub, lambda m: m.running_requests == 8 and len(m.replicas) == 2, timeout=60)
        finally:
            second.cancel()
    finally:
        for streams in first:
            streams.cancel()
    down_s = wait_for(stub, lambda m: len(m.replicas) == 1 and m.running_requests == 0, timeout=180)
    print(f"scaled up in {up_s:.0f} s under load, back down in {down_s:.0f} s after it")


def test_the_right_token_over_tls_is_served(channel):
    stub = pb_grpc.DecodingStub(channel)
    response = stub.Generate(QUESTION, metadata=bearer(TOKEN), timeout=120)
    assert "Paris" in response.text
    streamed = "".join(m.text for m in stub.GenerateStream(QUESTION, metadata=bearer("another-token"), timeout=120))
    assert streamed == response.text
    assert stub.ListModels(pb.ListModelsRequest(), metadata=(("authorization", f"bearer {TOKEN}"),),
                           timeout=30).models


@pytest.mark.parametrize("metadata, message", [(None, MISSING_TOKEN), (bearer("wrong"), WRONG_TOKEN),
                                               ((("authorization", TOKEN),), MISSING_TOKEN)])
def test_no_token_or_a_wrong_one_is_unauthenticated_on_every_rpc(channel, server, metadata, message):
    stub = pb_grpc.DecodingStub(channel)
    calls = {
        "Generate": lambda: stub.Generate(QUESTION, metadata=metadata, timeout=30),
        "GenerateStream": lambda: list(stub.GenerateStream(QUESTION, metadata=metadata, timeout=30)),
        "Rerank": lambda: stub.Rerank(pb.RerankRequest(query="q", passages=["a", "b"]), metadata=metadata,
                                      timeout=30),
        "ListModels": lambda: stub.ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=30),
    }
    for name, call in calls.items():
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert (info.value.code(), info.value.details()) == (grpc.StatusCode.UNAUTHENTICATED, message), name
    assert "refused: UNAUTHENTICATED" in wait_for_log_line(server, "/chorus.v1.Decoding/ListModels refused")


def test_health_and_reflection_answer_without_a_token(channel):
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    answer = next(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                 timeout=10))
    assert "chorus.v1.Decoding" in {s.name for s in answer.list_services_response.service}


def test_a_client_without_tls_or_trusting_another_ca_cannot_connect(server, tmp_path):
    other, _ = self_signed_certificate(tmp_path)  # a certificate for the same names, that the server does not have
    channels = {"plaintext": grpc.insecure_channel(server.address),
                "another CA": grpc.secure_channel(server.address, grpc.ssl_channel_credentials(other.read_bytes()))}
    for name, channel in channels.items():
        with channel:
            stub = pb_grpc.DecodingStub(channel)
            code = status_of(lambda: stub.Generate(QUESTION, metadata=bearer(TOKEN), timeout=10))
            assert code == grpc.StatusCode.UNAVAILABLE, name


def test_the_health_port_answers_health_alone_in_the_clear(server):
    with grpc.insecure_channel(server.health_address) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        code = status_of(lambda: pb_grpc.DecodingStub(channel).Generate(QUESTION, metadata=bearer(TOKEN), timeout=10))
        assert code == grpc.StatusCode.UNIMPLEMENTED


def test_the_cli_connects_with_tls_ca_and_a_token(server, certificate):
    ca = self_signed_certificate()[0]
    command = [sys.executable, "-m", "chorus.cli", "generate", "--address", server.address, "--tls-ca", str(ca),
               "--chat", "What is the capital of France?", "--temperature", "0", "--max-tokens", "8"]
    environment = {k: v for k, v in os.environ.items() if k != "CHORUS_TOKEN"}
    with_flag = subprocess.run(command + ["--token", TOKEN], cwd=ROOT, env=environment, capture_output=True,
                               text=True, timeout=120)
    assert with_flag.returncode == 0 and "Paris" in with_flag.stdout, with_flag.stderr
    from_env = subprocess.run(command, cwd=ROOT, env={**environment, "CHORUS_TOKEN": TOKEN}, capture_output=True,
                              text=True, timeout=120)
    assert from_env.stdout == with_flag.stdout, from_env.stderr
    without = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=120)
    assert without.returncode == 1 and "UNAUTHENTICATED" in without.stderr
    assert f"--tls-ca {ca}" in server.log(), "the ready line tells clients how to connect"


def test_calls_in_flight_are_limited_per_token(channel):
    stub = pb_grpc.DecodingStub(channel)
    long = pb.GenerateRequest(prompt="Once upon a time", sampling=pb.SamplingParams(max_tokens=400, ignore_eos=True))
    held = [stub.GenerateStream(long, metadata=bearer(TOKEN), timeout=120) for _ in range(2)]
    try:
        for stream in held:
            next(stream)  # both in flight
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(QUESTION, metadata=bearer(TOKEN), timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "frontend.limits.max_rpcs_per_client" in info.value.details()
        assert stub.Generate(QUESTION, metadata=bearer("another-token"), timeout=60).text, "another client is served"
        held[0].cancel()
        deadline = time.monotonic() + 20
        while status_of(lambda: stub.Generate(QUESTION, metadata=bearer(TOKEN), timeout=60)) != grpc.StatusCode.OK:
            assert time.monotonic() < deadline, "the cancelled call's place was not given back"
            time.sleep(0.2)
    finally:
        for stream in held:
            stream.cancel()
