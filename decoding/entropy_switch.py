"""Entropy-adaptive model switching (Simonds 2025, "Entropy Adaptive Decoding: Dynamic Model Switching for Efficient
Inference", arXiv 2502.06833): a small model M_S writes while it is sure, a large model M_L (the base) takes over
while the text is uncertain. One model is active at each position; only it runs a forward there.

    H_t  = −Σ_v p_v·log₂ p_v,  p = softmax(z_t)        the active model's raw logits, before temperature, in bits
    H̄_t  = mean(H_{t−w+1}, …, H_t)                    rolling mean over the last w steps (fewer while t < w);
                                                        across a switch it mixes both models' entropies
    c    = tokens the active model has written since it became active (this one included)
    next = M_L if H̄_t > τ else M_S,   when c ≥ d_min;  otherwise the active model stays
    a switch resets c to 0; the newly active model first catches up on the tokens written since it last ran (one
    multi-token forward extending its KV cache, never a recompute of the prompt).

Defaults: window w = 5, minimum span d_min = 10, start on M_S. The sources print ">"/"≥" inconsistently; here the
large model is chosen iff H̄ > τ (strictly), so τ = +∞ never leaves M_S and τ = −∞ with d_min = 0 moves to M_L after
the first token. There is no recommended τ (the paper sweeps it): a group's config carries a calibrated one.

Cost: with f_L the fraction of tokens M_L writes and P_S, P_L the models' parameter counts, the compute per token
relative to large-only decoding is f_L + (1 − f_L)·P_S/P_L (the paper's Qwen pair: 0.25 + 0.75·1.5/14 = 0.33), so
`compute_saved` = 1 − that; catch-up forwards come on top and are reported apart.

Hand example (w = 2, τ = 1.5, d_min = 2, start M_S): M_S writes with H = 2.0, 2.0 → H̄ = 2.0 > τ and c = 2: switch
to M_L. M_L writes with H = 0.0 → H̄ = 1.0 but c = 1 < 2: stay. M_L writes with H = 0.0 → H̄ = 0.0, c = 2: back to M_S.
"""

from __future__ import annotations

import collections
import dataclasses
import math

import torch

SMALL, LARGE = "small", "large"
_LN2 = math.log(2.0)


def entropy_bits(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in bits of softmax(logits) over the last dimension, float32; −inf entries (excluded tokens)
    contribute 0, so a one-hot row gives 0 and never NaN."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    p = log_p.exp()
    return -torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(-1) / _LN2


@dataclasses.dataclass
class SwitchState:
    """Where a sequence stands: the active model, the tokens it wrote since it became active, the window of the last
    w entropies (of whichever model wrote them)."""
    active: str
    span: int = 0
    window: collections.deque = dataclasses.field(default_factory=collections.deque)


def rolling_mean(window: collections.deque, entropy: float, size: int) -> float:
    """H̄: the mean of the last `size` entropies once `entropy` joins `window` (which is left as it is)."""
    last = [*window, entropy][-size:]
    return sum(last) / len(last)


def advance(state: SwitchState, entropy: float, threshold: float, window: int, min_span: int) -> float:
    """Records that the active model wrote a token with `entropy` (bits) and applies the switching rule; returns the
    rolling mean H̄ the rule saw. `state.active` is then the model for the next position."""
    rolling = rolling_mean(state.window, entropy, window)
    state.window.append(entropy)
    while len(state.window) > window:
        state.window.popleft()
    state.span += 1
    if state.span >= min_span:
        wanted = LARGE if rolling > threshold else SMALL
        if wanted != state.active:
            state.active, state.span = wanted, 0
    return rolling


def compute_saved(large_fraction: float, parameter_ratio: float) -> float:
    """1 − (f_L + (1 − f_L)·P_S/P_L): the share of large-only decoding's per-token compute not spent."""
    return 1.0 - (large_fraction + (1.0 - large_fraction) * parameter_ratio)


def threshold_for_fraction(rolling_entropies: list[float], large_fraction: float) -> float:
    """The threshold τ that a share `large_fraction` of the small model's rolling entropies exceeds: its
    (1 − large_fraction) quantile. An estimate of the switching threshold giving that large-model fraction: once
    the large model writes, its own (usually lower) entropies enter the window, and d_min delays switches, so the
    fraction a real run gives is measured apart (`chorus calibrate-entropy` runs both)."""
    if not rolling_entropies:
        raise ValueError("no entropies to calibrate on")
    if not 0 < large_fraction < 1:
        raise ValueError(f"the large-model fraction must be in (0, 1), got {large_fraction}")
    return float(torch.quantile(torch.tensor(rolling_entropies, dtype=torch.float64), 1 - large_fraction))
