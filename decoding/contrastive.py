"""The contrastive decoding family (Li et al. 2023; O'Brien & Lewis 2023; USCD; STEER): scores [B, V] in float32, −inf = excluded; the next
token is argmax(scores) or a sample from softmax(scores / T_out). Rows fuse independently; every knob (α, β, τ_a,
λ, η, w_s, w_l, γ) is a float for all rows or a [B] tensor, one value per row.

Contrastive decoding, O'Brien & Lewis β formulation (Li et al. 2023 is β → ∞ with the amateur temperature τ_a):

    cd(v) = (1+β)·log p_e(v) − β·log softmax(z_a / τ_a)(v)        on V_head = {v : p_e(v) ≥ α · max_w p_e(w)}
    cd(v) = −inf                                                    elsewhere

Log-probabilities instead of raw logits change each term by a per-row constant only, so the distribution is the
same (softmax is shift-invariant); they keep the cutoff log α + max log p_e well scaled. β = 0 gives the masked expert.
Example (α = 0.1, β = 0.5): z_e = [2, 1.8, −1], z_a = [3, 0, 0] → softmax(cd) ≈ [0.2315, 0.7685, 0].

USCD (Wang et al. 2024), one model under the standard prompt (p_s) and the lame prompt (p_l):

    μ = std_v p_s(v)                                     (unbiased; large μ = peaked = confident)
    μ > λ:  score = log p_s                               (no contrast)
    μ ≤ λ:  score(v) = log(w_s·p_s(v) + w_l·p_l(v))  for v ∈ K = {p_s(v) ≥ η / V} with a positive mixture, else −inf

The contrast is in probability space. If nothing survives (possible with w_l < 0), the standard argmax is kept.
Since mean_v p_s = 1/V, μ ≤ 1/√V (equality for a one-hot p_s): λ ≥ 1/√V contrasts every step, so λ is on a scale
set by the vocabulary (the released λ = 0.005 was tuned on CodeLlama's V = 32000, where 1/√V ≈ 0.0056).

STEER (O'Neill et al. 2023), fine-tuned model F on the prompt, its base B on the prompt, F on the negative context:

    score = log_softmax((1+γ)·log p_F − γ·log p_B − η·log p_F|neg)

γ = η = 0 gives log p_F.
"""

from __future__ import annotations

import torch

from decoding.numerics import mask_to_neg_inf, sanitize


def _per_row(value, like: torch.Tensor) -> torch.Tensor:
    """A knob given as a float or a [B] tensor, shaped [B, 1] for broadcasting over the vocabulary."""
    return torch.as_tensor(value, dtype=torch.float32, device=like.device).reshape(-1, 1)


def contrastive_scores(expert_logits: torch.Tensor, amateur_logits: torch.Tensor, alpha, beta,
                       amateur_temperature=1.0) -> torch.Tensor:
    log_e = torch.log_softmax(sanitize(expert_logits), dim=-1)
    log_a = torch.log_softmax(sanitize(amateur_logits) / _per_row(amateur_temperature, log_e), dim=-1)
    beta = _per_row(beta, log_e)
    cutoff = torch.log(_per_row(alpha, log_e)) + log_e.max(dim=-1, keepdim=True).values
    return mask_to_neg_inf((1 + beta) * log_e - beta * log_a, log_e >= cutoff)


def uscd_scores(standard_logits: torch.Tensor, lame_logits: torch.Tensor, uncertainty_threshold, eta,
                weight_standard, weight_lame) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (scores, contrasted [B] bool)."""
    log_s = torch.log_softmax(sanitize(standard_logits), dim=-1)
    p_s, p_l = log_s.exp(), torch.softmax(sanitize(lame_logits), dim=-1)
    vocab = p_s.shape[-1]
    contrasted = p_s.std(dim=-1) <= _per_row(uncertainty_threshold, p_s).squeeze(1)
    mixture = _per_row(weight_standard, p_s) * p_s + _per_row(weight_lame, p_s) * p_l
    keep = (p_s >= _per_row(eta, p_s) / vocab) & (mixture > 0)
    standard_argmax = torch.zeros_like(keep).scatter(-1, log_s.argmax(-1, keepdim=True), True)
    keep = torch.where(keep.any(-1, keepdim=True), keep, standard_argmax)  # nothing survived: the standard argmax
    fused = torch.log(mixture.clamp_min(torch.finfo(torch.float32).tiny)).masked_fill(~keep, float("-inf"))
    return torch.where(contrasted.unsqueeze(1), fused, log_s), contrasted


def steer_scores(fine_tuned_logits: torch.Tensor, base_logits: torch.Tensor, negative_logits: torch.Tensor,
                 gamma, eta) -> torch.Tensor:
    log_f = torch.log_softmax(sanitize(fine_tuned_logits), dim=-1)
    log_b = torch.log_softmax(sanitize(base_logits), dim=-1)
    log_n = torch.log_softmax(sanitize(negative_logits), dim=-1)
    gamma, eta = _per_row(gamma, log_f), _per_row(eta, log_f)
    return torch.log_softmax((1 + gamma) * log_f - gamma * log_b - eta * log_n, dim=-1)

