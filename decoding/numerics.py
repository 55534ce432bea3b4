"""Safe float32 arithmetic for fusing logits of several models: −inf for excluded tokens, never NaN.

    sanitize(z)        float32 copy; non-finite entries (−inf from a mask, NaN, +inf) become NEG, a large finite
                       negative, so linear combinations never produce NaN or a winning +inf
    kl_divergence(a,b) KL(P‖Q) = Σ_v p(v)·(log p(v) − log q(v)) from log-probabilities, p = exp(a); terms with
                       p(v) = 0 contribute 0
    mask_to_neg_inf    applies a keep-mask with −inf at the very end, keeping at least one token per row
"""

from __future__ import annotations

import torch

NEG = torch.finfo(torch.float32).min / 4


def sanitize(logits: torch.Tensor) -> torch.Tensor:
    """float32 copy with every non-finite entry replaced by NEG (an impossible token, not a NaN or a +inf winner)."""
    return torch.nan_to_num(logits.float(), nan=NEG, posinf=NEG, neginf=NEG)  # one pass (isfinite + where: four)


def kl_divergence(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(P‖Q) over the last dimension, from log-probabilities (argument order: the first is P, the reference-free
    side; `torch.nn.functional.kl_div(log_q, log_p, log_target=True)` is the same thing with its arguments swapped)."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def mask_to_neg_inf(scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """`scores` with −inf outside `keep`. A row that would keep nothing keeps its best-scoring token instead, so the
    next-token distribution is never all −inf (NaN)."""
    empty = ~keep.any(-1, keepdim=True)
    best = torch.zeros_like(keep).scatter(-1, scores.argmax(-1, keepdim=True), True)
    keep = keep | (empty & best)
    return scores.masked_fill(~keep, float("-inf"))
