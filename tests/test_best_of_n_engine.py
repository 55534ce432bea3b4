"""Best-of-N's program (server/strategies/best_of_n.py) on the transformers engine with the real SmolLM2 weights:
SCORE verdicts against a full forward of the same judge prompt, seeded requests reproducible whatever shares the
batch, candidates composed with a token-level strategy equal to n separate requests, the limits, and a deadline in
the middle of the bracket. (Over gRPC on both engines: tests/integration/best_of_n_checks.py.)"""

import asyncio
import dataclasses
import time

import pytest
import torch

from decoding import best_of_n as bon
from decoding.chat import ChatMessage
from decoding.errors import InvalidArgument
from decoding.sampling import SamplingParams
from decoding.strategies import BestOfNParams, Context, ContrastiveParams
from server.config import BestOfNSpec, GroupSpec, GuideSpec, ModelSpec
from server.engines.base import GenerationRequest
from server.engines.transformers_engine import TransformersEngine
from server.errors import DeadlineExceeded
from server.strategies import registry
from server.strategies.best_of_n import Judge, Work
from tests.conftest import EMBEDDED

QUESTION = "Tom has 3 apples and buys 5 more. How many apples does he have? End with '#### <number>'."
GROUP = GroupSpec("g", "smollm2", max_batch_size=8, best_of_n=BestOfNSpec(max_n=6, judge_max_tokens=64),
                  guides={"strict": GuideSpec("strict", "smollm2", ("judge",),
                                              system_prompt="You are a strict grader of math answers.")})


@pytest.fixture(scope="module")
def engine(model_path):
    engine = TransformersEngine(ModelSpec("smollm2", EMBEDDED, max_model_len=2048), GROUP)
    yield engine
    engine.shutdown()


def request(params: BestOfNParams, question: str = QUESTION, max_tokens: int = 24, deadline: float | None = None,
            request_id: str = "bon") -> GenerationRequest:
    return GenerationRequest(request_id=request_id, messages=(ChatMessage("user", question),), deadline=deadline,
                             sampling=SamplingParams(max_tokens=max_tokens, temperature=0), strategy=params)


async def run(engine, req):
    chunks = [c async for c in registry.generate(engine, GROUP, req)]
    return chunks


def test_score_verdicts_equal_the_probabilities_of_a_full_forward(engine, hf_model, tokenizer):
    params = BestOfNParams(n=2, seed=3, verdict="score", template="general", both_orders=True)
    chunks = asyncio.run(run(engine, request(params)))
    report = chunks[-1].report
    judgements = [j for m in report.bracket.matches for j in m.judgements]
    assert len(judgements) == 2 and report.judge_calls == 2 and report.judge_tokens == 0
    texts = [c.text for c in report.candidates]
    for j in judgements:
        user = bon.pair_prompt("general", QUESTION, texts[j.first], texts[j.second])
        chat = tokenizer.apply_chat_template([{"role": "system", "content": "You are a strict grader of math answers."},
                                              {"role": "user", "content": user}], add_generation_prompt=True,
                                             tokenize=False)
        for prefix, score in ((bon.score_prefix(bon.TAG_A), j.first_score),
                              (bon.score_prefix(bon.TAG_B, [(bon.TAG_A, j.first_score >= 0.5)]), j.second_score)):
            ids = tokenizer.encode(chat + prefix)
            correct = tokenizer.encode(chat + prefix + "Correct")[len(ids)]
            incorrect = tokenizer.encode(chat + prefix + "Incorrect")[len(ids)]
            with torch.inference_mode():
                logits = hf_model(torch.tensor([ids])).logits[0, -1].float()
            p = torch.softmax(logits[[correct, incorrect]], -1)[0].item()
            assert score == pytest.approx(p, abs=1e-4)
    # The judge guide's system prompt was used (the strict grader), and the winner's text is the response's.
    assert report.judge == "strict"
    assert chunks[-2].text == texts[report.winner] and chunks[-1].seed == 3


def test_a_seeded_request_is_reproducible_whatever_shares_the_batch(engine):
    params = BestOfNParams(n=5, seed=11, template="general", judge_max_tokens=16)
    alone = asyncio.run(run(engine, request(params)))

    async def crowded():
        others = [request(BestOfNParams(n=3, seed=99, verdict="score"), "What is 7 + 6?", request_id="other"),
                  dataclasses.replace(request(None, "Name a color."), request_id="plain")]
        results = await asyncio.gather(run(engine, request(params)), *(run(engine, r) for r in others))
        return results[0]

    together = asyncio.run(crowded())
    first, second = alone[-1].report, together[-1].report
    assert [c.token_ids for c in first.candidates] == [c.token_ids for c in second.candidates]
    assert first.bracket == second.bracket and first.winner == second.winner
    assert len({tuple(c.token_ids) for c in first.candidates}) > 1, "candidates at temperature 0.7 all agree"
    # 5 candidates, general template (no teams): round 1 has a bye and two judged matches; at most 4 calls in all.
    judged = [m for m in first.bracket.matches if m.judgements]
    assert first.judge_calls == len(judged) <= 4 and [m.round for m in judged][:2] == [1, 1]
    assert first.bracket.byes[0][0] == 1 and first.judge_tokens > 0
    assert [c.progress.phase for c in alone if c.progress] == ["candidates"] + ["round"] * first.bracket.rounds


def test_candidates_composed_with_a_token_level_strategy_equal_separate_requests(engine):
    uscd = ContrastiveParams(mode="uscd", uncertainty_threshold=0.003,
                             contrast_context=Context(messages=(ChatMessage("user", "Answer."),)))
    params = BestOfNParams(n=2, seed=5, candidates=uscd, verdict="score")
    report = asyncio.run(run(engine, request(params, max_tokens=12)))[-1].report
    sampling = SamplingParams(max_tokens=12, temperature=0.7)

    async def separate(i):
        req = dataclasses.replace(request(uscd), sampling=dataclasses.replace(sampling, seed=5 + i),
                                  request_id=f"sep{i}")
        return [t async for c in engine.generate(req) for t in c.token_ids]

    singles = [asyncio.run(separate(i)) for i in range(2)]
    assert [c.token_ids for c in report.candidates] == singles


def test_pointwise_scores_each_candidate_once(engine):
    chunks = asyncio.run(run(engine, request(BestOfNParams(n=3, seed=2, selection="pointwise"))))
    report = chunks[-1].report
    assert report.judge_calls == 3 and len(report.pointwise_scores) == 3 and report.bracket is None
    assert report.winner == bon.pointwise_winner(report.pointwise_scores)
    assert all(0 < s < 1 for s in report.pointwise_scores)


def test_one_candidate_makes_no_judge_call(engine):
    report = asyncio.run(run(engine, request(BestOfNParams(n=1, seed=1))))[-1].report
    assert report.judge_calls == 0 and report.winner == 0 and report.bracket.rounds == 0


@pytest.mark.parametrize("params, max_tokens, field", [
    (BestOfNParams(n=7), 24, "best_of_n.n"),                              # over max_n = 6
    (BestOfNParams(judge="nobody"), 24, "best_of_n.judge"),
    (BestOfNParams(judge_max_tokens=65), 24, "best_of_n.judge_max_tokens"),  # over the group's 64
    (BestOfNParams(n=2), 1000, "best_of_n.template"),                    # 2 × 1000 candidate tokens do not fit 2048
])
def test_limits_are_invalid_argument_naming_the_field(engine, params, max_tokens, field):
    with pytest.raises(InvalidArgument) as error:
        asyncio.run(run(engine, request(params, max_tokens=max_tokens)))
    assert error.value.field == field


def test_a_deadline_in_the_bracket_aborts_it_and_frees_every_slot(engine):
    params = BestOfNParams(n=6, seed=4, template="general", judge_max_tokens=64)

    async def go():
        started = time.time()
        with pytest.raises(DeadlineExceeded):
            async for chunk in registry.generate(engine, GROUP, request(params, deadline=time.time() + 4.0)):
                if chunk.progress is not None and chunk.progress.phase == "candidates":
                    assert time.time() < started + 4.0, "the candidates alone took the whole deadline; raise it"
        return time.time() - started

    assert asyncio.run(go()) < 8.0
    deadline = time.time() + 10
    while engine.load().running and time.time() < deadline:
        time.sleep(0.05)
    assert engine.load().running == 0


def test_a_score_comparison_reads_b_in_a_s_forward_when_a_is_judged_correct(engine):
    """SCORE reads B's tag in the forward of A's, the reply continued with A judged Correct: one forward for a
    comparison whose A is likelier Correct, two otherwise; the probabilities equal those of two separate reads (the
    engine told it cannot read a continuation in one forward)."""
    texts = ["3 + 5 = 8. #### 8", "#### 9", "Tom has 8 apples. #### 8", "He has 2 apples. #### 2"]
    pairs = [(0, 1), (1, 0), (2, 3), (3, 2), (1, 3)]
    params = BestOfNParams(n=4, verdict="score", template="math")
    req = request(params)

    def judge_all():
        judge = Judge(engine, GROUP, req, params, None, QUESTION, texts, Work())
        judgements = [j for (j,) in asyncio.run(judge.pairs(pairs))]
        return judgements, judge.work.forward_passes["smollm2"]

    speculative, forwards = judge_all()
    engine.score_along_in_one_forward = False
    try:
        separate, separate_forwards = judge_all()
    finally:
        del engine.score_along_in_one_forward  # back to the class's True
    firsts = [j.first_score for j in speculative]
    assert separate_forwards == 2 * len(pairs)
    assert forwards == sum(1 if p >= 0.5 else 2 for p in firsts), firsts
    for mine, theirs in zip(speculative, separate):
        assert (mine.first, mine.second, mine.how) == (theirs.first, theirs.second, theirs.how)
        assert mine.first_score == pytest.approx(theirs.first_score, abs=1e-4)
        assert mine.second_score == pytest.approx(theirs.second_score, abs=1e-4)
    # SmolLM2 may judge every A likelier Incorrect, which leaves B's read from A's forward unused above: it is
    # checked here against its own forward, whatever A's verdict.
    judge = Judge(engine, GROUP, req, params, None, QUESTION, texts, Work())
    for first, second in pairs:
        user = bon.pair_prompt("math", QUESTION, texts[first], texts[second])
        at_a, b_after_correct = asyncio.run(judge._p_correct_both(user))
        assert at_a == pytest.approx(asyncio.run(judge._p_correct(user, bon.score_prefix(bon.TAG_A))), abs=1e-4)
        assert b_after_correct == pytest.approx(asyncio.run(judge._p_correct(
            user, bon.score_prefix(bon.TAG_B, [(bon.TAG_A, True)]))), abs=1e-4)
