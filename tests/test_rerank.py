"""decoding/rerank.py: the hand examples of FIRST (Reddy et al. 2024) and permutation self-consistency (Tang et al.
2024): the window schedule, the permutation receiver, the first-token parser, written permutations, aggregation,
identifier reads, passage cleaning and the context fit."""

import itertools
import math
import random

import pytest

from decoding import rerank as rr
from decoding.errors import InvalidArgument


@pytest.mark.parametrize("count, window, stride, expected", [
    (100, 20, 10, [(80, 100), (70, 90), (60, 80), (50, 70), (40, 60), (30, 50), (20, 40), (10, 30), (0, 20)]),
    (25, 20, 10, [(5, 25), (0, 15)]),
    (21, 20, 10, [(1, 21), (0, 11)]),
    (15, 20, 10, [(0, 15)]),
    (20, 20, 10, [(0, 20)]),
    (1, 20, 10, [(0, 1)]),
    (7, 3, 2, [(4, 7), (2, 5), (0, 3)]),
])
def test_window_schedule(count, window, stride, expected):
    assert rr.window_schedule(count, window, stride) == expected


@pytest.mark.parametrize("count, window, stride", [(100, 20, 10), (101, 20, 10), (57, 7, 3), (1000, 26, 25)])
def test_window_count_is_one_plus_the_ceiling(count, window, stride):
    windows = rr.window_schedule(count, window, stride)
    assert len(windows) == 1 + math.ceil((count - window) / stride)
    assert windows[-1][0] == 0 and windows[0][1] == count
    assert all(end - start <= window for start, end in windows)


@pytest.mark.parametrize("order, size, expected", [
    ([2, 0, 1], 3, [2, 0, 1]),
    ([2, 2, 0, 2], 3, [2, 0, 1]),          # repeats keep their first place, the missing one follows
    ([5, -1, 1, 9], 4, [1, 0, 2, 3]),      # out of the window: dropped
    ([], 3, [0, 1, 2]),
])
def test_permutation_receiver(order, size, expected):
    assert rr.receive_permutation(order, size) == expected


def test_receiver_always_returns_a_permutation():
    rng = random.Random(0)
    for _ in range(200):
        size = rng.randint(1, 26)
        order = [rng.randint(-3, 30) for _ in range(rng.randint(0, 40))]
        assert sorted(rr.receive_permutation(order, size)) == list(range(size))


def test_first_token_parser_hand_example():
    # 'U' is outside a window of 20, ' B' is not a single letter, lowercase 'a' is another token: all ignored.
    entries = {"C": -0.1, "A": -1.2, "T": -3.0, "U": -0.5, " B": -0.2, "a": -0.3}.items()
    order = rr.rank_first_token(entries, 20)
    letters = [rr.IDENTIFIERS[i] for i in order]
    assert letters[:3] == ["C", "A", "T"]
    assert letters[3:] == [c for c in rr.IDENTIFIERS[:20] if c not in "CAT"]


def test_first_token_parser_keeps_the_best_of_a_repeated_letter_and_breaks_ties_by_position():
    assert rr.rank_first_token([("B", -5.0), ("A", -1.0), ("B", -0.5)], 3) == [1, 0, 2]
    assert rr.rank_first_token([("C", -1.0), ("B", -1.0), ("A", -1.0)], 3) == [0, 1, 2]
    assert rr.rank_first_token([("A", float("nan")), ("B", -1.0)], 2) == [1, 0]


@pytest.mark.parametrize("text, size, expected", [
    ("[B] > [A] > [C]", 3, [1, 0, 2]),
    ("[C] > [C] > [A]", 3, [2, 0, 1]),          # duplicate
    ("[D] > [Z] > [B]", 4, [3, 1, 0, 2]),       # Z out of range, A and C missing
    ("B > A > C", 3, [1, 0, 2]),                # no brackets
    ("[ B ]>[a]>[C]", 3, [1, 2, 0]),            # spaces inside brackets; a lowercase letter is no identifier
    ("I think the answer is", 3, [0, 1, 2]),     # "I" is the 9th letter, out of a window of 3: input order
    ("", 2, [0, 1]),
])
def test_generated_permutations_parse_robustly(text, size, expected):
    assert rr.parse_generated(text, size) == expected


def test_aggregation_hand_example():
    rankings = [[1, 2, 0, 3], [1, 2, 3, 0], [1, 2, 0, 3]]
    assert rr.borda(rankings, 4) == [1, 2, 0, 3]
    assert rr.kemeny(rankings, 4) == [1, 2, 0, 3]
    assert rr.aggregate(rankings, 4, "kemeny") == [1, 2, 0, 3]
    assert rr.aggregate([[2, 0, 1]], 3, "borda") == [2, 0, 1]


def _disagreements(order, rankings):
    place = [{item: i for i, item in enumerate(r)} for r in rankings]
    return sum(1 for a, b in itertools.combinations(order, 2) for p in place if p[b] < p[a])


def _inversions(order):
    return sum(1 for a, b in itertools.combinations(order, 2) if b < a)


def test_kemeny_is_the_exact_optimum_with_ties_in_input_order():
    """Against brute force over every permutation: the least summed Kendall tau distance, and among the orders
    that reach it the one with the fewest pairs out of input order (cases with many ties: few, random rankings)."""
    rng = random.Random(1)
    beats_borda = 0
    for _ in range(80):
        size = rng.randint(1, 7)
        rankings = [rng.sample(range(size), size) for _ in range(rng.randint(2, 5))]
        order = rr.kemeny(rankings, size)
        assert sorted(order) == list(range(size))
        best = min((_disagreements(list(p), rankings), _inversions(p)) for p in itertools.permutations(range(size)))
        assert (_disagreements(order, rankings), _inversions(order)) == best
        beats_borda += _disagreements(order, rankings) < _disagreements(rr.borda(rankings, size), rankings)
    assert beats_borda > 0  # the cases are not ones Borda already solves


def test_kemeny_on_full_windows():
    """Windows of 20 and 26 (the most identifiers): a consensus order hidden under noisy copies comes back, and
    no single move of one item lowers the distance of the optimum found."""
    rng = random.Random(2)
    for size in (20, 26):
        truth = rng.sample(range(size), size)
        rankings = []
        for _ in range(5):
            noisy = list(truth)
            for _ in range(3):  # three random adjacent swaps each
                i = rng.randrange(size - 1)
                noisy[i], noisy[i + 1] = noisy[i + 1], noisy[i]
            rankings.append(noisy)
        order = rr.kemeny(rankings, size)
        cost = _disagreements(order, rankings)
        assert cost <= _disagreements(truth, rankings)
        for i, j in itertools.permutations(range(size), 2):
            moved = list(order)
            moved.insert(j, moved.pop(i))
            assert _disagreements(moved, rankings) >= cost


def test_identifier_reads_one_after_the_shared_bracket():
    spellings = [(75, 49), (75, 50), (75, 51)]  # "[" + letter (SmolLM2)
    reads = rr.identifier_reads(spellings)
    assert reads == [((75,), ((), (49, 50, 51)))]  # one read: the letters after prompt + "["
    assert rr.identifier_logprobs(spellings, reads, [[[], [-2.0, -1.0, -3.0]]]) == [-2.0, -1.0, -3.0]


def test_identifier_reads_merged_and_split_spellings():
    spellings = [(22519,), (32622,), (58, 46)]  # "[A", "[B" merged, "[" + "O" (Qwen2.5)
    reads = rr.identifier_reads(spellings)
    assert reads == [((58,), ((22519, 32622, 58), (46,)))]  # one forward of prompt + "[", read at both positions
    logprobs = rr.identifier_logprobs(spellings, reads, [[[-1.0, -2.0, -0.5], [-0.25]]])
    assert logprobs == [-1.0, -2.0, -0.75]


def test_identifier_reads_single_tokens_and_two_continued_firsts():
    spellings = [(10,), (11,), (12,)]  # every identifier one token
    reads = rr.identifier_reads(spellings)
    assert reads == [((), ((10, 11, 12),))]
    assert rr.identifier_logprobs(spellings, reads, [[[-1.0, -2.0, -3.0]]]) == [-1.0, -2.0, -3.0]
    spellings = [(5, 1), (6, 2), (7,)]  # two first tokens continued: two reads, the first tokens read once
    reads = rr.identifier_reads(spellings)
    assert reads == [((5,), ((5, 6, 7), (1,))), ((6,), ((), (2,)))]
    logprobs = rr.identifier_logprobs(spellings, reads, [[[-1.0, -2.0, -3.0], [-0.5]], [[], [-0.25]]])
    assert logprobs == [-1.5, -2.25, -3.0]


def test_passages_are_cut_to_words_and_lose_their_brackets():
    assert rr.clean_passage("one  two\nthree four", 3) == "one two three"
    assert rr.clean_passage("see [A] and [12]", 300) == "see (A) and (12)"


def test_prompt_labels_each_passage():
    prompt = rr.user_prompt("what is x", ["first", "second"])
    assert "[A] first\n[B] second" in prompt and prompt.count("what is x") == 2 and "2 passages" in prompt
    assert rr.ideal_answer(3) == "[A] > [B] > [C]"


def test_fit_passage_words_shrinks_until_the_prompt_fits():
    tokens = lambda words: 100 + 10 * words  # noqa: E731  (10 passages of one token a word)
    assert rr.fit_passage_words(tokens, 10_000, 300, 10) == 300
    fitted = rr.fit_passage_words(tokens, 1_000, 300, 10)
    assert fitted is not None and tokens(fitted) <= 1_000 and tokens(fitted + 5) > 1_000 - 50
    assert rr.fit_passage_words(tokens, 105, 300, 10) is None


def test_shuffles_start_with_the_input_order_and_follow_the_seed():
    first = rr.shuffles(5, 3, random.Random(7))
    assert first[0] == [0, 1, 2, 3, 4] and all(sorted(o) == list(range(5)) for o in first)
    assert first == rr.shuffles(5, 3, random.Random(7)) and len(rr.shuffles(5, 1, random.Random(7))) == 1


@pytest.mark.parametrize("change, field", [
    ({"query": "  "}, "query"), ({"passages": ()}, "passages"), ({"window_size": 1}, "window_size"),
    ({"window_size": 27}, "window_size"), ({"stride": 20}, "stride"), ({"stride": 0}, "stride"),
    ({"permutations": 0}, "permutations"), ({"max_passage_words": 0}, "max_passage_words"),
    ({"mode": "x"}, "mode"), ({"aggregation": "x"}, "aggregation"),
])
def test_bad_params_name_the_field(change, field):
    params = dict(query="q", passages=("a", "b"))
    with pytest.raises(InvalidArgument) as error:
        rr.RerankParams(**(params | change)).validate()
    assert error.value.field == field
