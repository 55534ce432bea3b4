"""Refusal steering at the first reply token (Jain et al. 2025, refusal tokens).

Markers: per refusal category c, token-id sequences — token mode: the category's single refusal token (a model trained
with [refuse]/[respond]-style tokens); prefix mode: the ids of reply prefixes such as "I'm sorry" (any model; only
their first tokens are read). With p = softmax(z / T_s) over the whole vocabulary at the first reply position:

    P_c        = Σ_{v ∈ first tokens of c} p(v)
    P_respond  = p([respond])  (token mode)   or   1 − Σ_c P_c  (prefix mode)
    c*         = argmax_c P_c  (ties: the first declared);  C = controlled categories (default: all)

    argmax      refuse with c* iff c* ∈ C and P_c* ≥ P_respond (ties refuse; the reference's θ = −1 default)
    threshold   c* ∉ C: leave the model alone; else refuse with c* iff P_c* ≥ θ_c* (θ ≤ 0: always, θ > 1: never)
    logit_bias  S_c = max_{v ∈ c} z_v/T_s + b_c (b_c only for c ∈ C); S_respond = z_[respond]/T_s, or in prefix mode
                the best token that is no category's first token; the best of the S wins (ties: categories first,
                in declared order); a winning category outside C leaves the model alone. With one category this is
                refusing iff q = p_r / (p_r + p_s) ≥ σ(−b): a threshold on the two-way probability, not on p_r.

Actions: refuse → force c*'s marker sequence whose first token is most probable (prefix mode: the whole prefix);
respond → force [respond] (token mode) or ban every category's first tokens at this step (prefix mode);
none → nothing. Example: p = {refuse 0.30, respond 0.60, other 0.10}: argmax → respond; θ = 0.25 → refuse;
θ = 0.5 → respond; bias b → refuse iff b ≥ ln 2.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from decoding.errors import InvalidArgument

MODES = ("argmax", "threshold", "logit_bias")


@dataclasses.dataclass(frozen=True)
class RefusalMarkers:
    categories: dict[str, tuple[tuple[int, ...], ...]]
    respond_id: int | None = None

    def first_tokens(self, category: str) -> tuple[int, ...]:
        return tuple(dict.fromkeys(seq[0] for seq in self.categories[category]))

    def validate(self) -> None:
        owner: dict[int, str] = {}
        if not self.categories:
            raise ValueError("no refusal categories")
        for category, sequences in self.categories.items():
            if not sequences or any(not seq for seq in sequences):
                raise ValueError(f"category {category!r} has an empty marker")
            for token in self.first_tokens(category):
                if token in owner and owner[token] != category:
                    raise ValueError(f"token id {token} starts markers of both {owner[token]!r} and {category!r}")
                owner[token] = category
        if self.respond_id is not None and self.respond_id in owner:
            raise ValueError(f"the respond token {self.respond_id} is also a refusal marker")


@dataclasses.dataclass(frozen=True)
class RefusalParams:
    mode: str = "argmax"
    threshold: float = 0.5
    thresholds: dict[str, float] = dataclasses.field(default_factory=dict)
    bias: float = 0.0
    biases: dict[str, float] = dataclasses.field(default_factory=dict)
    controlled: tuple[str, ...] = ()
    softmax_temperature: float = 1.0


@dataclasses.dataclass(frozen=True)
class RefusalDecision:
    action: str  # "refuse" | "respond" | "none"
    category: str | None
    forced: tuple[int, ...]
    banned: tuple[int, ...]
    probabilities: dict[str, float]
    respond_probability: float


def validate_params(params: RefusalParams, markers: RefusalMarkers) -> None:
    """Raises InvalidArgument naming the field (refusal_steering.*)."""
    known = list(markers.categories)

    def check_category(field: str, name: str) -> None:
        if name not in markers.categories:
            raise InvalidArgument(field, f"unknown refusal category {name!r}; this model's categories: {known}")

    if params.mode not in MODES:
        raise InvalidArgument("refusal_steering.mode", f"must be one of {MODES}")
    if not math.isfinite(params.threshold):
        raise InvalidArgument("refusal_steering.threshold", "must be finite")
    if not math.isfinite(params.bias):
        raise InvalidArgument("refusal_steering.bias", "must be finite")
    if not (math.isfinite(params.softmax_temperature) and params.softmax_temperature > 0):
        raise InvalidArgument("refusal_steering.softmax_temperature", f"must be > 0, got {params.softmax_temperature}")
    for field, values in (("thresholds", params.thresholds), ("biases", params.biases)):
        for name, value in values.items():
            check_category(f"refusal_steering.{field}", name)
            if not math.isfinite(value):
                raise InvalidArgument(f"refusal_steering.{field}", f"{name}: must be finite")
    for name in params.controlled:
        check_category("refusal_steering.categories", name)


def decide(logits: torch.Tensor, markers: RefusalMarkers, params: RefusalParams) -> RefusalDecision:
    scaled = logits.float() / params.softmax_temperature
    p = torch.softmax(scaled, dim=-1)
    names = list(markers.categories)
    firsts = {c: list(markers.first_tokens(c)) for c in names}
    probabilities = {c: float(p[firsts[c]].sum()) for c in names}
    respond_probability = (float(p[markers.respond_id]) if markers.respond_id is not None
                           else max(0.0, 1.0 - sum(probabilities.values())))
    controlled = set(params.controlled or names)
    top = max(names, key=lambda c: (probabilities[c], -names.index(c)))

    if params.mode == "argmax":
        action = "none" if top not in controlled else (
            "refuse" if probabilities[top] >= respond_probability else "respond")
    elif params.mode == "threshold":
        action = "none" if top not in controlled else (
            "refuse" if probabilities[top] >= params.thresholds.get(top, params.threshold) else "respond")
    else:
        scores = {c: float(scaled[firsts[c]].max()) + (params.biases.get(c, params.bias) if c in controlled else 0.0)
                  for c in names}
        if markers.respond_id is not None:
            respond_score = float(scaled[markers.respond_id])
        else:
            others = torch.ones_like(scaled, dtype=torch.bool)
            others[[t for c in names for t in firsts[c]]] = False
            respond_score = float(scaled[others].max())
        top = max(names, key=lambda c: (scores[c], -names.index(c)))
        action = "respond" if respond_score > scores[top] else ("refuse" if top in controlled else "none")

    forced, banned, category = (), (), None
    if action == "refuse":
        category = top
        forced = max(markers.categories[top], key=lambda seq: float(p[seq[0]]))  # ties: the first declared
    elif action == "respond":
        if markers.respond_id is not None:
            forced = (markers.respond_id,)
        else:
            banned = tuple(sorted(t for c in names for t in firsts[c]))
    return RefusalDecision(action=action, category=category, forced=tuple(forced), banned=banned,
                           probabilities=probabilities, respond_probability=respond_probability)
