"""bench/best_of_n.py's sampling of greedy replies and candidates: saved after every chunk, a stopped run goes on from
where it stopped, a file of another key or of fewer candidates is sampled again (control flow only: a fake engine
whose texts name the problem, the sample and the seed)."""

import asyncio
import json

import pytest

from bench.best_of_n import candidates_cache, row_points, sample
from bench.run import Progress


class _Chunk:
    def __init__(self, text: str):
        self.text = text


class _NamingEngine:
    """Greedy: "g<index>"; sample k of n: "p<index>-s<seed + k>". Raises after `fail_after` sample_n calls."""

    def __init__(self, fail_after: int | None = None):
        self.greedy_calls: list[str] = []
        self.sampled: list[str] = []
        self.fail_after = fail_after

    async def generate(self, request):
        self.greedy_calls.append(request.request_id)
        yield _Chunk(f"g{request.request_id[1:]}")

    async def sample_n(self, request, n):
        if self.fail_after is not None and len(self.sampled) >= self.fail_after:
            raise RuntimeError("stopped")
        self.sampled.append(request.request_id)
        return [_Chunk(f"{request.request_id}-s{request.sampling.seed + k}") for k in range(n)]


def _problems(count: int) -> list[dict]:
    return [{"question": f"q{i}", "gold": float(i)} for i in range(count)]


def test_sampling_is_saved_per_chunk_and_resumed(tmp_path):
    cache, key = candidates_cache(tmp_path, "deploy/local.yaml", "m", 10, 16)
    assert cache.name == "best-of-n-candidates-m-10x16.json"
    problems = _problems(10)
    # batch 4, n 4: greedy 4 problems at a time, candidates 2 problems (two batches of rows) at a time
    stopped = _NamingEngine(fail_after=3)
    with pytest.raises(RuntimeError, match="stopped"):
        asyncio.run(sample(stopped, cache, key, problems, 4, 4, Progress(1)))
    saved = json.loads(cache.read_text())
    assert saved["greedy"] == [f"g{i}" for i in range(10)] and len(saved["candidates"]) == 2  # the chunk (0, 1)
    assert not list(tmp_path.glob(".*.tmp"))
    engine = _NamingEngine()
    sampled = asyncio.run(sample(engine, cache, key, problems, 4, 4, Progress(1)))
    assert engine.greedy_calls == [] and engine.sampled == [f"p{i}" for i in range(2, 10)]
    assert sampled["candidates"][7] == ["p7-s7", "p7-s8", "p7-s9", "p7-s10"]
    assert json.loads(cache.read_text()) == sampled
    # A complete file of 4 candidates serves n = 2 without sampling; n = 8 or another key samples everything again.
    again = _NamingEngine()
    assert asyncio.run(sample(again, cache, key, problems, 2, 4, Progress(1)))["n"] == 4 and again.sampled == []
    more = _NamingEngine()
    assert len(asyncio.run(sample(more, cache, key, problems, 8, 4, Progress(1)))["candidates"][0]) == 8
    assert len(more.sampled) == 10 and len(more.greedy_calls) == 10
    other = _NamingEngine()
    asyncio.run(sample(other, cache, key | {"tokens": 32}, problems, 8, 4, Progress(1)))
    assert len(other.sampled) == 10


def test_a_partial_file_of_more_candidates_goes_on_with_as_many(tmp_path):
    cache, key = candidates_cache(tmp_path, "deploy/local.yaml", "m", 4, 16)
    cache.write_text(json.dumps({"key": key, "n": 8, "greedy": ["g0", "g1", "g2", "g3"], "greedy_s": 1.0,
                                 "candidates": [[f"p0-s{k}" for k in range(8)]], "candidates_s": 2.0}))
    sampled = asyncio.run(sample(_NamingEngine(), cache, key, _problems(4), 4, 16, Progress(1)))
    assert [len(c) for c in sampled["candidates"]] == [8, 8, 8, 8] and sampled["greedy_s"] >= 1.0


def test_row_points_give_greedy_once():
    assert row_points(["greedy", "random", "pointwise"], [4, 8]) == [
        ("greedy", 1), ("random", 4), ("random", 8), ("pointwise", 4), ("pointwise", 8)]
