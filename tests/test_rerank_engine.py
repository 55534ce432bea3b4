"""Listwise reranking's program (server/strategies/rerank.py) on the transformers engine with the real SmolLM2 weights:
first-token rankings against the raw logits of a plain forward, the whole sliding window against a naive recompute,
concurrent queries against solo runs, permutation self-consistency against its parts, MODE_GENERATE against a
plain greedy generation, the context fit, limits and deadlines; identifier spellings of both embedded tokenizers.
(Over gRPC on both engines: tests/integration/rerank_checks.py.)"""

import asyncio
import dataclasses
import random
import time

import pytest
import torch

from decoding import rerank as rr
from decoding.errors import InvalidArgument
from server.config import GroupSpec, GuideSpec, ModelSpec, RerankSpec
from server.engines.prompts import load_tokenizer
from server.engines import transformers_engine
from server.engines.transformers_engine import TransformersEngine
from server.errors import DeadlineExceeded
from server.models import resolve_model_path
from server.strategies.rerank import Reranker, RerankJob, identifier_tokens
from tests.conftest import EMBEDDED

SYSTEM = "You rank search results."
GROUP = GroupSpec("g", "smollm2", max_batch_size=8, rerank=RerankSpec(max_passages=120, max_permutations=4),
                  guides={"ranker": GuideSpec("ranker", "smollm2", ("reranker",), system_prompt=SYSTEM)})
QUERY = "What is the capital of France?"
FACTS = ["Paris is the capital and largest city of France.", "Bananas are rich in potassium.",
         "The Eiffel Tower stands in Paris.", "Berlin is the capital of Germany.",
         "France is a country in Western Europe.", "Cats sleep for most of the day.",
         "Lyon is a large city in France.", "The Seine flows through Paris [B] and Rouen.",
         "Python is a programming language.", "Madrid is the capital of Spain."]


@pytest.fixture(scope="module")
def engine(model_path):
    engine = TransformersEngine(ModelSpec("smollm2", EMBEDDED, max_model_len=1024), GROUP)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def reranker(engine):
    return Reranker(engine, GROUP)


def rerank(reranker, passages, query=QUERY, deadline=None, **knobs):
    params = rr.RerankParams(query, tuple(passages), **knobs).validate()
    return asyncio.run(reranker.run(RerankJob("t", params, deadline)))


def reference_window(hf_model, tokenizer, query, passages, words=300):
    """A window's order from the raw logits of one plain forward of the prompt + "[" at the 26 letter tokens."""
    user = rr.user_prompt(query, [rr.clean_passage(p, words) for p in passages])
    text = tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
                                         add_generation_prompt=True, tokenize=False) + "["
    letters = [tokenizer.convert_tokens_to_ids(c) for c in rr.IDENTIFIERS[:len(passages)]]
    with torch.inference_mode():
        logits = hf_model(torch.tensor([tokenizer.encode(text)])).logits[0, -1].float()
    scores = logits[letters].tolist()
    return sorted(range(len(passages)), key=lambda i: (-scores[i], i)), scores


def test_the_identifiers_of_both_embedded_tokenizers(tokenizer):
    smol = identifier_tokens(tokenizer, "smollm2")
    bracket = tokenizer.convert_tokens_to_ids("[")
    assert smol.spellings == tuple((bracket, tokenizer.convert_tokens_to_ids(c)) for c in rr.IDENTIFIERS)
    qwen_tokenizer = load_tokenizer(resolve_model_path("embedded:qwen2.5-coder-0.5b-instruct"))
    qwen = identifier_tokens(qwen_tokenizer, "qwen")
    assert len(qwen.spellings) == 26
    split = [rr.IDENTIFIERS[i] for i, s in enumerate(qwen.spellings) if len(s) == 2]
    assert split == ["O", "Q"]  # "[A" … merged into one token, "[" + "O" and "[" + "Q" not
    assert [qwen_tokenizer.decode(list(s)) for s in qwen.spellings] == [f"[{c}" for c in rr.IDENTIFIERS]


def test_first_token_ranking_equals_the_raw_logits_of_a_plain_forward(reranker, hf_model, tokenizer):
    outcome = rerank(reranker, FACTS[:8])
    want, scores = reference_window(hf_model, tokenizer, QUERY, FACTS[:8])
    assert outcome.ranking == want
    assert min(abs(a - b) for a in scores for b in scores if a != b) > 1e-4  # no near-ties blur the comparison
    assert len(outcome.windows) == 1 and outcome.usage.forward_passes == {"smollm2": 1}
    window = outcome.windows[0]
    assert (window.start, window.end, window.passage_words, window.forward_passes) == (0, 8, 300, 1)


def test_merged_identifiers_are_read_from_one_forward_on_qwen():
    """Qwen2.5 merges "[A" … but spells "[" + "O": one forward of prompt + "[" gives both the merged identifiers'
    log-probs (after the prompt) and "O"'s (after "["); the order equals the one a plain forward computes."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path("embedded:qwen2.5-coder-0.5b-instruct")
    group = GroupSpec("q", "qwen", max_batch_size=2, rerank=RerankSpec(max_passages=20, max_permutations=1),
                      guides={"ranker": GuideSpec("ranker", "qwen", ("reranker",), system_prompt=SYSTEM)})
    engine = TransformersEngine(ModelSpec("qwen", path, max_model_len=1024), group)
    try:
        passages = [f"{FACTS[i % len(FACTS)]} ({i})" for i in range(16)]  # the 15th is [O]
        outcome = rerank(Reranker(engine, group), passages)
        tokenizer = engine.tokenizer
    finally:
        engine.shutdown()
    user = rr.user_prompt(QUERY, [rr.clean_passage(p, 300) for p in passages])
    text = tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
                                         add_generation_prompt=True, tokenize=False)
    prompt, bracket = tokenizer.encode(text), tokenizer.convert_tokens_to_ids("[")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.inference_mode():
        log_probs = torch.log_softmax(model(torch.tensor([prompt + [bracket]])).logits[0, -2:].float(), -1)
    scores = []
    for letter in rr.IDENTIFIERS[:16]:
        spelled = tokenizer.encode(f"{text}[{letter}")[len(prompt):]
        scores.append(float(log_probs[0, spelled[0]]) + (float(log_probs[1, spelled[1]]) if len(spelled) == 2 else 0))
    assert [len(tokenizer.encode(f"{text}[{c}")) - len(prompt) for c in "NO"] == [1, 2]
    assert outcome.ranking == sorted(range(16), key=lambda i: (-scores[i], i))
    assert min(abs(a - b) for a in scores for b in scores if a != b) > 1e-4
    assert outcome.usage.forward_passes == {"qwen": 1} and outcome.windows[0].forward_passes == 1


def test_the_sliding_window_equals_a_naive_recompute(reranker, hf_model, tokenizer):
    passages = [f"{i}: {FACTS[i % len(FACTS)].split()[0]}" for i in range(100)]  # short: 9 quick windows
    outcome = rerank(reranker, passages)
    order = list(range(100))
    for start, end in rr.window_schedule(100, 20, 10):
        window, _ = reference_window(hf_model, tokenizer, QUERY, [passages[i] for i in order[start:end]])
        order[start:end] = [order[start:end][i] for i in window]
    assert outcome.ranking == order
    assert [(w.start, w.end) for w in outcome.windows] == rr.window_schedule(100, 20, 10)
    assert outcome.usage.forward_passes == {"smollm2": 9} and all(w.forward_passes == 1 for w in outcome.windows)


def test_concurrent_queries_equal_their_solo_runs(reranker, monkeypatch):
    queries = [QUERY, "Which fruit has potassium?", "Where is the Eiffel Tower?"]
    lists = [[f"{FACTS[(i * 7 + q) % len(FACTS)]} ({i})" for i in range(30)] for q in range(3)]
    solo = [rerank(reranker, passages, query).ranking for query, passages in zip(queries, lists)]

    async def together():
        return await asyncio.gather(*(reranker.run(RerankJob(f"c{i}", rr.RerankParams(q, tuple(p)).validate()))
                                      for i, (q, p) in enumerate(zip(queries, lists))))
    assert [o.ranking for o in asyncio.run(together())] == solo
    monkeypatch.setattr(transformers_engine, "JOB_TOKENS", 600)  # one window a forward: batches split by length
    assert [o.ranking for o in asyncio.run(together())] == solo


def test_permutations_aggregate_the_rankings_of_the_shuffled_windows(reranker):
    passages = FACTS[:6]
    outcome = rerank(reranker, passages, permutations=3, seed=5)
    shown = rr.shuffles(6, 3, random.Random(5))
    rankings = []
    for order in shown:
        ranking = rerank(reranker, [passages[i] for i in order]).ranking
        rankings.append([order[i] for i in ranking])
    assert outcome.ranking == rr.kemeny(rankings, 6)
    assert outcome.usage.forward_passes == {"smollm2": 3}
    borda = rerank(reranker, passages, permutations=3, seed=5, aggregation="borda")
    assert borda.ranking == rr.borda(rankings, 6)


def test_generate_mode_parses_a_plain_greedy_generation(reranker, engine, hf_model, tokenizer):
    passages = FACTS[:4]
    outcome = rerank(reranker, passages, mode="generate")
    user = rr.user_prompt(QUERY, [rr.clean_passage(p, 300) for p in passages])
    text = tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
                                         add_generation_prompt=True, tokenize=False)
    prompt = torch.tensor([tokenizer.encode(text)])
    budget = len(tokenizer.encode(rr.ideal_answer(4))) + 8
    with torch.inference_mode():
        ids = hf_model.generate(prompt, max_new_tokens=budget, do_sample=False)[0, prompt.shape[1]:]
    written = tokenizer.decode(ids, skip_special_tokens=True)
    assert outcome.ranking == rr.parse_generated(written, 4), written
    assert outcome.usage.completion_tokens == outcome.windows[0].completion_tokens > 0


def test_long_passages_are_cut_until_the_window_fits_the_context(reranker, engine):
    passages = [" ".join(f"{FACTS[i]} word{j}" for j in range(60)) for i in range(10)]
    outcome = rerank(reranker, passages)
    window = outcome.windows[0]
    assert window.passage_words < 300
    assert window.prompt_tokens + len(engine.tokenizer.encode(rr.ideal_answer(10))) + 8 <= engine.max_model_len + 1
    assert sorted(outcome.ranking) == list(range(10))
    params = rr.RerankParams(QUERY, tuple(passages)).validate()
    text, words = reranker.window_prompt(params, list(range(10)))  # what bench/identifier_reads.py shows
    assert words == window.passage_words
    reads = rr.identifier_reads(reranker.identifiers.spellings[:10])  # each read adds its continuation ("[")
    assert len(engine.tokenizer.encode(text)) + sum(len(c) for c, _ in reads) == window.prompt_tokens


@pytest.mark.parametrize("knobs, field", [
    ({"passages": tuple(f"p{i}" for i in range(121))}, "passages"),
    ({"permutations": 5}, "permutations"),
    ({"query": "word " * 2000}, "query"),
])
def test_limits_are_invalid_argument_naming_the_field(reranker, knobs, field):
    params = dataclasses.replace(rr.RerankParams(QUERY, tuple(FACTS[:4])), **knobs).validate()
    with pytest.raises(InvalidArgument) as error:
        asyncio.run(reranker.run(RerankJob("bad", params)))
    assert error.value.field == field


def test_a_passed_deadline_stops_the_windows(reranker, engine):
    with pytest.raises(DeadlineExceeded):
        rerank(reranker, FACTS * 3, deadline=time.time() + 0.3)
    assert engine.load().running == 0
