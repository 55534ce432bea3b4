"""Logit fusion of a large model L with a small base S and small experts S_t (proxy-tuning, Liu et al. 2024; dynamic
logit fusion, Fan et al. 2024).

All models see the same token ids; logits are float32 over the shared vocabulary. With M = log_softmax(z) per model
(a per-row shift of the logits, which changes no distribution):

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

Both take a batch of rows [B, V] that fuse independently: static α may differ per row ([B, T]), and so may the dynamic
grid ([B, K], NaN-padded), so the rows of many requests fuse in one call.
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
    """Scores [B, V] = log P̃(α) for the fixed α: [T] (every row) or [B, T] (one α per row); expert_logits is
    [T, B, V]."""
    large, small, experts = _log_probs(large_logits), _log_probs(small_base_logits), _log_probs(expert_logits)
    alphas = torch.as_tensor(alphas, dtype=torch.float32, device=large.device)
    alphas = alphas.T.unsqueeze(-1) if alphas.dim() == 2 else alphas.reshape(-1, 1, 1)  # [T, B or 1, 1]
    return torch.log_softmax(large + (alphas * (experts - small)).sum(0), dim=-1)


def alpha_grid(maximum: float = 2.0, step: float = 0.1) -> torch.Tensor:
    """{0, step, 2·step, ..., maximum}, built from integers so that k/10 is exact where step = 1/10 (1.0 is 1.0)."""
    points = round(maximum / step)
    per_unit = round(1 / step)
    if abs(per_unit * step - 1) < 1e-9:
        return torch.arange(points + 1, dtype=torch.float64).div(per_unit).float()
    return (torch.arange(points + 1, dtype=torch.float64) * step).float()


# The candidates' weights [rows, T, K, V] are built for at most this many elements per pass over the rows (at least
# one row a pass), by device type: on a CPU about a cache's worth (at V = 49152, T = 2, K = 21 one row a pass; one pass
# over 16 rows streams ~130 MB through memory and ran ~3× slower); elsewhere ("other") only a bound on one pass's
# memory, so that a GPU searches a whole batch in one pass. Rows are independent: the passes change no result.
CANDIDATE_ELEMENTS = {"cpu": 1 << 21, "other": 1 << 28}


def _tilted_moments(large: torch.Tensor, deltas: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log Z(a), E_P̃[Δ_t]) [B, T, K] for large [B, V], deltas [B, T, V], grid [B, K]."""
    # Candidates k = t·K + j, a = grid[j]: weights e^(M_L + a·Δ_t − max) [B, T, K, V], built in place.
    tilted = torch.addcmul(large[:, None, None, :], grid[:, None, :, None], deltas[:, :, None, :])
    top = tilted.amax(-1, keepdim=True)
    total = tilted.sub_(top).exp_().sum(-1)                        # [B, T, K]
    return top.squeeze(-1) + total.log(), torch.einsum("btkv,btv->btk", tilted, deltas) / total


def dynamic_fusion(large_logits: torch.Tensor, small_base_logits: torch.Tensor, expert_logits: torch.Tensor,
                   grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (scores [B, V] = log P̃(α*), α* [B, T]); expert_logits is [T, B, V]. grid is [K] (every row) or [B, K]
    (one grid per row; a shorter grid padded at its end with NaN: those candidates are never chosen)."""
    large, small, experts = _log_probs(large_logits), _log_probs(small_base_logits), _log_probs(expert_logits)
    num_experts, batch, _ = experts.shape
    grid = grid.to(device=large.device, dtype=torch.float32)
    grid = grid.expand(batch, -1) if grid.dim() == 1 else grid     # [B, K]
    points = grid.shape[-1]
    padded = torch.isnan(grid)
    grid = grid.masked_fill(padded, 0.0)                           # padding: computed as a = 0, excluded below
    forward_targets = kl_divergence(experts, small.unsqueeze(0))   # [T, B]  KL(Q_t‖Q)
    reverse_targets = kl_divergence(small.unsqueeze(0), experts)   # [T, B]  KL(Q‖Q_t)
    deltas = (experts - small.unsqueeze(0)).transpose(0, 1)        # [B, T, V]
    budget = CANDIDATE_ELEMENTS.get(large.device.type, CANDIDATE_ELEMENTS["other"])
    per_pass = max(1, budget // (num_experts * points * large.shape[-1]))   # rows per pass
    moments = [_tilted_moments(*rows) for rows in zip(large.split(per_pass), deltas.split(per_pass),
                                                      grid.split(per_pass))]
    log_z, tilted_mean = (torch.cat(parts) for parts in zip(*moments))   # [B, T, K]: log Z(a), E_P̃[Δ_t]
    base_mean = torch.einsum("bv,btv->bt", large.exp(), deltas)[..., None]  # E_P[Δ_t]
    forward = (grid[:, None, :] * tilted_mean - log_z).reshape(batch, -1)   # [B, T·K]  KL(P̃‖P)
    reverse = (log_z - grid[:, None, :] * base_mean).reshape(batch, -1)     # [B, T·K]  KL(P‖P̃)
    loss = ((forward.unsqueeze(-1) - forward_targets.T.unsqueeze(1)) ** 2
            + (reverse.unsqueeze(-1) - reverse_targets.T.unsqueeze(1)) ** 2).sum(-1)
    loss = loss.masked_fill(padded.repeat(1, num_experts), float("inf"))
    scale = (forward_targets ** 2 + reverse_targets ** 2).sum(0).unsqueeze(-1)  # [B, 1]
    floor = loss.min(dim=-1, keepdim=True).values
    best = (loss <= floor * (1 + TIE_RTOL) + TIE_ATOL * scale).int().argmax(dim=-1)  # the first (near-)minimum
    rows, expert = torch.arange(batch, device=large.device), best // points
    alpha = grid[rows, best % points]
    weights = torch.zeros(batch, num_experts, device=large.device)
    weights[rows, expert] = alpha
    return torch.log_softmax(large + alpha[:, None] * deltas[rows, expert], dim=-1), weights
