"""An independent reference for the token-level strategies, written from the papers for the engine tests.

It imports nothing from the project (decoding/, server/): guide choice, prompt and system-prompt rendering, which
stream feeds which term, α broadcasting, the fusion math and refusal forcing are written here a second time, so
the engines are checked against something other than their own plans. It reads the group's guides (models, roles,
system prompts), the early-exit layers and the refusal prefixes from deploy/local.yaml with `yaml`, loads the
checkpoint with transformers, builds an early-exit model from the full model's hidden states (hidden state after
layer k, then the final norm and the head), and renders chats with the tokenizer's chat template.

Per step, on float32 logits z sliced to the tokenizer's vocabulary V, in float64 (scores; −inf = excluded; the
engines' greedy token is the argmax):

  cd       O'Brien & Lewis 2023 (arXiv 2309.09117), the β form on raw logits, with the adaptive plausibility
           constraint of Li et al. 2023 (arXiv 2210.15097) and Li's amateur temperature τ_a:
               s = (1+β)·z_e − β·z_a/τ_a  on {v : z_e(v) ≥ log α + max z_e},  α = 0.1, β = 0.5, τ_a = 1
  uscd     Wang et al. 2024 (arXiv 2409.05923), the released CodeLlama-7B run's knobs: the same model under the
           standard prompt (p_s) and the lame prompt (p_l); uncertain iff std_v p_s (unbiased) ≤ λ = 0.005, then
               s = log(w_s·p_s + w_l·p_l)  on {p_s ≥ η/V} where the mixture is positive,  η = 2/3, w = (1, −0.7)
           (a step where nothing survives keeps p_s's argmax); certain steps: s = log p_s
  steer    O'Neill et al. 2023 (arXiv 2308.07645): F = the base on the prompt, B = the guide on the prompt, F on
           the negative context (which replaces the prompt):
               s = log_softmax((1+γ)·log p_F − γ·log p_B − η·log p_F|neg),  γ = 0.2, η = 0.6
  static   proxy-tuning (Liu et al. 2024, arXiv 2401.08565) / EFT (Mitchell et al. 2023, arXiv 2310.12962), in
           logits: s = z_L + Σ_t α_t·(z_{S_t} − z_S); α = 1 per expert by default, one α given = that α for all
  dynamic  Fan et al. 2024 (arXiv 2406.15480): with M = log_softmax(z), P = softmax(M_L), Q = softmax(M_S),
           Q_t = softmax(M_{S_t}) and P̃(α) = softmax(M_L + Σ_t α_t·(M_{S_t} − M_S)), the loss
               Σ_t (KL(P̃‖P) − KL(Q_t‖Q))² + (KL(P‖P̃) − KL(Q‖Q_t))²
           over one-hot candidates α = a·e_t (one expert active per step, as in the paper's pseudo-code), a on the
           grid {0, 0.1, ..., 2.0}, candidates expert-major; the first minimum wins, where losses within
           1e-3 · min + 1e-8 · Σ_t (KL(Q_t‖Q)² + KL(Q‖Q_t)²) of the minimum count as ties (the engines' documented
           tie rule: equal losses must not flip on float noise); s = log P̃(α*). The engines compute the losses in
           float32, whose error can exceed that band (exactly equal losses, e.g. a = 1 on either of two experts
           when L = S, come out different); given the engine's reported α of a step (`weights`), the reference
           takes it instead where its loss is within that error of the minimum (`Trace.near_tie`)
  refusal  Jain et al. 2025 (arXiv 2412.06748), with reply prefixes in place of refusal tokens (a model without
           them): at the first step, p = softmax(z / T_s) over the whole vocabulary, P_c = Σ p over the distinct
           first tokens of category c's prefixes, P_respond = 1 − Σ_c P_c, c* = argmax_c P_c (ties: the first
           declared). argmax mode: refuse iff P_c* ≥ P_respond; threshold mode: refuse iff P_c* ≥ θ. Refuse = force
           the whole prefix of c* whose first token is most probable (ties: the first declared); respond = ban
           every category's first tokens at that step.
  switch   Simonds 2025 (arXiv 2502.06833), entropy-adaptive decoding: the base is the large model, the guide with
           role `small` the small one; the active model's raw logits are the step's scores; H = entropy in bits of
           its softmax; H̄ = the mean of the last w = 5 H (fewer at the start); after a token, once the active model
           has written d_min = 10 tokens since it became active, the large model writes next iff H̄ > τ (τ: the
           case's, else the group's `entropy_threshold`), else the small one; a switch restarts the count. Start:
           the small model unless the case says "large". A step whose H̄ is within float noise of τ when the rule
           fires is marked (`Trace.borderline`).

Two ways to get every step's logits: `literal_tokens` recomputes each stream's full forward at every step (the
research scripts' way, quadratic); `teacher_forced` runs one causal full forward per stream over its context and
the tokens under test, whose row t sees only the tokens before t, and replays the strategy over those rows: the
tokens under test are the reference's greedy tokens iff each is the reference's choice after the ones before it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY_FILE = REPO / "deploy" / "local.yaml"
GROUP_NAME = "smollm2"

_ARGS = yaml.safe_load(DEPLOY_FILE.read_text())["applications"][0]["args"]
MODELS: dict = _ARGS["models"]
GROUP: dict = _ARGS["groups"][GROUP_NAME]
BASE: str = GROUP["base"]
GUIDES: dict = GROUP["guides"]  # name → {model, roles, system_prompt?}, in declaration order
REFUSAL_PREFIXES: dict = GROUP["refusal"]["prefixes"]  # category → reply prefixes, in declaration order

# Paper defaults (see the module docstring).
CD_ALPHA, CD_BETA, CD_AMATEUR_TEMPERATURE = 0.1, 0.5, 1.0
USCD_LAMBDA, USCD_ETA, USCD_WEIGHTS = 0.005, 2 / 3, (1.0, -0.7)
STEER_GAMMA, STEER_ETA = 0.2, 0.6
PROXY_TUNING_ALPHA = 1.0
DLF_GRID = [k / 10 for k in range(21)]  # from integers: 1.0 is exactly 1.0
DLF_TIE_RTOL, DLF_TIE_ATOL = 1e-3, 1e-8
REFUSAL_THRESHOLD, REFUSAL_SOFTMAX_TEMPERATURE = 0.5, 1.0
SWITCH_WINDOW, SWITCH_MIN_SPAN = 5, 10
# A rolling entropy this close (bits) to τ may fall either way between float32 forwards and this float64 replay.
SWITCH_NOISE = 1e-3
# A USCD gate this close (relative) to λ may fall either way between two float32 forwards.
GATE_NOISE = 1e-4
# The error of a KL over ~50k tokens computed in float32, as the engines do (seen up to 4e-6): a DLF loss
# Σ (f − a)² + (r − b)² within 4·KL_NOISE·√min + 4·KL_NOISE² of the band is a tie within float noise.
KL_NOISE = 1e-5


def checkpoint_path(model: str) -> Path:
    """`embedded:<name>` → $CHORUS_CACHE (else ~/.cache/chorus)/models/<name>; any other path as is."""
    path = MODELS[model]["path"]
    if path.startswith("embedded:"):
        root = Path(os.environ.get("CHORUS_CACHE") or Path.home() / ".cache" / "chorus")
        return root / "models" / path.removeprefix("embedded:")
    return Path(path)


@functools.cache
def _checkpoint(path: Path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@functools.cache
def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(checkpoint_path(BASE))


@functools.lru_cache(maxsize=16)
def _forward(path: Path, ids: tuple[int, ...], keep: int):
    with torch.inference_mode():
        return _checkpoint(path)(torch.tensor([ids]), output_hidden_states=True, logits_to_keep=keep)


def logits(model: str, ids: tuple[int, ...], keep: int = 1) -> torch.Tensor:
    """[keep, V] float64: the next-token logits after each of the last `keep` prefixes of `ids` (the last row: after
    all of them). An early-exit model's logits are the full model's hidden state after its k-th layer through the
    final norm and the head."""
    path = checkpoint_path(model)
    out = _forward(path, ids, keep)
    layers = MODELS[model].get("early_exit_layers")
    if layers:
        full = _checkpoint(path)
        assert len(out.hidden_states) == full.config.num_hidden_layers + 1  # the embeddings, then each layer's output
        with torch.inference_mode():
            rows = full.lm_head(full.model.norm(out.hidden_states[layers][0, -keep:]))
    else:
        rows = out.logits[0]
    assert rows.shape[0] == keep
    return rows[:, :len(tokenizer())].double()


# ---- prompts ----

def render(context: dict) -> list[int]:
    """Token ids of a context {"messages": [...]} (the chat template, with the generation prompt) or {"prompt": s}
    (the raw text, with the tokenizer's own special tokens)."""
    tok = tokenizer()
    if context.get("messages"):
        text = tok.apply_chat_template(list(context["messages"]), add_generation_prompt=True, tokenize=False)
        return tok(text, add_special_tokens=False)["input_ids"]
    return tok(context["prompt"])["input_ids"]


def with_system_prompt(context: dict, system_prompt: str | None) -> dict:
    """An in-context expert's view of a context: its system prompt replaces the chat's system messages, or leads a
    raw prompt followed by a blank line."""
    if not system_prompt:
        return context
    if context.get("messages"):
        rest = [m for m in context["messages"] if m["role"] != "system"]
        return {"messages": [{"role": "system", "content": system_prompt}, *rest]}
    return {"prompt": f"{system_prompt}\n\n{context['prompt']}"}


def _default_guide(role: str) -> str:
    return next(name for name, g in GUIDES.items() if role in g["roles"])


def _experts(requested) -> list[str]:
    """Guides with an `expert:<task>` role, in declaration order, or those requested (by guide name or task)."""
    declared = [name for name, g in GUIDES.items() if any(r.startswith("expert:") for r in g["roles"])]
    if not requested:
        return declared
    return [next(g for g in declared if g == r or f"expert:{r}" in GUIDES[g]["roles"]) for r in requested]


def _guide_stream(guide: str, request: dict) -> tuple[str, tuple[int, ...]]:
    spec = GUIDES[guide]
    return spec["model"], tuple(render(with_system_prompt(request, spec.get("system_prompt"))))


# ---- the strategies ----

@dataclasses.dataclass
class Trace:
    tokens: list[int]  # the reference's choice at every step
    contrasted: list[bool]  # contrastive: whether each step contrasted
    borderline: list[bool]  # USCD: whether the step's gate is within float noise of λ
    weights: list[tuple[float, ...]]  # fusion: α per expert at every step
    near_tie: list[bool]  # dynamic fusion: the engine's α taken over the first minimum, within float noise
    refusal: dict | None  # action, category, probabilities, respond_probability, forced
    large: list[bool] = dataclasses.field(default_factory=list)  # entropy switch: the large model wrote the step
    entropies: list[float] = dataclasses.field(default_factory=list)  # entropy switch: the writer's H (bits)
    guide: str = ""  # contrastive: the guide (USCD: the base model); fusion: the small base
    experts: tuple[str, ...] = ()


class _Strategy:
    """Streams: role → (model, context ids); `scores(position, rows)` maps each role's logits row to scores.
    `engine_weights`: the engine's α per step, if it reported them (dynamic fusion's near ties)."""

    def __init__(self, case: dict, request: dict, engine_weights=None):
        self.case, self.request, self.engine_weights = case, request, engine_weights
        self.streams = {"base": (BASE, tuple(render(request)))}
        self.trace = Trace(tokens=[], contrasted=[], borderline=[], weights=[], near_tie=[], refusal=None)

    def knob(self, name, default):
        value = self.case.get(name)
        return default if value is None else value

    def forced(self, position: int) -> int | None:
        return None

    def choose(self, position: int, rows: dict[str, torch.Tensor]) -> int:
        scores = self.scores(position, rows)
        forced = self.forced(position)
        token = forced if forced is not None else int(scores.argmax())
        self.trace.tokens.append(token)
        return token


class _Contrastive(_Strategy):
    def __init__(self, case, request, engine_weights=None):
        super().__init__(case, request, engine_weights)
        self.mode = self.knob("mode", "cd")
        if self.mode == "uscd":
            self.trace.guide = BASE
            self.streams["lame"] = (BASE, tuple(render(case["contrast_context"])))
        elif self.mode == "cd":
            self.trace.guide = self.knob("guide", "") or _default_guide("amateur")
            self.streams["amateur"] = _guide_stream(self.trace.guide, request)
        else:
            self.trace.guide = self.knob("guide", "") or _default_guide("small_base")
            self.streams["weak"] = _guide_stream(self.trace.guide, request)
            self.streams["negative"] = (BASE, tuple(render(case["contrast_context"])))

    def scores(self, position, rows):
        contrasted, borderline = True, False
        if self.mode == "cd":
            alpha, beta = self.knob("alpha", CD_ALPHA), self.knob("beta", CD_BETA)
            z_e, z_a = rows["base"], rows["amateur"] / self.knob("amateur_temperature", CD_AMATEUR_TEMPERATURE)
            head = z_e >= math.log(alpha) + z_e.max()
            scores = ((1 + beta) * z_e - beta * z_a).masked_fill(~head, -math.inf)
        elif self.mode == "uscd":
            scores, contrasted, borderline = self._uscd(rows["base"], rows["lame"])
        else:
            gamma, eta = self.knob("gamma", STEER_GAMMA), self.knob("eta", STEER_ETA)
            log_f, log_b, log_n = (torch.log_softmax(rows[r], -1) for r in ("base", "weak", "negative"))
            scores = torch.log_softmax((1 + gamma) * log_f - gamma * log_b - eta * log_n, -1)
        self.trace.contrasted.append(contrasted)
        self.trace.borderline.append(borderline)
        return scores

    def _uscd(self, standard, lame):
        lam, eta = self.knob("uncertainty_threshold", USCD_LAMBDA), self.knob("uscd_eta", USCD_ETA)
        w_s, w_l = self.knob("standard_weight", USCD_WEIGHTS[0]), self.knob("lame_weight", USCD_WEIGHTS[1])
        p_s, p_l = torch.softmax(standard, -1), torch.softmax(lame, -1)
        spread = float(p_s.std())
        borderline = abs(spread - lam) <= GATE_NOISE * lam
        if spread > lam:
            return torch.log(p_s), False, borderline
        mixture = w_s * p_s + w_l * p_l
        keep = (p_s >= eta / p_s.numel()) & (mixture > 0)
        if not keep.any():
            keep[int(p_s.argmax())] = True
        return torch.log(mixture.clamp_min(1e-300)).masked_fill(~keep, -math.inf), True, borderline


class _Fusion(_Strategy):
    def __init__(self, case, request, engine_weights=None):
        super().__init__(case, request, engine_weights)
        self.trace.guide = self.knob("small_base", "") or _default_guide("small_base")
        self.trace.experts = tuple(_experts(self.knob("experts", ())))
        self.streams["small"] = _guide_stream(self.trace.guide, request)
        for expert in self.trace.experts:
            self.streams[f"expert:{expert}"] = _guide_stream(expert, request)
        alphas = list(self.knob("alphas", ())) or [PROXY_TUNING_ALPHA]
        self.alphas = alphas * len(self.trace.experts) if len(alphas) == 1 else alphas

    def scores(self, position, rows):
        experts = [rows[f"expert:{e}"] for e in self.trace.experts]
        if self.knob("mode", "dynamic") == "static":
            weights = list(self.alphas)
            scores = rows["base"] + sum(a * (z - rows["small"]) for a, z in zip(weights, experts))
        else:
            hint = self.engine_weights[position] if self.engine_weights else None
            scores, weights, near_tie = _dynamic_fusion(rows["base"], rows["small"], experts, hint)
            self.trace.near_tie.append(near_tie)
        self.trace.weights.append(tuple(weights))
        return scores


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(P‖Q) over the last dimension; tokens with p = 0 contribute 0."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def _dynamic_fusion(large, small, experts, hint=None):
    """(log P̃(α*), α* per expert, whether α* is the engine's `hint` rather than the first minimum)."""
    m_l, m_s = torch.log_softmax(large, -1), torch.log_softmax(small, -1)
    m_t = [torch.log_softmax(z, -1) for z in experts]
    forward_targets = [float(_kl(m, m_s)) for m in m_t]  # KL(Q_t‖Q)
    reverse_targets = [float(_kl(m_s, m)) for m in m_t]  # KL(Q‖Q_t)
    candidates = [(t, a) for t in range(len(experts)) for a in DLF_GRID]  # expert-major
    grid = torch.tensor(DLF_GRID, dtype=m_l.dtype)
    deltas = torch.stack(m_t) - m_s  # [T, V]
    tilted = torch.log_softmax(m_l + grid[None, :, None] * deltas[:, None, :], -1).flatten(0, 1)  # log P̃ [T·K, V]
    # KL(P̃‖P) and KL(P‖P̃) per candidate (every logit is finite here, so no 0·∞ term).
    forward = (tilted.exp() * (tilted - m_l)).sum(-1)
    reverse = (m_l.exp() * m_l).sum() - tilted @ m_l.exp()
    losses = sum((forward - f) ** 2 + (reverse - r) ** 2 for f, r in zip(forward_targets, reverse_targets))
    scale = sum(f * f + r * r for f, r in zip(forward_targets, reverse_targets))
    floor = float(losses.min())
    band = floor * (1 + DLF_TIE_RTOL) + DLF_TIE_ATOL * scale
    best = next(k for k, loss in enumerate(losses.tolist()) if loss <= band)
    hinted = _candidate(hint, candidates)
    noise = 4 * KL_NOISE * math.sqrt(floor) + 4 * KL_NOISE ** 2
    near_tie = hinted is not None and hinted != best and float(losses[hinted]) <= band + noise
    chosen = hinted if near_tie else best
    expert, alpha = candidates[chosen]
    weights = [0.0] * len(experts)
    weights[expert] = alpha
    return tilted[chosen], weights, near_tie


def _candidate(weights, candidates) -> int | None:
    """The index of the one-hot candidate with these weights (all zero: the first, a = 0), else None."""
    if weights is None:
        return None
    active = [(t, w) for t, w in enumerate(weights) if w != 0]
    if not active:
        return 0
    if len(active) > 1 or abs(active[0][1] * 10 - round(active[0][1] * 10)) > 1e-4:
        return None
    t, a = active[0][0], round(active[0][1] * 10) / 10
    return candidates.index((t, a)) if (t, a) in candidates else None


class _Refusal(_Strategy):
    def __init__(self, case, request, engine_weights=None):
        super().__init__(case, request, engine_weights)
        tok = tokenizer()
        prefixes = REFUSAL_PREFIXES
        if self.knob("prefixes", ()):  # the request's (category, text) pairs replace the config's
            prefixes = {}
            for category, text in self.case["prefixes"]:
                prefixes.setdefault(category, []).append(text)
        self.markers = {c: [tok(text, add_special_tokens=False)["input_ids"] for text in texts]
                        for c, texts in prefixes.items()}
        self.prefix: list[int] = []

    def forced(self, position):
        return self.prefix[position] if position < len(self.prefix) else None

    def scores(self, position, rows):
        z = rows["base"]
        if position:
            return z
        p = torch.softmax(z / self.knob("softmax_temperature", REFUSAL_SOFTMAX_TEMPERATURE), -1)
        firsts = {c: list(dict.fromkeys(ids[0] for ids in seqs)) for c, seqs in self.markers.items()}
        probabilities = {c: float(p[ids].sum()) for c, ids in firsts.items()}
        respond = max(0.0, 1.0 - sum(probabilities.values()))
        top = max(probabilities, key=lambda c: (probabilities[c], -list(probabilities).index(c)))
        bar = respond if self.knob("mode", "argmax") == "argmax" else self.knob("threshold", REFUSAL_THRESHOLD)
        action = "refuse" if probabilities[top] >= bar else "respond"
        if action == "refuse":
            self.prefix = max(self.markers[top], key=lambda ids: float(p[ids[0]]))  # ties: the first declared
        else:
            z = z.clone()
            z[[t for ids in firsts.values() for t in ids]] = -math.inf
        self.trace.refusal = {"action": action, "category": top if action == "refuse" else None,
                              "probabilities": probabilities, "respond_probability": respond,
                              "forced": tuple(self.prefix)}
        return z


class _EntropySwitch(_Strategy):
    def __init__(self, case, request, engine_weights=None):
        super().__init__(case, request, engine_weights)
        self.trace.guide = self.knob("small", "") or _default_guide("small")
        self.streams["small"] = _guide_stream(self.trace.guide, request)
        self.threshold = self.knob("threshold", GROUP.get("entropy_threshold"))
        self.window, self.min_span = self.knob("window", SWITCH_WINDOW), self.knob("min_span", SWITCH_MIN_SPAN)
        self.large, self.span = self.knob("start", "small") == "large", 0

    def scores(self, position, rows):
        z = rows["base" if self.large else "small"]
        p = torch.softmax(z, -1)
        entropy = float(-(p[p > 0] * torch.log2(p[p > 0])).sum())
        self.trace.large.append(self.large)
        self.trace.entropies.append(entropy)
        recent = self.trace.entropies[-self.window:]
        rolling = sum(recent) / len(recent)
        self.span += 1
        fires = self.span >= self.min_span
        self.trace.borderline.append(fires and abs(rolling - self.threshold) <= SWITCH_NOISE)
        if fires and (rolling > self.threshold) != self.large:
            self.large, self.span = not self.large, 0
        return z


_STRATEGIES = {"contrastive": _Contrastive, "logit_fusion": _Fusion, "refusal_steering": _Refusal,
               "entropy_switch": _EntropySwitch}


def _strategy(case: dict, question: str, engine_weights=None) -> _Strategy:
    return _STRATEGIES[case["strategy"]](case, {"messages": [{"role": "user", "content": question}]}, engine_weights)


def literal_tokens(case: dict, question: str, steps: int, weights=None) -> Trace:
    """Greedy decoding recomputing every stream's whole context at every step (dynamic fusion: given the engine's
    α per step, `weights`, where they tie within float noise)."""
    strategy = _strategy(case, question, weights)
    generated: list[int] = []
    for position in range(steps):
        rows = {role: logits(model, ids + tuple(generated))[0] for role, (model, ids) in strategy.streams.items()}
        generated.append(strategy.choose(position, rows))
    return strategy.trace


def teacher_forced(case: dict, question: str, tokens: list[int], weights=None) -> Trace:
    """The reference's choice at each step t given tokens[:t], from one full forward per stream (`weights` as in
    literal_tokens)."""
    strategy = _strategy(case, question, weights)
    every_step = {role: logits(model, ids + tuple(tokens[:-1]), keep=len(tokens))
                  for role, (model, ids) in strategy.streams.items()}
    for position in range(len(tokens)):
        strategy.choose(position, {role: rows[position] for role, rows in every_step.items()})
    return strategy.trace
