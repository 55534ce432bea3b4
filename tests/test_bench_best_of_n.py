"""bench/best_of_n.py's sampling of greedy replies and candidates: saved after every chunk, a stopped run goes on from
where it stopped, a file of another key is sampled again, one of fewer candidates is extended (control flow only: a fake engine
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
    # A complete file of 4 candidates serves n = 2 without sampling; n = 8 samples the 4 missing ones of each problem
    # (seeds going on from where the file stopped), another key samples everything again.
    again = _NamingEngine()
    assert asyncio.run(sample(again, cache, key, problems, 2, 4, Progress(1)))["n"] == 4 and again.sampled == []
    more = _NamingEngine()
    extended = asyncio.run(sample(more, cache, key, problems, 8, 4, Progress(1)))
    assert more.greedy_calls == [] and more.sampled == [f"p{i}" for i in range(10)]
    assert extended["n"] == 8 and extended["candidates"][3] == [f"p3-s{3 + k}" for k in range(8)]
    assert json.loads(cache.read_text()) == extended
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


def test_extending_a_stopped_extension_goes_on_per_problem(tmp_path):
    cache, key = candidates_cache(tmp_path, "deploy/local.yaml", "m", 6, 16)
    problems = _problems(6)
    asyncio.run(sample(_NamingEngine(), cache, key, problems, 2, 4, Progress(1)))
    # n 4, batch 4: two problems a chunk; stopped after the first chunk of the extension
    with pytest.raises(RuntimeError, match="stopped"):
        asyncio.run(sample(_NamingEngine(fail_after=2), cache, key, problems, 4, 4, Progress(1)))
    saved = json.loads(cache.read_text())
    assert saved["n"] == 4 and [len(c) for c in saved["candidates"]] == [4, 4, 2, 2, 2, 2]
    engine = _NamingEngine()
    done = asyncio.run(sample(engine, cache, key, problems, 4, 4, Progress(1)))
    assert engine.sampled == ["p2", "p3", "p4", "p5"]
    assert done["candidates"] == [[f"p{i}-s{i + k}" for k in range(4)] for i in range(6)]
