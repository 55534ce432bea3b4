"""Chorus on a real two-node Ray cluster on this machine (bench/cluster.py: `ray start --head` on 127.0.0.2 and a
second node joining it on 127.0.0.3, one CPU each), the app deployed onto it with `chorus serve --address`, and a
front end and a SmolLM2 group replica on each node (`max_replicas_per_node: 1`). Balancing, a replica killed under
load, the second node's raylet killed under load, and a graceful drain on SIGTERM (last: it stops the server)."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.cluster import HEAD, WORKER, LocalRayCluster
from chorus.v1 import decoding_pb2 as pb
from chorus.v1 import decoding_pb2_grpc as pb_grpc
from tests.integration.conftest import ROOT, Server, wait_for_log_line

pytestmark = pytest.mark.integration


def CONFIG(folder: Path) -> str:  # noqa: N802
    """deploy/local.yaml with a front end per node on its node's address and a group replica per node (one torch
    thread each)."""
    raw = yaml.safe_load((ROOT / "deploy" / "local.yaml").read_text())
    app = raw["applications"][0]
    app["args"]["frontend"]["host"] = "node-ip"
    app["args"]["groups"]["smollm2"]["torch_threads"] = 1
    for deployment in app["deployments"]:
        deployment.update(num_replicas=2, max_replicas_per_node=1)
    path = folder / "scale-out.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = LocalRayCluster(tmp_path_factory.mktemp("ray"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def server(cluster, tmp_path_factory):
    server = Server(CONFIG(tmp_path_factory.mktemp("deploy")), args=("--address", cluster.address),
                    env=cluster.env, host=HEAD)
    try:
        server.wait_serving()
        yield server
    finally:
        server.stop()


def worker_address(server) -> str:
    return f"{WORKER}:{server.port}"


def chat(max_tokens: int, request_id: str = "") -> pb.GenerateRequest:
    return pb.GenerateRequest(request_id=request_id,
                              messages=[pb.ChatMessage(role="user", content="Tell me a story about a lighthouse.")],
                              sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))


def replicas(stub) -> list[str]:
    return list(stub.ListModels(pb.ListModelsRequest(), timeout=30).models[0].replicas)


def replica_line(server, request_id: str) -> str:
    line = wait_for_log_line(server, f"request id={request_id} ")
    return re.search(r"replica=(\S+)", line).group(1)


class Load:
    """Requests in flight on their own threads: `streams` GenerateStream calls that have each received a token, and
    `unary` Generate calls sent meanwhile; `finish()` returns each call's status code and tokens received."""

    def __init__(self, stub, streams: int, unary: int, tag: str, max_tokens: int = 60, timeout: float = 90):
        self.results: dict[str, tuple[grpc.StatusCode, int]] = {}
        self.threads, started = [], []
        for i in range(streams):
            first = threading.Event()
            started.append(first)
            self._run(self._stream, stub, chat(max_tokens, f"{tag}-s{i}"), timeout, first)
        for i in range(unary):
            self._run(self._unary, stub, chat(max_tokens, f"{tag}-u{i}"), timeout, None)
        for first in started:
            assert first.wait(60), "a stream received no token"

    def _run(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args)
        thread.start()
        self.threads.append(thread)

    def _stream(self, stub, request, timeout, first) -> None:
        tokens = 0
        try:
            for message in stub.GenerateStream(request, timeout=timeout):
                tokens += len(message.token_ids)
                first.set()
            self.results[request.request_id] = (grpc.StatusCode.OK, tokens)
        except grpc.RpcError as error:
            self.results[request.request_id] = (error.code(), tokens)

    def _unary(self, stub, request, timeout, _) -> None:
        try:
            response = stub.Generate(request, timeout=timeout)
            self.results[request.request_id] = (grpc.StatusCode.OK, response.usage.completion_tokens)
        except grpc.RpcError as error:
            self.results[request.request_id] = (error.code(), 0)

    def finish(self, timeout: float = 120) -> dict[str, tuple[grpc.StatusCode, int]]:
        for thread in self.threads:
            thread.join(timeout)
            assert not thread.is_alive(), "a request hung past its deadline"
        return self.results


def test_a_front_end_and_a_group_replica_serve_on_each_node(server):
    for address in (server.address, worker_address(server)):
        with grpc.insecure_channel(address) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert check.status == health_pb2.HealthCheckResponse.SERVING, address
            # A front end is SERVING once it reaches a replica of every group; Serve tells its router of the others
            # soon after (a long poll), and ListModels lists those it reaches.
            deadline = time.monotonic() + 60
            while sorted(r.split("@")[1] for r in replicas(pb_grpc.DecodingStub(channel))) != [HEAD, WORKER]:
                assert time.monotonic() < deadline, (address, replicas(pb_grpc.DecodingStub(channel)))
                time.sleep(1)


def test_requests_are_balanced_over_the_replicas_on_both_nodes(server, stub):
    ids = [f"balance-{i}" for i in range(8)]
    futures = [stub.Generate.future(chat(16, request_id), timeout=120) for request_id in ids]
    assert all(f.result().usage.completion_tokens == 16 for f in futures)
    nodes = {replica_line(server, request_id).split("@")[1] for request_id in ids}
    assert nodes == {HEAD, WORKER}, nodes


def assert_no_request_failed_but_streams_cut_short(results: dict) -> None:
    """Unary calls all succeed (retried if their replica was lost); a stream either finishes or, if its replica was
    lost after it had received tokens, ends UNAVAILABLE; nothing is INTERNAL or hangs."""
    for request_id, (code, tokens) in results.items():
        if "-u" in request_id:
            assert (code, tokens) == (grpc.StatusCode.OK, 60), (request_id, code)
        else:
            assert code in (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE), (request_id, code)
            assert tokens > 0, request_id


def test_a_replica_killed_under_load_loses_no_unary_request_and_the_group_recovers(server, stub, cluster):
    before = replicas(stub)
    victim = next(r for r in before if r.endswith(f"@{WORKER}"))
    pids = cluster.group_replicas(WORKER)
    assert len(pids) == 1, pids
    load = Load(stub, streams=4, unary=6, tag="kill")
    os.kill(pids[0], signal.SIGKILL)
    after = [stub.Generate(chat(4), timeout=60).usage.completion_tokens for _ in range(4)]
    results = load.finish()
    assert after == [4] * 4
    assert_no_request_failed_but_streams_cut_short(results)
    retried = [request_id for request_id in results if f"request {request_id}: the replica {victim}" in server.log()]
    cut = [request_id for request_id, (code, _) in results.items() if code == grpc.StatusCode.UNAVAILABLE]
    assert retried or cut, "no request was on the killed replica"
    assert "INTERNAL" not in server.log()
    deadline = time.monotonic() + 180  # Serve starts a new replica on the worker node; it loads the model
    while len(now := replicas(stub)) < 2 or victim in now:
        assert time.monotonic() < deadline, now
        time.sleep(2)


def test_the_second_node_lost_under_load_leaves_the_head_serving(server, stub, cluster):
    load = Load(stub, streams=4, unary=6, tag="node")
    os.kill(cluster.raylet(WORKER), signal.SIGKILL)
    after = [stub.Generate(chat(4), timeout=60).usage.completion_tokens for _ in range(4)]
    results = load.finish()
    assert after == [4] * 4
    assert_no_request_failed_but_streams_cut_short(results)
    assert "INTERNAL" not in server.log()
    with grpc.insecure_channel(worker_address(server)) as channel:  # its front end went with the node
        with pytest.raises(grpc.RpcError) as info:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    deadline = time.monotonic() + 60
    while [r.split("@")[1] for r in replicas(stub)] != [HEAD]:
        assert time.monotonic() < deadline, replicas(stub)
        time.sleep(1)


def test_sigterm_drains_the_requests_in_flight_then_removes_only_the_app(server, stub, cluster):
    # Short answers: all five must end inside the drain's grace (15 s) on one CPU, with room for a slow machine.
    load = Load(stub, streams=2, unary=3, tag="drain", max_tokens=16)
    server.proc.send_signal(signal.SIGTERM)
    wait_for_log_line(server, "draining")
    refused = None
    deadline = time.monotonic() + 10
    while refused is None and time.monotonic() < deadline:  # once the front end stops accepting
        try:
            stub.Generate(chat(2), timeout=10)
        except grpc.RpcError as error:
            refused = error.code()
    results = load.finish()
    assert all(result == (grpc.StatusCode.OK, 16) for result in results.values()), results
    assert refused == grpc.StatusCode.UNAVAILABLE
    assert server.proc.wait(60) == 0, server.log()[-3000:]
    alive = cluster.processes().values()
    assert any("gcs_server" in args for args in alive), "the cluster went down with the app"
    assert not any("ServeReplica:chorus:" in args for args in alive), "the app's replicas were left running"
