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


class _ReversingReranker:
    """Control flow only: reverses the passages in one fake window and counts the queries it was asked to run."""

    def __init__(self):
        self.ran: list[str] = []

    async def run(self, job):
        from server.engines.base import Usage
        from server.strategies.rerank import RerankOutcome, WindowReport

        self.ran.append(job.params.query)
        count = len(job.params.passages)
        window = WindowReport(0, count, prompt_tokens=10 * count, completion_tokens=1, forward_passes=1,
                              latency_ms=5.0, passage_words=3)
        return RerankOutcome(list(reversed(range(count))), [window], Usage())


def _runs(n: int) -> list[dict]:
    return [{"query": f"q{i}", "hits": [{"qid": 100 + i, "docid": f"d{j}", "content": f"passage {j}"}
                                        for j in range(3)]} for i in range(n)]


def test_query_log_resumes_only_the_missing_queries(tmp_path):
    import argparse
    import asyncio

    from bench.rerank import QueryLog, rerank_queries
    from bench.run import Progress

    args = argparse.Namespace(window_size=2, stride=1)
    settings = {"config": "c.yaml", "model": "m", "max_model_len": 64, "window_size": 2, "stride": 1}
    path = tmp_path / "r.queries.jsonl"
    first = _ReversingReranker()
    asyncio.run(rerank_queries(first, _runs(2), "first_token", args, 1, Progress(1), QueryLog(path, settings, False)))
    assert first.ran == ["q0", "q1"] and len(path.read_text().splitlines()) == 2

    again = _ReversingReranker()
    log = QueryLog(path, settings, resume=True)
    result = asyncio.run(rerank_queries(again, _runs(3), "first_token", args, 1, Progress(1), log))
    assert again.ran == ["q2"]  # q0 and q1 come from the log
    assert result["resumed_queries"] == 2 and result["rankings"] == [[2, 1, 0]] * 3
    assert result["forward_passes"] == 3 and result["prompt_tokens_per_window"] == 30
    asyncio.run(rerank_queries(again, _runs(1), "generate", args, 1, Progress(1), log))
    assert again.ran == ["q2", "q0"]  # another mode is another entry
    assert len(path.read_text().splitlines()) == 4

    with path.open("a") as log:  # a stopped run's half-written last line: that query runs again
        log.write('{"settings": {"config"')
    assert len(QueryLog(path, settings, resume=True).kept) == 4
    with pytest.raises(SystemExit, match="other --name"):
        QueryLog(path, settings | {"stride": 2}, resume=True)
    QueryLog(path, settings, resume=False)  # a fresh run starts an empty log
    assert path.read_text() == ""
