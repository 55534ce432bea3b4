"""The whole-sequence building blocks of the transformers engine (sample_n, score, loglik) on the real SmolLM2
weights, against naive references: a plain generate, and a full forward of the model without cache or batching.
(The vLLM engine's blocks are checked the same way in tests/test_vllm_engine.py.)"""

import asyncio
import time

import pytest
import torch

from decoding.chat import ChatMessage
from decoding.errors import InvalidArgument
from decoding.sampling import SamplingParams
from server.config import GroupSpec, ModelSpec
from server.engines.base import GenerationRequest
from server.engines.transformers_engine import TransformersEngine
from server.errors import DeadlineExceeded, FailedPrecondition
from tests.conftest import EMBEDDED
from tests.test_engine import QUESTIONS, chat, collect

SLOTS = 8


@pytest.fixture(scope="module")
def engine(model_path):
    engine = TransformersEngine(ModelSpec("smollm2", EMBEDDED, max_model_len=512),
                                GroupSpec("g", "smollm2", max_batch_size=SLOTS))
    yield engine
    engine.shutdown()


def runner(engine):
    return engine._host.runners["smollm2"]


def chat_ids(tokenizer, question: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def full_forward_log_probs(hf_model, ids: list[int]) -> torch.Tensor:
    """log-softmax of every position's next-token logits, one plain forward: [len(ids), V]."""
    with torch.inference_mode():
        return torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].float(), -1)


def test_sample_n_equals_n_generates_with_consecutive_seeds(engine):
    """Sample i of a seeded sample_n is the plain sample with seed + i: the forked KV rows equal a prefill."""
    request = chat("Give me a random fruit name.", temperature=1.0, seed=11, max_tokens=10)
    samples = asyncio.run(engine.sample_n(request, 4))
    assert len(samples) == 4 and all(s.seed == 11 for s in samples)
    singles = [asyncio.run(collect(engine, chat("Give me a random fruit name.", temperature=1.0, seed=11 + i,
                                                max_tokens=10)))[1] for i in range(4)]
    assert [s.token_ids for s in samples] == singles
    assert len({tuple(s.token_ids) for s in samples}) > 1, "4 samples at temperature 1 should not all agree"
    # One prefill: the first sample's forward passes count it, the forks' do not.
    assert [s.usage.forward_passes["smollm2"] for s in samples] == [
        len(s.token_ids) - (0 if i == 0 else 1) for i, s in enumerate(samples)]


def test_sample_n_is_reproducible_whatever_shares_the_batch(engine):
    request = chat("Write a word.", temperature=1.0, seed=5, max_tokens=8)
    alone = asyncio.run(engine.sample_n(request, 3))

    async def crowded():
        others = [collect(engine, chat(q, temperature=1.0, max_tokens=12)) for q in QUESTIONS[:4]]
        results = await asyncio.gather(engine.sample_n(request, 3), *others)
        return results[0]

    assert [s.token_ids for s in asyncio.run(crowded())] == [s.token_ids for s in alone]


def test_sample_n_checks_n_against_the_slots(engine):
    with pytest.raises(InvalidArgument, match="n: must be >= 1"):
        asyncio.run(engine.sample_n(chat("Hi", max_tokens=2), 0))
    with pytest.raises(FailedPrecondition, match=f"sample_n with n = {SLOTS + 1}"):
        asyncio.run(engine.sample_n(chat("Hi", max_tokens=2), SLOTS + 1))


def test_score_equals_the_log_softmax_of_a_full_forward(engine, hf_model):
    candidates = [engine.tokenizer.convert_tokens_to_ids(c) for c in "ABCD"] + [40000, 45000]
    requests = [chat(q, max_tokens=1) for q in QUESTIONS[:5]]

    async def concurrently():  # batched into one forward of five left-padded prompts
        return await asyncio.gather(*(engine.score(r, candidates) for r in requests))

    for request, got in zip(requests, asyncio.run(concurrently())):
        prompt = chat_ids(engine.tokenizer, request.messages[0].content)
        want = full_forward_log_probs(hf_model, prompt)[-1, candidates]
        assert got == pytest.approx(want.tolist(), abs=1e-4)


def test_score_along_reads_every_position_of_prompt_and_continuation(engine, hf_model):
    """Each position's ids equal the full forward of prompt + continuation there; a position may read nothing; the
    calls are batched with plain scores (rows of different lengths and kept positions; how they share forwards
    depends on arrival, so the plain score equals the same read to float32 noise, not bit for bit)."""
    letters = [engine.tokenizer.convert_tokens_to_ids(c) for c in "ABC"]
    continuation = letters[:2]
    reads = [letters, [], [45000, *letters]]
    requests = [chat(q, max_tokens=1) for q in QUESTIONS[:3]]

    async def concurrently():
        return await asyncio.gather(*(engine.score_along(r, continuation, reads) for r in requests),
                                    engine.score(requests[0], letters))

    *along, plain = asyncio.run(concurrently())
    for request, got in zip(requests, along):
        prompt = chat_ids(engine.tokenizer, request.messages[0].content)
        log_probs = full_forward_log_probs(hf_model, prompt + continuation)[len(prompt) - 1:]
        assert len(got) == len(continuation) + 1
        for j, ids in enumerate(reads):
            assert got[j] == pytest.approx(log_probs[j, ids].tolist(), abs=1e-4), j
    assert plain == pytest.approx(along[0][0], abs=1e-4)
    with pytest.raises(InvalidArgument, match="candidate_ids: one list of ids per position: 2 for a continuation of 1"):
        asyncio.run(engine.score_along(requests[0], continuation[:1], [letters]))
    with pytest.raises(InvalidArgument, match="candidate_ids: give at least one token id"):
        asyncio.run(engine.score_along(requests[0], continuation[:1], [[], []]))


def test_loglik_sums_to_the_sequence_log_likelihood(engine, hf_model):
    request = chat(QUESTIONS[0], max_tokens=1)
    prompt = chat_ids(engine.tokenizer, QUESTIONS[0])
    continuations = [engine.tokenizer.encode(t, add_special_tokens=False)
                     for t in ("The capital of France is Paris.", "Bananas.", "I think it is Lyon, maybe.")]

    async def concurrently():
        return await asyncio.gather(*(engine.loglik(request, c) for c in continuations))

    for continuation, got in zip(continuations, asyncio.run(concurrently())):
        log_probs = full_forward_log_probs(hf_model, prompt + continuation)
        want = log_probs[len(prompt) - 1:-1].gather(1, torch.tensor(continuation)[:, None])[:, 0]
        assert len(got) == len(continuation)
        assert got == pytest.approx(want.tolist(), abs=1e-4)
        assert sum(got) == pytest.approx(float(want.sum()), abs=1e-3)
    likely, unlikely = asyncio.run(concurrently())[:2]
    assert sum(likely) / len(likely) > sum(unlikely) / len(unlikely)


def test_blocks_refuse_bad_token_ids_and_honour_deadlines(engine):
    with pytest.raises(InvalidArgument, match="candidate_ids: token ids \\[10000000\\]"):
        asyncio.run(engine.score(chat("Hi", max_tokens=1), [10_000_000]))
    with pytest.raises(InvalidArgument, match="continuation: give at least one token id"):
        asyncio.run(engine.loglik(chat("Hi", max_tokens=1), []))
    late = GenerationRequest(request_id="late", messages=(ChatMessage("user", "Hi"),),
                             sampling=SamplingParams(max_tokens=1), deadline=time.time() - 1)
    with pytest.raises(DeadlineExceeded):
        asyncio.run(engine.score(late, [1, 2]))
    long = GenerationRequest(request_id="long", messages=(ChatMessage("user", "Count to a thousand."),),
                             sampling=SamplingParams(max_tokens=400, temperature=1.0, ignore_eos=True),
                             deadline=time.time() + 2)
    with pytest.raises(DeadlineExceeded):
        asyncio.run(engine.sample_n(long, 3))
    assert_idle_with_free_slots(engine)


def test_a_cancelled_sample_n_frees_its_family_mid_batch(engine):
    async def cancel_midway():
        long = chat("Count to a thousand.", temperature=1.0, max_tokens=400, ignore_eos=True)
        plain = asyncio.ensure_future(collect(engine, chat(QUESTIONS[1], temperature=0, max_tokens=16)))
        task = asyncio.ensure_future(engine.sample_n(long, 4))
        for _ in range(600):  # until all five run (plain + a family of four)
            if engine.load().running == 5:
                break
            await asyncio.sleep(0.05)
        load = engine.load()
        assert load.running == 5
        # five sequences' tokens in the base model's slot cache
        cached = sum(slot.length for slot in runner(engine).live)
        assert cached >= 5 and load.kv_cache_usage == pytest.approx(
            cached / (SLOTS * runner(engine).max_len), rel=0.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await plain

    text, tokens, last = asyncio.run(cancel_midway())
    assert last.finish_reason in ("stop", "length") and tokens == asyncio.run(
        collect(engine, chat(QUESTIONS[1], temperature=0, max_tokens=16)))[1]
    assert_idle_with_free_slots(engine)


def assert_idle_with_free_slots(engine, timeout: float = 10.0) -> None:
    """Within `timeout` the engine runs nothing, every KV slot is free again and its KV cache usage is back to 0
    (cancelled work was dropped at the next step, not decoded to its end: the long requests above would take
    minutes)."""
    stop = time.monotonic() + timeout
    while time.monotonic() < stop:
        if engine.load() == type(engine.load())(running=0, waiting=0, kv_cache_usage=0.0) and \
                runner(engine).free_slots == SLOTS:
            return
        time.sleep(0.1)
    raise AssertionError(f"load {engine.load()}, free slots {runner(engine).free_slots} of {SLOTS}")


def test_sample_n_holds_its_forks_slots_while_it_prefills(engine):
    """A family of 6 admitted before 4 plain requests on 8 slots: the plain ones wait for slots instead of taking
    the ones the forks open when the family's prefill completes (they once did, and the engine thread failed)."""
    async def go():
        family = engine.sample_n(chat("Name a fruit.", temperature=1.0, seed=1, max_tokens=6), 6)
        plain = [collect(engine, chat(q, temperature=0, max_tokens=6)) for q in QUESTIONS[:4]]
        return await asyncio.gather(family, *plain)

    samples, *plain = asyncio.run(go())
    assert len(samples) == 6 and all(len(s.token_ids) == 6 for s in samples)
    assert [len(ids) for _, ids, _ in plain] == [6] * 4
