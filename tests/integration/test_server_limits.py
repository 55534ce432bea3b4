"""The real server at its limits, on a deploy file made tight on purpose: one KV slot per model, one waiting request,
four concurrent RPCs, and a group with only an amateur guide and no refusal config. Queue and front-end limits,
strategies the config cannot serve, an engine that dies mid-request, and SIGTERM (last: it stops the server)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.cluster import descendants
from chorus.v1 import decoding_pb2 as pb
from tests.integration.conftest import ROOT, left_running, status_of, wait_for_load

pytestmark = pytest.mark.integration

MAX_CONCURRENT_RPCS = 4
STORY = "Tell me a very long story about a lighthouse keeper."


def CONFIG(folder: Path) -> str:  # noqa: N802  (the conftest's `server` fixture calls it for the deploy file)
    """deploy/local.yaml with max_batch_size 1, max_waiting 1, max_concurrent_rpcs 4, the amateur as the only guide
    and no refusal config."""
    raw = yaml.safe_load((ROOT / "deploy" / "local.yaml").read_text())
    args = raw["applications"][0]["args"]
    args["frontend"]["max_concurrent_rpcs"] = MAX_CONCURRENT_RPCS
    group = args["groups"]["smollm2"]
    group.update(max_batch_size=1, max_waiting=1, guides={"exit8": group["guides"]["exit8"]})
    del group["refusal"]
    path = folder / "limits.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def chat(max_tokens: int, question: str = STORY, request_id: str = "", **strategy) -> pb.GenerateRequest:
    return pb.GenerateRequest(request_id=request_id, messages=[pb.ChatMessage(role="user", content=question)],
                              sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
                              **strategy)


CD = dict(contrastive=pb.ContrastiveDecoding())


def test_a_full_queue_is_resource_exhausted_and_freed_slots_and_queue_places_are_reused(stub):
    # A holds the only slot of the base (its amateur, the base's early exit on the same prompt, is read from the
    # base's forward; long enough to outlast this test on a fast machine); ListModels counts it as running.
    holder = stub.GenerateStream(chat(1800, **CD), timeout=120)
    next(holder)
    wait_for_load(stub, (1, 0))
    # B waits for the slot until its deadline passes: it takes the one queue place meanwhile, so C is refused.
    expiring = stub.Generate.future(chat(4, **CD), timeout=3)
    wait_for_load(stub, (1, 1), timeout=3)
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(chat(4), timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_waiting" in info.value.details()
    assert expiring.exception(timeout=30).code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The expired request gave its queue place back: D queues, and gets the slots once A is cancelled.
    wait_for_load(stub, (1, 0))
    queued = stub.Generate.future(chat(4, **CD), timeout=120)
    wait_for_load(stub, (1, 1))
    holder.cancel()
    assert queued.result().report.contrastive.steps == 4
    wait_for_load(stub, (0, 0))
    # A strategy request whose deadline passes while it holds the slots gives them back too.
    assert status_of(lambda: stub.Generate(chat(1800, **CD), timeout=3)) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert stub.Generate(chat(4, **CD), timeout=60).report.contrastive.steps == 4


def test_more_rpcs_than_max_concurrent_rpcs_are_resource_exhausted(channel, stub):
    health = health_pb2_grpc.HealthStub(channel)
    watches = [health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
               for _ in range(MAX_CONCURRENT_RPCS)]
    try:
        for watch in watches:  # each is open on the server (it sent the current status)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        for call in (lambda: stub.Generate(chat(2), timeout=30),
                     lambda: stub.ListModels(pb.ListModelsRequest(), timeout=30)):
            assert status_of(call) == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        for watch in watches:
            watch.cancel()
    deadline = time.monotonic() + 10
    while True:  # the server frees the places of the cancelled watches
        try:
            assert stub.Generate(chat(2), timeout=30).usage.completion_tokens == 2
            break
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.mark.parametrize("strategy, says", [
    (dict(logit_fusion=pb.LogitFusion()), "small_base"),
    (dict(contrastive=pb.ContrastiveDecoding(mode=pb.ContrastiveDecoding.MODE_STEER,
                                             contrast_context=pb.Context(prompt="Be brief."))), "small_base"),
    (dict(refusal_steering=pb.RefusalSteering()), "refusal_prefixes"),
    # USCD runs the base on the prompt and on the lame prompt: two slots, and the group has one.
    (dict(contrastive=pb.ContrastiveDecoding(mode=pb.ContrastiveDecoding.MODE_USCD,
                                             contrast_context=pb.Context(prompt="Answer."))), "max_batch_size"),
])
def test_a_strategy_the_config_cannot_serve_is_failed_precondition_saying_what_to_declare(stub, strategy, says):
    for call in (stub.Generate, lambda r, timeout: list(stub.GenerateStream(r, timeout=timeout))):
        with pytest.raises(grpc.RpcError) as info:
            call(chat(2, **strategy), timeout=30)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, info.value.details()
        assert says in info.value.details()


def test_list_models_says_why_and_request_prefixes_make_refusal_steering_servable(stub):
    support = {s.strategy: s for s in stub.ListModels(pb.ListModelsRequest(), timeout=30).models[0].strategies}
    assert support["contrastive"].available and not support["contrastive"].reason
    assert not support["logit_fusion"].available and "small_base" in support["logit_fusion"].reason
    assert not support["refusal_steering"].available and "refusal" in support["refusal_steering"].reason
    # No refusal config, but the request brings its own prefixes (which replace the config's).
    steering = pb.RefusalSteering(mode=pb.RefusalSteering.MODE_THRESHOLD, threshold=0.0, refusal_prefixes=[
        pb.RefusalPrefix(category="apology", text="Sorry")])
    response = stub.Generate(chat(3, "What is 2 + 2?", refusal_steering=steering), timeout=60)
    report = response.report.refusal_steering
    assert (report.decision, report.category, list(report.probabilities)) == ("refuse", "apology", ["apology"])
    assert response.text.startswith("Sorry")


def test_the_only_replica_dying_ends_a_stream_that_had_tokens_and_a_queued_request_waits_for_its_successor(
        stub, server):
    replicas = [pid for pid, args in descendants(server.proc.pid).items() if "ServeReplica:chorus:group-" in args]
    assert len(replicas) == 1, replicas
    stream = stub.GenerateStream(chat(400, request_id="dies-streaming"), timeout=120)
    next(stream)
    queued = stub.Generate.future(chat(2, request_id="dies-queued"), timeout=300)  # no output yet: the one queue place
    wait_for_load(stub, (1, 1))
    os.kill(replicas[0], signal.SIGKILL)  # an engine crash, an OOM kill
    code = status_of(lambda: list(stream))
    assert code == grpc.StatusCode.UNAVAILABLE, f"{code}: {server.log()[-2000:]}"
    # Serve starts a new replica; the queued request is sent to it once it is up (the model loads again).
    assert queued.result().usage.completion_tokens == 2
    assert "request dies-queued: the replica" in server.log() and "request dies-streaming: " not in server.log()


def test_sigterm_exits_0_and_stops_every_process_the_server_started(server):
    started = descendants(server.proc.pid)
    assert any("raylet" in args for args in started.values()), started
    code = server.stop(signal.SIGTERM, timeout=90)
    left = left_running(started)
    for pid in left:  # do not leave them to the next test module
        os.kill(pid, signal.SIGKILL)
    assert (code, left) == (0, {}), f"exit code {code}, processes left behind {left}:\n{server.log()[-3000:]}"
