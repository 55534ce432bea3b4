"""Autoscaling from the deploy file: the model group with Serve's `autoscaling_config` (1 to 2 replicas, a target of
2 requests in flight per replica) on the real server. A bounded load scales it to 2 replicas, ListModels sums the
requests over both, and with the load gone it scales back to 1."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import pytest
import yaml

from chorus.v1 import decoding_pb2 as pb
from tests.integration.conftest import ROOT

pytestmark = pytest.mark.integration


def CONFIG(folder: Path) -> str:  # noqa: N802  (the conftest's `server` fixture calls it for the deploy file)
    """deploy/local.yaml with the group autoscaled between 1 and 2 replicas of one core each, reacting within
    seconds (Serve's defaults wait 30 s to scale up and 10 min to scale down)."""
    raw = yaml.safe_load((ROOT / "deploy" / "local.yaml").read_text())
    app = raw["applications"][0]
    app["args"]["groups"]["smollm2"]["torch_threads"] = 1
    group = next(d for d in app["deployments"] if d["name"].startswith("group-"))
    del group["num_replicas"]
    group["autoscaling_config"] = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
                                   "upscale_delay_s": 1, "downscale_delay_s": 5, "look_back_period_s": 2}
    path = folder / "autoscaling.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


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


def test_a_bounded_load_scales_the_group_to_two_replicas_and_back_to_one(stub):
    assert len(base_model(stub).replicas) == 1
    first = Streams(stub, 6)  # 6 in flight, target 2 a replica: Serve wants 3, at most 2
    try:
        up_s = wait_for(stub, lambda m: len(m.replicas) == 2, timeout=180)
        second = Streams(stub, 2)  # routed to the new, idle replica
        try:
            # ListModels sums over both replicas: the 6 on the first and the 2 on the second.
            wait_for(stub, lambda m: m.running_requests == 8 and len(m.replicas) == 2, timeout=60)
        finally:
            second.cancel()
    finally:
        first.cancel()
    down_s = wait_for(stub, lambda m: len(m.replicas) == 1 and m.running_requests == 0, timeout=180)
    print(f"scaled up in {up_s:.0f} s under load, back down in {down_s:.0f} s after it")
