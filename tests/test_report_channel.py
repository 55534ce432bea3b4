"""Reports of fused requests cross from vLLM's engine-core process as one small record per step: a plan rebuilt
from its spec and the records gives the report the fusing plan gives, and the channel delivers them."""

import asyncio
import pickle
import threading

import pytest
import torch

from decoding.plans import ContrastivePlan, LogitFusionPlan, PlanSpec, RefusalPlan, StreamSpec
from decoding.refusal import RefusalMarkers, RefusalParams
from decoding.strategies import ContrastiveParams, LogitFusionParams, RefusalSteeringParams
from server.engines.vllm_fusion import ReportChannel, _zmq_sink
from server.lockstep.host import StepRecords

V = 12
MARKERS = RefusalMarkers(categories={"sorry": ((3, 4),)}, respond_id=None)
SPECS = {
    "uscd": PlanSpec(plan=ContrastivePlan, params=ContrastiveParams(mode="uscd", uncertainty_threshold=0.08),
                     streams=(StreamSpec("m", (1,)),), guide="m"),
    "fusion": PlanSpec(plan=LogitFusionPlan, params=LogitFusionParams(report_weights=True),
                       streams=(StreamSpec("s", (1,)), StreamSpec("e1", (1,)), StreamSpec("e2", (1,))),
                       guide="s", experts=("e1", "e2")),
    "refusal": PlanSpec(plan=RefusalPlan, params=RefusalSteeringParams(RefusalParams(mode="threshold", threshold=0.0)),
                        markers=MARKERS),
}


def fused_plan(spec: PlanSpec, steps: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    plan = spec.build()
    for position in range(steps):
        base = torch.randn(V, generator=generator) * (1 + position % 3)
        plan.step(base, torch.randn(len(spec.streams), V, generator=generator), position)
    return plan


@pytest.mark.parametrize("name", list(SPECS))
def test_a_plan_replayed_from_its_records_gives_the_same_report(name):
    spec = SPECS[name]
    plan = fused_plan(spec, steps=7)
    records = StepRecords()
    for position in range(7):
        records.add(position, pickle.loads(pickle.dumps(plan.record(position))), {"m": position + 1})
    assert records.steps == 7 and records.forward_passes == {"m": 7}
    assert records.report(pickle.loads(pickle.dumps(spec))) == plan.report()
    if name == "uscd":
        assert 0 < plan.report().contrasted_steps < 7, "the threshold was chosen to mix certain and uncertain steps"
    if name == "refusal":
        rebuilt = spec.build().replay(records.records)
        assert [rebuilt.forced_token(p) for p in range(3)] == [3, 4, None] == [plan.forced_token(p) for p in range(3)]


def test_a_refused_position_fused_again_replaces_its_record():
    records = StepRecords()
    records.add(0, True, {})
    records.add(0, False, {})
    records.add(1, True, {})
    assert records.steps == 2 and records.report(SPECS["uscd"]).contrasted_steps == 1


def test_the_channel_delivers_records_sent_from_another_thread_and_closes():
    channel = ReportChannel()
    spec = SPECS["fusion"]
    plan = fused_plan(spec, steps=5)

    async def run():
        channel.open("a")
        sink = _zmq_sink(channel.address)

        def send():
            sink("stray", 0, True, {})  # a key nobody opened is dropped
            for position in range(5):
                sink("a", position, plan.record(position), {"s": position + 1})

        threading.Thread(target=send).start()
        records = await asyncio.wait_for(channel.collect("a", 5), timeout=60)
        channel.discard("a")
        return records

    records = asyncio.run(run())
    assert records.report(spec) == plan.report() and records.forward_passes == {"s": 5}
    channel.close()
    assert channel._context.closed
