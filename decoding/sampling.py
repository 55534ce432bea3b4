"""Sampling parameters and the batched sampler.

Every row of a batch has its own temperature T, top-k, top-p and random generator:

    scores  = logits / T                                (T = 0: greedy, argmax of the raw logits)
    keep    = rank(v) < k                               (top-k; k = 0 keeps all)
            ∧ Σ_{u ranked before v} softmax(scores)(u) < p   (top-p: the smallest head with mass ≥ p)
    p(v)    ∝ exp(scores(v)) · [v ∈ keep]
    token   ~ p, drawn with the row's own torch.Generator

The masks equal transformers' TemperatureLogitsWarper → TopKLogitsWarper → TopPLogitsWarper for a single row
(tests/test_sampling.py checks that); here the knobs vary per row and the work is done on the whole batch at once.
Because each request owns its generator and draws exactly one number per step, a seed gives the same sample
whatever else shares the batch.
"""

from __future__ import annotations

import dataclasses
import math
import secrets

import torch

from decoding.errors import InvalidArgument


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def validate(self) -> "SamplingParams":
        """Raises InvalidArgument naming the first bad field; returns self so calls can chain."""
        if self.max_tokens < 1:
            raise InvalidArgument("sampling.max_tokens", f"must be >= 1, got {self.max_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidArgument("sampling.temperature", f"must be >= 0 (0 = greedy), got {self.temperature}")
        if not (0 < self.top_p <= 1) or math.isnan(self.top_p):
            raise InvalidArgument("sampling.top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidArgument("sampling.top_k", f"must be >= 0 (0 = off), got {self.top_k}")
        if self.seed is not None and not (0 <= self.seed < 2**63):
            raise InvalidArgument("sampling.seed", f"must be in [0, 2^63), got {self.seed}")
        for i, s in enumerate(self.stop):  # how many and how long: the server's limits (frontend.limits)
            if not s:
                raise InvalidArgument(f"sampling.stop[{i}]", "empty: a stop string needs at least one character")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def request_seed(self) -> int:
        """The seed of the request's generator: the one asked for, else a fresh random one (reported back)."""
        return self.seed if self.seed is not None else secrets.randbits(63)


def _filtered_scores(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                     top_p: torch.Tensor) -> torch.Tensor:
    """Temperature-scaled scores with tokens outside top-k / top-p set to -inf. Rows: sampled requests only."""
    scores = logits / temperature.unsqueeze(1)
    needs_filter = bool(((top_k > 0) | (top_p < 1)).any())
    if not needs_filter:
        return scores
    sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
    vocab = scores.shape[-1]
    ranks = torch.arange(vocab, device=scores.device).unsqueeze(0)
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab)).unsqueeze(1)
    drop_sorted = ranks >= k
    probs = torch.softmax(sorted_scores.masked_fill(drop_sorted, -math.inf), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted |= (mass_before >= top_p.unsqueeze(1)) & (top_p < 1).unsqueeze(1)
    drop_sorted[:, 0] = False  # the most likely token always survives
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return scores.masked_fill(drop, -math.inf)


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
           ) -> torch.Tensor:
    """Draws one token per row of `logits` [B, V] (float32) under that row's params and generator.

    Greedy rows (temperature 0) take the argmax and leave their generator untouched.
    """
    tokens = torch.argmax(logits, dim=-1)
    sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
    if not sampled_rows:
        return tokens
    rows = torch.tensor(sampled_rows, device=logits.device)
    temperature = torch.tensor([params[i].temperature for i in sampled_rows], device=logits.device)
    top_k = torch.tensor([params[i].top_k for i in sampled_rows], device=logits.device)
    top_p = torch.tensor([params[i].top_p for i in sampled_rows], device=logits.device)
    probs = torch.softmax(_filtered_scores(logits[rows], temperature, top_k, top_p), dim=-1)
    for j, i in enumerate(sampled_rows):
        tokens[i] = torch.multinomial(probs[j], 1, generator=generators[i])[0]
    return tokens


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator
