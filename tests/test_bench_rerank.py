"""bench/rerank.py's metric: trec_eval's nDCG@10 on a hand example."""

import math

import pytest

from bench.rerank import ndcg_at


def test_ndcg_hand_example():
    judged = {"a": 0, "b": 3, "c": 1, "d": 2}  # d is judged but not retrieved: it still counts in the ideal order
    dcg = 0 + 3 / math.log2(3) + 1 / math.log2(4)
    ideal = 3 + 2 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at(["a", "b", "c", "x"], judged) == pytest.approx(dcg / ideal)
    assert ndcg_at(["b", "d", "c"], judged) == pytest.approx(1.0)
    assert ndcg_at(["x", "y"], {"x": 0}) == 0.0
    assert ndcg_at([str(i) for i in range(20)], {"15": 3}) == 0.0  # below the cut of 10
