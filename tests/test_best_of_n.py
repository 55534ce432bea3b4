"""Best-of-N's pure parts (decoding/best_of_n.py): the verdict parser table, final answers, the match rule and its
hand example, and the knockout bracket's properties against an oracle judge (the winner is correct whenever a
candidate is; at most N − 1 calls per order; byes, teams, early stops, fallbacks; determinism under a seed)."""

import asyncio
import random

import pytest

from decoding import best_of_n as bon
from decoding.errors import InvalidArgument
from decoding.strategies import BestOfNParams


# ---- the verdict parser (ALGORITHMS: tag forms, case, spaces, a stripped closing tag, boxed fallbacks) ----

@pytest.mark.parametrize("text, a, b, how", [
    ("...\n<resp_a_judge>Correct</resp_a_judge>\n<resp_b_judge>Incorrect</resp_b_judge>", True, False, "tags"),
    ("<resp_a_judge>incorrect</resp_a_judge><resp_b_judge>CORRECT</resp_b_judge>", False, True, "tags"),
    ("< resp_a_judge > True </ resp_a_judge >\n<RESP_B_JUDGE>false</RESP_B_JUDGE>", True, False, "tags"),
    # The stop string </resp_b_judge> was stripped by the server.
    ("<resp_a_judge>Correct</resp_a_judge>\n<resp_b_judge>Correct", True, True, "tags"),
    # An echoed instruction does not count; the last valid tag wins.
    ("Answer with <resp_a_judge>Correct or Incorrect</resp_a_judge>. So: <resp_a_judge>Incorrect</resp_a_judge>\n"
     "<resp_b_judge>Correct</resp_b_judge>", False, True, "tags"),
    ("<resp_a_judge>Maybe</resp_a_judge>\n<resp_b_judge>Correct</resp_b_judge>", None, True, "tags"),
    ("Response A: correct\nResponse B: incorrect", True, False, "phrases"),
    ("Response A is **false**, and Response B is true.", False, True, "phrases"),
    ("The verdicts are \\boxed{true} and \\boxed{False}.", True, False, "boxed"),
    ("A: \\boxed{\\text{Correct}} B: \\boxed{\\text{Incorrect}}", True, False, "boxed"),
    ("Only one \\boxed{true}", None, None, "unparsed"),
    ("I am not sure.", None, None, "unparsed"),
    ("", None, None, "unparsed"),
])
def test_parse_verdict(text, a, b, how):
    assert bon.parse_verdict(text) == bon.ParsedVerdict(a, b, how)


@pytest.mark.parametrize("text, number", [
    ("Janet sells 16 - 3 - 4 = 9 eggs.\n#### 18", 18.0),
    ("So the total is 1,200 dollars.\n#### 1,200", 1200.0),
    ("The answer is 3.5.", 3.5),                      # no ####: the last number
    ("First 2 apples, then 7 more, so 9 in all.", 9.0),
    ("#### -4", -4.0),
    ("#### 12 (twelve) and 13", 12.0),                # the first number after the last ####
    ("so x = \\boxed{42} and 7 more", 42.0),          # a boxed number first
    ("\\boxed{x} then 5", 5.0),                        # a box without a number does not count
    ("no number here", None),
])
def test_final_number(text, number):
    assert bon.final_number(text) == number


def test_answer_keys_group_equal_numbers_on_the_math_template_only():
    assert bon.answer_key("#### 18", "math") == bon.answer_key("so 18.0", "math") == "18"
    assert bon.answer_key("#### 2.5", "math") == "2.5"
    assert bon.answer_key("no number", "math") is None
    assert bon.answer_key("#### 18", "general") is None


# ---- one match ----

def test_hand_example_both_orders():
    """Order (a, b): a Correct, b Incorrect; order (b, a): both Correct ⇒ s_a = 1, s_b = 1/2 ⇒ a advances."""
    judgements = (bon.Judgement(3, 5, 1.0, 0.0, "tags"), bon.Judgement(5, 3, 1.0, 1.0, "tags"))
    a_score, b_score = bon.match_scores(3, judgements)
    assert (a_score, b_score) == (1.0, 0.5)
    assert bon.decide(3, 5, a_score, b_score, True, random.Random(0)) == 3


def test_match_rule():
    rng = random.Random(0)
    assert bon.decide(1, 2, 1.0, 1.0, False, rng) == 1      # one order: A's priority (the reference)
    assert bon.decide(1, 2, 0.0, 1.0, False, rng) == 2
    assert bon.decide(1, 2, 0.4, 0.3, False, rng) is None   # neither judged correct: both out
    assert bon.decide(1, 2, 0.6, 0.9, False, rng) == 2      # soft scores: the higher
    assert {bon.decide(1, 2, 0.5, 0.5, True, random.Random(s)) for s in range(20)} == {1, 2}  # a coin


def test_pointwise_winner_ties_go_to_the_lowest_index():
    assert bon.pointwise_winner([0.2, 0.9, 0.9, 0.1]) == 1


def test_score_prefix_forces_the_earlier_verdicts():
    assert bon.score_prefix(bon.TAG_A) == "<resp_a_judge>"
    assert bon.score_prefix(bon.TAG_B, [(bon.TAG_A, False)]) == (
        "<resp_a_judge>Incorrect</resp_a_judge>\n<resp_b_judge>")


# ---- the bracket ----

def oracle(correct: list[bool], orders: int = 1, log: list | None = None):
    """A judge that labels correctness truthfully; records every call."""
    async def judge(pairs):
        out = []
        for a, b in pairs:
            calls = [(a, b), (b, a)][:orders]
            if log is not None:
                log.extend(calls)
            out.append(tuple(bon.Judgement(x, y, float(correct[x]), float(correct[y]), "tags") for x, y in calls))
        return out
    return judge


def run(keys, judge, seed=0, both_orders=False):
    return asyncio.run(bon.run_knockout(keys, judge, random.Random(seed), both_orders))


@pytest.mark.parametrize("both_orders", [False, True])
def test_oracle_winner_is_correct_whenever_a_candidate_is_and_calls_stay_under_n_minus_1(both_orders):
    for seed in range(300):
        rng = random.Random(seed)
        n = rng.randint(1, 9)
        answers = [rng.choice([None, "1", "2", "3"]) for _ in range(n)]
        correct = [a == "2" for a in answers]  # the team "2" is right; everything else wrong
        log = []
        bracket = run(answers, oracle(correct, 2 if both_orders else 1, log), seed, both_orders)
        assert bracket.winner in range(n)
        if any(correct):
            assert correct[bracket.winner], (seed, answers, bracket)
        assert len(log) == bracket.judge_calls <= (n - 1) * (2 if both_orders else 1)
        assert all(answers[a] is None or answers[a] != answers[b] for a, b in log), "a same-team pair was judged"


def test_one_candidate_and_one_team_make_no_call():
    log = []
    assert run(["7"], oracle([True], log=log)).winner == 0
    bracket = run(["7", "7", "7"], oracle([False] * 3, log=log))
    assert log == [] and bracket.stopped_early and bracket.rounds == 0 and bracket.winner == 0


def test_odd_count_gives_a_bye_each_round():
    bracket = run([None] * 5, oracle([True] * 5))
    # 5 → bye + 2 matches → 3 → bye + 1 match → 2 → 1 match.
    assert [r for r, _ in bracket.byes] == [1, 2] and bracket.rounds == 3 and bracket.judge_calls == 4


def test_a_round_that_eliminates_everyone_falls_back_to_an_entrant():
    bracket = run([None] * 4, oracle([False] * 4), seed=3)
    assert bracket.fallback_rounds == [1] and bracket.rounds == 1
    assert bracket.winner in range(4) and all(m.winner is None for m in bracket.matches)


def test_same_team_pairs_are_decided_without_a_call():
    log = []
    # Two teams of two: round 1 pairs across teams (preferred), then the two survivors are of one team or not.
    bracket = run(["1", "1", "2", "2"], oracle([True, True, False, False], log=log), seed=1)
    assert all({bracket.matches[0].a, bracket.matches[0].b} != s for s in ({0, 1}, {2, 3}))
    assert bracket.winner in (0, 1) and len(log) == 2 and bracket.stopped_early


def test_a_seed_makes_the_bracket_reproducible():
    keys = [None, "3", "3", None, "5", None, "8"]
    noisy = [True, False, True, True, False, True, False]
    first, again = run(keys, oracle(noisy), seed=42), run(keys, oracle(noisy), seed=42)
    assert first == again
    assert any(run(keys, oracle(noisy), seed=s).matches != first.matches for s in range(43, 60))


def test_the_bracket_is_yielded_after_each_round():
    async def rounds():
        return [(b.rounds, b.winner, len(b.remaining))
                async for b in bon.knockout([None] * 4, oracle([True] * 4), random.Random(0), False)]
    assert asyncio.run(rounds())[:-1] == [(1, None, 2), (2, None, 1)]
    assert asyncio.run(rounds())[-1][1] is not None


# ---- params ----

@pytest.mark.parametrize("params, field", [
    (BestOfNParams(n=0), "best_of_n.n"),
    (BestOfNParams(selection="pointwise", verdict="generate"), "best_of_n.verdict"),
    (BestOfNParams(selection="pointwise", both_orders=True), "best_of_n.both_orders"),
    (BestOfNParams(template="code"), "best_of_n.template"),
])
def test_bad_params_name_the_field(params, field):
    with pytest.raises(InvalidArgument) as error:
        params.validate()
    assert error.value.field == field


def test_verdict_defaults_follow_the_selection():
    assert BestOfNParams().verdict_mode == "generate"
    assert BestOfNParams(selection="pointwise").verdict_mode == "score"
