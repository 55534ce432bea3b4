"""Best-of-N with a pairwise judge and a knockout bracket (Liu et al. 2025, "PairJudge RM: Perform Best-of-N Sampling
with Knockout Tournament", arXiv 2501.13007), with the balanced-position option of Wang et al. 2023 ("Large Language
Models are not Fair Evaluators", arXiv 2305.17926).

N candidates are sampled; a judge model compares two at a time and says of each whether it is correct. One match
between candidates a and b gives each a score s ∈ [0, 1]:

    GENERATE:  s = 1 if the judge's tag for it reads Correct (or True), else 0 (Incorrect, False, or unparseable)
    SCORE:     s = p(Correct) / (p(Correct) + p(Incorrect)) read at the verdict tag's position, no generation
    both orders (balanced position calibration): s = mean of its scores as Response A and as Response B

    winner = the higher score if it is ≥ 1/2; equal scores ≥ 1/2: A in one order (the reference's A priority), a
             seeded coin in both orders (no position is favoured); both < 1/2: both are eliminated.

Hand example (both orders, GENERATE): order (a, b) says a Correct, b Incorrect; order (b, a) says b Correct,
a Correct ⇒ s_a = 1, s_b = 1/2 ⇒ a advances.

The bracket (the reference's `get_champion` rules): candidates with the same extracted final answer form a team
(math template; every candidate is its own team otherwise). Each round: stop early when one team remains (the
lowest-index survivor is returned); with an odd count one random candidate gets a bye; the rest are shuffled and
paired greedily, each with the first opponent of another team if any; a same-team pair is decided by a coin (no
judge call); all judged matches of a round run together. A round that eliminates everyone falls back to a random
entrant of that round (reported). Every judged match removes at least one candidate, so there are at most N − 1
matches (× 2 calls with both orders) and about ⌈log₂ N⌉ rounds.

Pointwise selection (the baseline): each candidate is scored alone, s = p(Correct) of a one-response template;
the highest score wins (ties: the lowest index).

Everything here is pure: the judge is an async callable the server provides, and one `random.Random(seed)` drives
every coin, so a seed makes the bracket reproducible.
"""

from __future__ import annotations

import dataclasses
import random
import re
from typing import AsyncIterator, Awaitable, Callable, Sequence

VERDICTS = ("generate", "score")
SELECTIONS = ("knockout", "pointwise")
TEMPLATES = ("math", "general")

JUDGE_SYSTEM_PROMPT = "You are a helpful assistant."
TAG_A, TAG_B, TAG_ALONE = "resp_a_judge", "resp_b_judge", "resp_judge"
CORRECT, INCORRECT = "Correct", "Incorrect"

_PAIR_TEMPLATES = {
    "math": (
        "Math judgement task. Below are a problem and two responses to it.\n\n"
        "Problem:\n{question}\n\n"
        "Response A:\n{a}\n\n"
        "Response B:\n{b}\n\n"
        "First write the final answer each response gives. Responses with the same final answer must get the same "
        "verdict; responses with different final answers cannot both be correct. Then check every step of each "
        "response on its own merits, favouring neither position nor length. End with exactly two lines, each "
        "holding one word, Correct or Incorrect:\n"
        "<resp_a_judge>...</resp_a_judge>\n<resp_b_judge>...</resp_b_judge>"),
    "general": (
        "Judgement task. Below are a request and two responses to it.\n\n"
        "Request:\n{question}\n\n"
        "Response A:\n{a}\n\n"
        "Response B:\n{b}\n\n"
        "Decide for each response whether it fulfils the request correctly, accurately and completely. Judge each "
        "on its own merits, favouring neither position nor length. Explain briefly, then end with exactly two lines, "
        "each holding one word, Correct or Incorrect:\n"
        "<resp_a_judge>...</resp_a_judge>\n<resp_b_judge>...</resp_b_judge>"),
}
_ALONE_TEMPLATES = {
    "math": (
        "Math judgement task. Below are a problem and a response to it.\n\n"
        "Problem:\n{question}\n\n"
        "Response:\n{a}\n\n"
        "Check every step of the response and its final answer. End with exactly one line holding one word, "
        "Correct or Incorrect:\n<resp_judge>...</resp_judge>"),
    "general": (
        "Judgement task. Below are a request and a response to it.\n\n"
        "Request:\n{question}\n\n"
        "Response:\n{a}\n\n"
        "Decide whether the response fulfils the request correctly, accurately and completely. End with exactly one "
        "line holding one word, Correct or Incorrect:\n<resp_judge>...</resp_judge>"),
}


def pair_prompt(template: str, question: str, a: str, b: str) -> str:
    """The judge's user message comparing Response A and Response B."""
    return _PAIR_TEMPLATES[template].format(question=question, a=a, b=b)


def alone_prompt(template: str, question: str, a: str) -> str:
    """The judge's user message for one response (pointwise selection)."""
    return _ALONE_TEMPLATES[template].format(question=question, a=a)


def score_prefix(tag: str, earlier: Sequence[tuple[str, bool]] = ()) -> str:
    """What the judge's reply is forced to begin with when its verdict at `tag` is read as a probability: the
    verdict lines before it (their tags and values), then the opening tag."""
    lines = "".join(f"<{t}>{CORRECT if value else INCORRECT}</{t}>\n" for t, value in earlier)
    return f"{lines}<{tag}>"


# ---- reading the judge's text ----

_VALUES = {"correct": True, "true": True, "incorrect": False, "false": False}


def _tag_values(text: str, tag: str) -> list[bool]:
    # The value, then the closing tag or the end of the text (a stop string may have stripped the last closing tag).
    pattern = rf"<\s*{tag}\s*>\s*([A-Za-z]+)\s*(?:<\s*/\s*{tag}\s*>|$)"
    return [_VALUES[v.lower()] for v in re.findall(pattern, text, flags=re.IGNORECASE) if v.lower() in _VALUES]


def _phrase_values(text: str, letter: str) -> list[bool]:
    pattern = rf"response\s*{letter}\s*(?:[:\-]|is)\s*\**\s*(correct|incorrect|true|false)\b"
    return [_VALUES[v.lower()] for v in re.findall(pattern, text, flags=re.IGNORECASE)]


def _boxed_values(text: str) -> list[bool]:
    found = re.findall(r"\\boxed\s*\{\s*(?:\\text\s*\{\s*)?([A-Za-z]+)\s*\}", text)
    return [_VALUES[v.lower()] for v in found if v.lower() in _VALUES]


@dataclasses.dataclass(frozen=True)
class ParsedVerdict:
    """The judge's verdict on each response (None: unreadable) and how it was read: "tags", "phrases" ("Response A:
    correct"), "boxed" (\\boxed{true}, the first for A and the second for B) or "unparsed"."""
    a: bool | None
    b: bool | None
    how: str


def parse_verdict(text: str) -> ParsedVerdict:
    """The two verdicts of a pairwise judgement. Tags first (any case, spaces inside the tags, the last closing tag
    possibly stripped by the stop string; the last valid tag wins, so an echoed instruction does not count), then
    "Response A: correct" phrases, then two \\boxed{true|false} values."""
    a, b = _tag_values(text, TAG_A), _tag_values(text, TAG_B)
    if a or b:
        return ParsedVerdict(a[-1] if a else None, b[-1] if b else None, "tags")
    a, b = _phrase_values(text, "a"), _phrase_values(text, "b")
    if a or b:
        return ParsedVerdict(a[-1] if a else None, b[-1] if b else None, "phrases")
    boxed = _boxed_values(text)
    if len(boxed) >= 2:
        return ParsedVerdict(boxed[-2], boxed[-1], "boxed")
    return ParsedVerdict(None, None, "unparsed")


# ---- final answers (teams) ----

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> float | None:
    """A math response's final answer as a number: the last \\boxed{...} holding a number, else the first number
    after the last `####`, else the last number in the text (commas dropped)."""
    boxed = re.findall(r"\\boxed\s*\{([^{}]*)\}", text)
    for content in reversed(boxed):
        numbers = _NUMBER.findall(content)
        if numbers:
            return _to_float(numbers[-1])
    if "####" in text:
        numbers = _NUMBER.findall(text.rsplit("####", 1)[-1])
        return _to_float(numbers[0]) if numbers else None
    numbers = _NUMBER.findall(text)
    return _to_float(numbers[-1]) if numbers else None


def _to_float(number: str) -> float | None:
    try:
        return float(number.replace(",", ""))
    except ValueError:
        return None


def answer_key(text: str, template: str) -> str | None:
    """The team key of a candidate: its final number, canonically written (math template); None (a team of its own)
    when it has none or for the general template."""
    if template != "math":
        return None
    number = final_number(text)
    if number is None:
        return None
    return str(int(number)) if number.is_integer() else repr(number)


# ---- matches and the bracket ----

@dataclasses.dataclass(frozen=True)
class Judgement:
    """One judge call on an ordered pair: the scores of the candidates shown as Response A and as Response B, and
    how the verdict was read (parse status, or "probability" for SCORE)."""
    first: int  # the candidate shown as Response A
    second: int  # as Response B
    first_score: float
    second_score: float
    how: str
    judge_tokens: int = 0


@dataclasses.dataclass(frozen=True)
class Match:
    round: int
    a: int
    b: int
    # The candidate that advanced; None: both were eliminated.
    winner: int | None
    # The judge calls (one, or two with both orders); empty for a same-team pair decided by a coin.
    judgements: tuple[Judgement, ...] = ()
    a_score: float = 0.0
    b_score: float = 0.0


@dataclasses.dataclass
class Bracket:
    matches: list[Match] = dataclasses.field(default_factory=list)
    byes: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (round, candidate)
    fallback_rounds: list[int] = dataclasses.field(default_factory=list)  # rounds that eliminated everyone
    rounds: int = 0
    remaining: list[int] = dataclasses.field(default_factory=list)
    stopped_early: bool = False  # one team remained before one candidate did
    winner: int | None = None  # set when the bracket is finished

    @property
    def judge_calls(self) -> int:
        return sum(len(m.judgements) for m in self.matches)


# judge(pairs) → for each (a, b) pair, its judgements: [(a, b)] in one order, [(a, b), (b, a)] in both.
Judge = Callable[[list[tuple[int, int]]], Awaitable[list[tuple[Judgement, ...]]]]


def match_scores(a: int, judgements: Sequence[Judgement]) -> tuple[float, float]:
    """(s_a, s_b): each candidate's mean score over the orders it was judged in."""
    a_scores, b_scores = [], []
    for j in judgements:
        if j.first == a:
            a_scores.append(j.first_score)
            b_scores.append(j.second_score)
        else:
            a_scores.append(j.second_score)
            b_scores.append(j.first_score)
    return sum(a_scores) / len(a_scores), sum(b_scores) / len(b_scores)


def decide(a: int, b: int, a_score: float, b_score: float, both_orders: bool, rng: random.Random) -> int | None:
    """The match rule of the module docstring."""
    best = max(a_score, b_score)
    if best < 0.5:
        return None
    if a_score != b_score:
        return a if a_score > b_score else b
    return rng.choice((a, b)) if both_orders else a


def _pair_up(entrants: list[int], team: Callable[[int], object]) -> list[tuple[int, int]]:
    pairs, rest = [], list(entrants)
    while rest:
        a = rest.pop(0)
        j = next((i for i, c in enumerate(rest) if team(c) != team(a)), 0)
        pairs.append((a, rest.pop(j)))
    return pairs


async def knockout(keys: Sequence[str | None], judge: Judge, rng: random.Random, both_orders: bool
                   ) -> AsyncIterator[Bracket]:
    """Runs the bracket over candidates 0..N-1 whose team keys are `keys` (None: a team of its own). Yields the
    bracket after each round played (winner None) and once more when it is finished (winner set)."""
    if not keys:
        raise ValueError("knockout needs at least one candidate")

    def team(c: int) -> object:
        return keys[c] if keys[c] is not None else ("alone", c)

    bracket = Bracket(remaining=list(range(len(keys))))
    while len(bracket.remaining) > 1:
        if len({team(c) for c in bracket.remaining}) == 1:
            bracket.stopped_early = True
            break
        bracket.rounds += 1
        round_, entrants, advancing = bracket.rounds, list(bracket.remaining), []
        if len(entrants) % 2:
            bye = rng.choice(entrants)
            entrants.remove(bye)
            advancing.append(bye)
            bracket.byes.append((round_, bye))
        rng.shuffle(entrants)
        pairs = _pair_up(entrants, team)
        judged = [p for p in pairs if team(p[0]) != team(p[1])]
        verdicts = dict(zip(judged, await judge(judged))) if judged else {}
        for a, b in pairs:
            if (a, b) not in verdicts:  # same team: a coin, no call
                match = Match(round_, a, b, rng.choice((a, b)))
            else:
                a_score, b_score = match_scores(a, verdicts[(a, b)])
                match = Match(round_, a, b, decide(a, b, a_score, b_score, both_orders, rng), verdicts[(a, b)],
                              a_score, b_score)
            bracket.matches.append(match)
            if match.winner is not None:
                advancing.append(match.winner)
        if not advancing:
            bracket.fallback_rounds.append(round_)
            advancing = [rng.choice(bracket.remaining)]
        bracket.remaining = sorted(advancing)
        yield bracket
    bracket.winner = min(bracket.remaining)
    yield bracket


async def run_knockout(keys: Sequence[str | None], judge: Judge, rng: random.Random, both_orders: bool) -> Bracket:
    """The finished bracket of `knockout`."""
    async for bracket in knockout(keys, judge, rng, both_orders):
        pass
    return bracket


def pointwise_winner(scores: Sequence[float]) -> int:
    """The highest-scored candidate; ties go to the lowest index."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))
