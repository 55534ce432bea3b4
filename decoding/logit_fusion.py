"""Logit fusion of a large model L with a small base S and small experts S_t (ALGORITHMS.md section 2).

All models see the same token ids; logits are float32 over the shared vocabulary. With M = log_softmax(z) per model
(a per-row shift of the logits, which changes no distribution, ALGORITHMS.md 0.1):

    P̃(α) = softmax(M_L + Σ_t α_t · (M_{S_t} − M_S))

Static (proxy-tuning, Liu et al.; EFT up-scaling): α fixed, 1.0 by default.

Dynamic logit fusion (Fan et al. 2024): per step, with P = softmax(M_L), Q = softmax(M_S), Q_t = softmax(M_{S_t}),

    α* = argmin_α Σ_t (KL(P̃(α)‖P) − KL(Q_t‖Q))² + (KL(P‖P̃(α)) − KL(Q‖Q_t))²

searched over one-hot candidates α = a·e_t (one expert active, a on the grid {0, step, ..., max}), T·K candidates in
expert-major order; the first minimum wins (every a = 0 candidate is the same, so ties go to (t = 0, a = 0)).
Losses within TIE_RTOL · min + TIE_ATOL · Σ_t (KL(Q_t‖Q)² + KL(Q‖Q_t)²) of the minimum count as ties: mathematically
equal losses (with L = S, a = 1 on either of two experts gives the same loss) differ by float noise between a
batched and a recomputed forward, and must not flip the choice; the second term, scaled to the targets, gives an
exact-zero minimum a band too, far below the loss of a neighbouring grid point.
Identity check: if M_L = M_S and one expert, α = 1 gives P̃ = Q_1 and loss 0, so α* = 1.

The two KLs of a candidate come without materialising log P̃ over the vocabulary: with Δ = M_{S_t} − M_S and
log Z(a) = logsumexp(M_L + a·Δ) (M_L is normalised), log P̃ = M_L + a·Δ − log Z, so

    KL(P̃‖P) = a · E_P̃[Δ] − log Z        KL(P‖P̃) = log Z − a · E_P[Δ]

one exp pass and one reduction per candidate, no log-softmax over the [B, T·K, V] candidates.
"""

from __future__ import annotations

import torch

from decoding.numerics import kl_divergence, sanitize

TIE_RTOL = 1e-3
TIE_ATOL = 1e-8


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(sanitize(logits), dim=-1)


def static_fusion(large_logits: torch.Tensor, small_base_logits: torch.Tensor, expert_logits: torch.Tensor,
                  alphas) -> torch.Tensor:
    """Scores [B, V] = log P̃(α) for the fixed α [T]; expert_logits is [T, B, V]."""
    large, small, experts = _log_probs(large_logits), _log_probs(small_base_logits), _log_probs(expert_logits)
    alphas = torch.as_tensor(alphas, dtype=torch.float32, device=large.device).reshape(-1, 1, 1)
    return torch.log_softmax(large + (alphas * (experts - small)).sum(0), dim=-1)


def alpha_grid(maximum: float = 2.0, step: float = 0.1) -> torch.Tensor:
    """{0, step, 2·step, ..., maximum}, built from integers so that k/10 is exact where step = 1/10 (1.0 is 1.0)."""
    points = round(maximum / step)
    per_unit = round(1 / step)
    if abs(per_unit * step - 1) < 1e-9:
        return torch.arange(points + 1, dtype=torch.float64).div(per_unit).float()
    return (torch.arange(points + 1, dtype=torch.float64) * step).float()


def dynamic_fusion(large_logits: torch.Tensor, small_base_logits: torch.Tensor, expert_logits: torch.Tensor,
                   grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (scores [B, V] = log P̃(α*), α* [B, T]); expert_logits is [T, B, V], grid is [K]."""
    large, small, experts = _log_probs(large_logits), _log_probs(small_base_logits), _log_probs(expert_logits)
    num_experts, batch, _ = experts.shape
    grid = grid.to(device=large.device, dtype=torch.float32)
    forward_targets = kl_divergence(experts, small.unsqueeze(0))   # [T, B]  KL(Q_t‖Q)
    reverse_targets = kl_divergence(small.unsqueeze(0), experts)   # [T, B]  KL(Q‖Q_t)
    deltas = (experts - small.unsqueeze(0)).transpose(0, 1)        # [B, T, V]
    # Candidates k = t·K + j, a = grid[j]: weights e^(M_L + a·Δ_t − max) [B, T, K, V], built in place.
    tilted = torch.addcmul(large[:, None, None, :], grid[None, None, :, None], deltas[:, :, None, :])
    top = tilted.amax(-1, keepdim=True)
    total = tilted.sub_(top).exp_().sum(-1)                        # [B, T, K]
    log_z = top.squeeze(-1) + total.log()
    tilted_mean = torch.einsum("btkv,btv->btk", tilted, deltas) / total     # E_P̃[Δ_t]
    base_mean = torch.einsum("bv,btv->bt", large.exp(), deltas)[..., None]  # E_P[Δ_t]
    forward = (grid * tilted_mean - log_z).reshape(batch, -1)      # [B, T·K]  KL(P̃‖P)
    reverse = (log_z - grid * base_mean).reshape(batch, -1)        # [B, T·K]  KL(P‖P̃)
    loss = ((forward.unsqueeze(-1) - forward_targets.T.unsqueeze(1)) ** 2
            + (reverse.unsqueeze(-1) - reverse_targets.T.unsqueeze(1)) ** 2).sum(-1)
    scale = (forward_targets ** 2 + reverse_targets ** 2).sum(0).unsqueeze(-1)  # [B, 1]
    floor = loss.min(dim=-1, keepdim=True).values
    best = (loss <= floor * (1 + TIE_RTOL) + TIE_ATOL * scale).int().argmax(dim=-1)  # the first (near-)minimum
    rows, expert, alpha = torch.arange(batch), best // len(grid), grid[best % len(grid)]
    weights = torch.zeros(batch, num_experts, device=large.device)
    weights[rows, expert] = alpha
    return torch.log_softmax(large + alpha[:, None] * deltas[rows, expert], dim=-1), weights
