"""Listwise reranking with single-token decoding (FIRST), pure: windows, prompts, rankings and their aggregation.

FIRST (Reddy et al. 2024, "FIRST: Faster Improved Listwise Reranking with Single Token Decoding", arXiv 2406.15657;
reproduced by Chen, Pradeep & Lin 2024, arXiv 2411.05508) shows the model a window of passages labelled [A], [B], …
in one prompt (RankZephyr's layout) and reads the ranking from the first token of its reply instead of letting it
write the permutation "[B] > [A] > …":

    order(window) = argsort over identifiers c of  −log p(reply starts "[c" | prompt)      (ties: input order)

one forward per window where the tokenizer spells "[c" as "[" + one letter token (then the order is that of
log p(c | prompt + "[")); see `identifier_reads` for tokenizers that merge "[c" into one token. A sliding window of
W passages moving by S runs from the bottom of the list to the top, each window reordering its slice in place, so
good passages bubble up: for N > W, 1 + ⌈(N − W)/S⌉ windows

    [N−W, N), [N−W−S, N−S), …, [0, ·)          (the top window may be shorter than W)

e.g. N = 100, W = 20, S = 10: [80,100), [70,90), …, [0,20), 9 windows; N = 25: [5,25), [0,15); N ≤ W: [0, N).

Permutation self-consistency (Tang et al. 2024, "Found in the Middle: Permutation Self-Consistency Improves
Listwise Ranking in Large Language Models", arXiv 2310.07712) ranks each window under m shuffles of its passages
and aggregates the m rankings: Kemeny (the order minimizing the summed Kendall tau distance to them) or Borda.
Hand example: rankings [1,2,0,3], [1,2,3,0], [1,2,0,3] aggregate to [1,2,0,3] under both.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import re
import string
from typing import Callable, Iterable, Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from decoding.errors import InvalidArgument

IDENTIFIERS = string.ascii_uppercase
MODES = ("first_token", "generate")
AGGREGATIONS = ("kemeny", "borda")
SYSTEM_PROMPT = ("You are RankLLM, an intelligent assistant that can rank passages based on their relevancy to "
                 "the query.")


@dataclasses.dataclass(frozen=True)
class RerankParams:
    query: str
    passages: tuple[str, ...]
    top_n: int = 0
    window_size: int = 20
    stride: int = 10
    mode: str = "first_token"
    permutations: int = 1
    aggregation: str = "kemeny"
    max_passage_words: int = 300
    seed: int = 0

    def validate(self) -> "RerankParams":
        if not self.query.strip():
            raise InvalidArgument("query", "empty: give the search query")
        if not self.passages:
            raise InvalidArgument("passages", "give at least one passage to rerank")
        if not 2 <= self.window_size <= len(IDENTIFIERS):
            raise InvalidArgument("window_size", f"must be in [2, {len(IDENTIFIERS)}] (identifiers A..Z), got "
                                                 f"{self.window_size}")
        if not 1 <= self.stride < self.window_size:
            raise InvalidArgument("stride", f"must be in [1, window_size) = [1, {self.window_size}), got "
                                            f"{self.stride}")
        if self.mode not in MODES:
            raise InvalidArgument("mode", f"must be one of {MODES}, got {self.mode!r}")
        if self.permutations < 1:
            raise InvalidArgument("permutations", f"must be >= 1 (1: off), got {self.permutations}")
        if self.aggregation not in AGGREGATIONS:
            raise InvalidArgument("aggregation", f"must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.max_passage_words < 1:
            raise InvalidArgument("max_passage_words", f"must be >= 1, got {self.max_passage_words}")
        if self.top_n < 0:
            raise InvalidArgument("top_n", f"must be >= 0, got {self.top_n}")
        return self


def window_schedule(count: int, window: int, stride: int) -> list[tuple[int, int]]:
    """The windows [start, end) in the order they run, bottom of the list first."""
    if count <= window:
        return [(0, count)]
    windows, end = [], count
    while True:
        start = max(0, end - window)
        windows.append((start, end))
        if start == 0:
            return windows
        end -= stride


def receive_permutation(order: Iterable[int], size: int) -> list[int]:
    """A model's (possibly malformed) order of a window's positions as a permutation of range(size): repeats keep
    their first place, positions outside the window are dropped, missing ones follow in input order."""
    seen: dict[int, None] = {}
    for position in order:
        if 0 <= position < size and position not in seen:
            seen[position] = None
    return list(seen) + [p for p in range(size) if p not in seen]


def rank_first_token(entries: Iterable[tuple[str, float]], size: int) -> list[int]:
    """A window's order from (identifier, log-probability) pairs of the reply's first token: only single
    uppercase letters of the window (A … the size-th letter) count, a letter spelled by several tokens keeps its
    best; descending log-probability, ties by input order; letters not among the entries follow in input order.
    (Lowercase letters are other tokens, not identifiers, and are ignored.)"""
    letters = IDENTIFIERS[:size]
    best: dict[str, float] = {}
    for text, logprob in entries:
        if len(text) == 1 and text in letters and not math.isnan(logprob):
            best[text] = max(best.get(text, -math.inf), logprob)
    ranked = sorted(best, key=lambda letter: (-best[letter], letters.index(letter)))
    return receive_permutation((letters.index(letter) for letter in ranked), size)


Read = tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]
"""One engine read (`Engine.score_along`): (continuation, the token ids read after the prompt + continuation[:j]
for each j = 0 … len(continuation))."""


def identifier_reads(spellings: Sequence[tuple[int, ...]]) -> list[Read]:
    """The reads that give each identifier's log-probability as the start of the reply, from its spelling (the
    tokens of "[A", "[B", … right after the assistant turn, one or two each). Per first token t that identifiers
    continue, one read of prompt + t: its second tokens after t, and (in the first such read, when the identifiers
    start with different tokens) the first tokens after the prompt; without two-token spellings, one read of the
    prompt. A tokenizer that spells "[" + letter (SmolLM2) needs one read, the letters after prompt + "["; one that
    merges "[A" (Qwen2.5, except "[O" and "[Q") needs one too: "[A", "[B", …, "[" after the prompt and "O", "Q" after
    prompt + "[", from the same forward."""
    firsts = tuple(dict.fromkeys(spelling[0] for spelling in spellings))
    shown = firsts if len(firsts) > 1 else ()
    reads: list[Read] = []
    for first in firsts:
        seconds = tuple(dict.fromkeys(s[1] for s in spellings if s[0] == first and len(s) == 2))
        if seconds:
            reads.append(((first,), (() if reads else shown, seconds)))
    return reads or [((), (shown,))]


def identifier_logprobs(spellings: Sequence[tuple[int, ...]], reads: Sequence[Read],
                        results: Sequence[Sequence[Sequence[float]]]) -> list[float]:
    """log p(spelling) = log p(t1 | prompt) + log p(t2 | prompt, t1) from the reads' log-probabilities (results[i][j]
    for reads[i]'s ids at position j); a first token every identifier shares adds the same term to all and is left
    out (it does not change the order)."""
    table = {}
    for (continuation, positions), rows in zip(reads, results):
        for j, (ids, row) in enumerate(zip(positions, rows)):
            prefix = continuation[j - 1] if j else None
            table.update({(prefix, token): logprob for token, logprob in zip(ids, row)})
    return [table.get((None, s[0]), 0.0) + (table[(s[0], s[1])] if len(s) == 2 else 0.0) for s in spellings]


_BRACKETED = re.compile(r"\[\s*([A-Z])\s*\]")
_BARE = re.compile(r"(?<![A-Za-z])([A-Z])(?![A-Za-z])")


def parse_generated(text: str, size: int) -> list[int]:
    """A written permutation ("[B] > [A] > [C]") as a window order: bracketed letters in order, or bare capital
    letters when the model wrote none in brackets; then as `receive_permutation`."""
    letters = _BRACKETED.findall(text) or _BARE.findall(text)
    return receive_permutation((IDENTIFIERS.index(letter) for letter in letters), size)


def clean_passage(text: str, max_words: int) -> str:
    """The passage as shown: its first `max_words` words, square brackets made parentheses (so "[A]" inside a
    passage cannot pass for an identifier)."""
    words = " ".join(text.split()[:max_words])
    return words.replace("[", "(").replace("]", ")")


def user_prompt(query: str, passages: Sequence[str]) -> str:
    """RankZephyr's listwise instruction (as rank_llm's `rank_zephyr_alpha` template lays it out) over passages
    already cleaned."""
    num = len(passages)
    lines = "\n".join(f"[{IDENTIFIERS[i]}] {passage}" for i, passage in enumerate(passages))
    return (f"I will provide you with {num} passages, each indicated by an alphabetical identifier []. Rank the "
            f"passages based on their relevance to the search query: {query}.\n\n{lines}\n\n"
            f"Search Query: {query}.\nRank the {num} passages above based on their relevance to the search query. "
            "All the passages should be included and listed using identifiers, in descending order of relevance. "
            "The output format should be [] > [], e.g., [B] > [A]. Only respond with the ranking results, do not "
            "say any word or explain.")


def ideal_answer(size: int) -> str:
    """What a well-formed written permutation of a window looks like (to size MODE_GENERATE's token budget)."""
    return " > ".join(f"[{letter}]" for letter in IDENTIFIERS[:size])


def fit_passage_words(prompt_tokens: Callable[[int], int], budget: int, max_words: int, passages: int
                      ) -> int | None:
    """The word limit for a window whose prompt must fit `budget` tokens: `max_words`, shrunk while the prompt
    (`prompt_tokens(limit)`) overflows by max(1, overflow // (4 · passages)) words; None if one word each does not
    fit."""
    limit = max_words
    while True:
        overflow = prompt_tokens(limit) - budget
        if overflow <= 0:
            return limit
        if limit == 1:
            return None
        limit = max(1, limit - max(1, overflow // (4 * passages)))


def shuffles(size: int, count: int, rng: random.Random) -> list[list[int]]:
    """The passage orders a window is shown in under permutation self-consistency: input order, then count − 1
    shuffles."""
    orders = [list(range(size))]
    for _ in range(count - 1):
        order = list(range(size))
        rng.shuffle(order)
        orders.append(order)
    return orders


def borda(rankings: Sequence[Sequence[int]], size: int) -> list[int]:
    """Items by summed points (size − place in each ranking), ties by item index."""
    points = [0] * size
    for ranking in rankings:
        for place, item in enumerate(ranking):
            points[item] += size - place
    return sorted(range(size), key=lambda item: (-points[item], item))


def _pairwise_wins(rankings: Sequence[Sequence[int]], size: int) -> list[list[int]]:
    """wins[a][b]: how many rankings put a before b."""
    wins = [[0] * size for _ in range(size)]
    for ranking in rankings:
        for i, a in enumerate(ranking):
            for b in ranking[i + 1:]:
                wins[a][b] += 1
    return wins


def kemeny(rankings: Sequence[Sequence[int]], size: int) -> list[int]:
    """The Kemeny order, exact: the permutation with the least summed Kendall tau distance to the rankings (Kemeny
    1959; the aggregation of Tang et al. 2024). With wins[a][b] the number of rankings that put a before b and one
    binary x_ab per pair a < b (1: a goes before b), it is the integer linear program

        minimize   Σ_{a<b}  x_ab · wins[b][a] + (1 − x_ab) · wins[a][b]
        subject to 0 ≤ x_ab + x_bc − x_ac ≤ 1        for every a < b < c    (no 3-cycle, hence a total order)

    solved to optimality by HiGHS (scipy.optimize.milp): size(size−1)/2 variables and C(size, 3) constraints,
    tens of milliseconds for a window of 20 or 26 on one core. Ties between optimal orders go to one that keeps the
    most pairs in input order (the costs are scaled by size² and each x_ab gets −1, a sum below size² that can never
    outweigh one disagreement); among several such orders the solver's pick is deterministic for a given HiGHS.
    Hand example: [1,2,0,3], [1,2,3,0], [1,2,0,3] → [1,2,0,3]."""
    if size < 3:
        return borda(rankings, size)  # one pair: the majority, ties by input order, is what the program picks
    wins = np.array(_pairwise_wins(rankings, size), dtype=np.float64)
    first, second = np.triu_indices(size, k=1)  # the pairs a < b, in the order of the variables
    pair_index = np.full((size, size), -1)
    pair_index[first, second] = np.arange(first.size)
    costs = size * size * (wins[second, first] - wins[first, second]) - 1.0
    triples = np.array(list(itertools.combinations(range(size), 3)))
    a, b, c = triples.T
    rows = np.repeat(np.arange(len(triples)), 3)
    columns = np.stack([pair_index[a, b], pair_index[b, c], pair_index[a, c]], axis=1).ravel()
    signs = np.tile([1.0, 1.0, -1.0], len(triples))
    transitivity = LinearConstraint(coo_matrix((signs, (rows, columns)), shape=(len(triples), first.size)), 0, 1)
    solved = milp(costs, constraints=transitivity, integrality=np.ones(first.size), bounds=Bounds(0, 1),
                  options={"mip_rel_gap": 0.0})
    if solved.status != 0:
        raise RuntimeError(f"Kemeny aggregation of {len(rankings)} rankings of {size} items: {solved.message}")
    before = np.zeros((size, size), dtype=bool)
    chosen = np.round(solved.x).astype(bool)
    before[first[chosen], second[chosen]] = True
    before[second[~chosen], first[~chosen]] = True
    # In a total order the item placed k-th goes before exactly size − 1 − k others.
    order = sorted(range(size), key=lambda item: -int(before[item].sum()))
    if sorted(before[order].sum(axis=1).tolist(), reverse=True) != list(range(size - 1, -1, -1)):
        raise RuntimeError(f"Kemeny aggregation: the solver's pair choices are not a total order ({solved.message})")
    return order


def aggregate(rankings: Sequence[Sequence[int]], size: int, how: str) -> list[int]:
    if len(rankings) == 1:
        return list(rankings[0])
    return kemeny(rankings, size) if how == "kemeny" else borda(rankings, size)
