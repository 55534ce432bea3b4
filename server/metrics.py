"""Chorus's Prometheus metrics, recorded with Ray Serve's own metrics API (`ray.serve.metrics`) and exported where
Ray exports every metric: each node's metrics agent (`chorus serve --metrics-port`, default 8080, on a local
cluster; `ray start --metrics-export-port` on a cluster). Ray prefixes the names with `ray_` (counters also get
`_total`) and adds the tags `application`, `deployment` and `replica`; deploy/grafana-dashboard.json charts them.

Front end (per RPC): requests by RPC, model, strategy and status; latency; prompt and completion tokens; forward
passes per model that ran. Group replicas: time to the first token and between tokens, measured where the tokens are
made (from the request's arrival at the replica, so queueing counts and the hop to the front end does not); and,
sampled every `LOAD_SAMPLE_S`, the sequences running, the requests waiting and the KV cache in use in each
replica's engine.
"""

from __future__ import annotations

import asyncio
import time

from ray.serve import metrics

LATENCY_BUCKETS_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]
TOKEN_BUCKETS_S = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5]
LOAD_SAMPLE_S = 1.0


class FrontendMetrics:
    """One per front-end replica: what each RPC asked for and how it ended."""

    def __init__(self):
        by_call = ("rpc", "model", "strategy")
        self._requests = metrics.Counter(
            "chorus_requests", description="RPCs answered, by final status code",
            tag_keys=(*by_call, "status"))
        self._latency = metrics.Histogram(
            "chorus_request_latency_seconds", description="Time from an RPC's arrival to its last message",
            boundaries=LATENCY_BUCKETS_S, tag_keys=by_call)
        self._prompt_tokens = metrics.Counter(
            "chorus_prompt_tokens", description="Prompt tokens of answered requests", tag_keys=by_call)
        self._completion_tokens = metrics.Counter(
            "chorus_completion_tokens", description="Tokens generated (delivered, for a stream that ended early)",
            tag_keys=by_call)
        self._forward_passes = metrics.Counter(
            "chorus_forward_passes", description="Forward passes run for requests, by the model that ran them "
            "(the base model and each guide)", tag_keys=("model",))

    def record(self, rpc: str, model: str, strategy: str, status: str, latency_s: float, prompt_tokens: int,
               completion_tokens: int, forward_passes: dict[str, int]) -> None:
        tags = {"rpc": rpc, "model": model, "strategy": strategy}
        self._requests.inc(tags={**tags, "status": status})
        self._latency.observe(latency_s, tags=tags)
        if prompt_tokens:
            self._prompt_tokens.inc(prompt_tokens, tags=tags)
        if completion_tokens:
            self._completion_tokens.inc(completion_tokens, tags=tags)
        for ran, passes in forward_passes.items():
            if passes:
                self._forward_passes.inc(passes, tags={"model": ran})


class TokenClock:
    """Times one request's tokens as its chunks come out of the engine: the first chunk's arrival is the time to
    the first token; each later chunk of k tokens, t seconds after the one before, adds k inter-token times of t/k."""

    def __init__(self, first_token: metrics.Histogram, inter_token: metrics.Histogram, tags: dict[str, str]):
        self._first_token, self._inter_token, self._tags = first_token, inter_token, tags
        self._started = time.monotonic()
        self._last: float | None = None

    def tokens(self, count: int) -> None:
        if not count:
            return
        now = time.monotonic()
        if self._last is None:
            self._first_token.observe(now - self._started, tags=self._tags)
        else:
            for _ in range(count):
                self._inter_token.observe((now - self._last) / count, tags=self._tags)
        self._last = now


class GroupMetrics:
    """One per group replica: token timing of every generation, and the engine's load."""

    def __init__(self, group: str):
        self._group = group
        self._first_token = metrics.Histogram(
            "chorus_time_to_first_token_seconds", description="From a request's arrival at its group replica to "
            "its first token", boundaries=LATENCY_BUCKETS_S, tag_keys=("group", "strategy"))
        self._inter_token = metrics.Histogram(
            "chorus_inter_token_latency_seconds", description="Time between a request's tokens (a chunk of k "
            "tokens after t seconds counts k times t/k)", boundaries=TOKEN_BUCKETS_S, tag_keys=("group", "strategy"))
        self._running = metrics.Gauge(
            "chorus_running_sequences", description="Sequences decoding in the replica's engine",
            tag_keys=("group",))
        self._waiting = metrics.Gauge(
            "chorus_waiting_requests", description="Requests queued in the replica's engine for a free slot",
            tag_keys=("group",))
        self._kv_cache = metrics.Gauge(
            "chorus_kv_cache_usage", description="The base model's KV cache in use in the replica's engine, 0..1",
            tag_keys=("group",))

    def token_clock(self, strategy: str) -> TokenClock:
        return TokenClock(self._first_token, self._inter_token, {"group": self._group, "strategy": strategy})

    async def sample_load(self, engine) -> None:
        """Sets the load gauges every LOAD_SAMPLE_S seconds, for as long as the replica lives."""
        tags = {"group": self._group}
        while True:
            load = engine.load()
            self._running.set(load.running, tags=tags)
            self._waiting.set(load.waiting, tags=tags)
            self._kv_cache.set(load.kv_cache_usage, tags=tags)
            await asyncio.sleep(LOAD_SAMPLE_S)
