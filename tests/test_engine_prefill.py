"""Chunked prefill on the transformers engine: newcomers' prompts are fed in chunks within a per-step token budget,
batched together, while the running sequences keep decoding; greedy outputs equal the naive full recompute."""

import asyncio

import pytest

from server.config import GroupSpec, ModelSpec
from server.engines.transformers_engine import TransformersEngine
from tests.conftest import EMBEDDED
from tests.test_engine import chat, collect
from tests.test_runner import naive_greedy

STEP_TOKENS = 24
LONG = ("Here is a long story to summarise. " + " ".join(
    f"On day {i} the traveller walked to a new village, met a baker, bought bread and wrote a letter home."
    for i in range(12)) + " Summarise the story in one sentence.")


@pytest.fixture(scope="module")
def engine(model_path):
    engine = TransformersEngine(ModelSpec("smollm2", EMBEDDED, max_model_len=1024),
                                GroupSpec("g", "smollm2", max_batch_size=4, max_step_tokens=STEP_TOKENS))
    yield engine
    engine.shutdown()


def prompt_ids(engine, question):
    text = engine.tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                                tokenize=False)
    return engine.tokenizer.encode(text, add_special_tokens=False)


def test_a_long_prompt_arriving_mid_decode_is_chunked_and_both_equal_the_naive_reference(engine, hf_model):
    short_q, long_q = "Name three primary colors.", LONG
    assert len(prompt_ids(engine, long_q)) > 10 * STEP_TOKENS, "the long prompt must take many steps to prefill"

    async def run():
        order = []  # which request each delivered chunk belonged to, in arrival order

        async def follow(name, request):
            tokens = []
            async for chunk in engine.generate(request):
                order.append(name)
                tokens.extend(chunk.token_ids)
            return tokens

        short = asyncio.ensure_future(follow("short", chat(short_q, temperature=0, max_tokens=32, ignore_eos=True)))
        while order.count("short") < 4:
            await asyncio.sleep(0.01)
        long = asyncio.ensure_future(follow("long", chat(long_q, temperature=0, max_tokens=6, ignore_eos=True)))
        return await short, await long, order

    short, long, order = asyncio.run(run())
    # The short request kept decoding, one token a step, while the long prompt was fed in budget-sized chunks.
    during_prefill = order[order.index("short", 4):order.index("long")].count("short")
    assert during_prefill >= len(prompt_ids(engine, long_q)) // STEP_TOKENS - 2, order
    assert short == naive_greedy(hf_model, prompt_ids(engine, short_q), 32)
    assert long == naive_greedy(hf_model, prompt_ids(engine, long_q), 6)


def test_newcomers_prefilled_together_equal_their_solo_runs(engine):
    questions = ["What is 2 + 2?", LONG, "Who wrote Hamlet?", "Translate 'cat' to French."]
    requests = [chat(q, temperature=0, max_tokens=10) for q in questions]
    solo = [asyncio.run(collect(engine, r))[1] for r in requests]

    async def together():
        return await asyncio.gather(*(collect(engine, r) for r in requests))

    assert [ids for _, ids, _ in asyncio.run(together())] == solo
