"""The knobs of each token-level strategy as a request carries them, with the defaults of the papers (each
module's docstring cites its paper).

The math lives beside this module (contrastive.py, logit_fusion.py, refusal.py); these dataclasses are what a
request asks for, validated here so that every engine refuses the same bad input with the same message.
"""

from __future__ import annotations

import dataclasses
import math

from decoding.best_of_n import SELECTIONS, TEMPLATES, VERDICTS, Bracket
from decoding.chat import ChatMessage
from decoding.errors import InvalidArgument
from decoding.refusal import RefusalParams

CONTRASTIVE_MODES = ("cd", "uscd", "steer")
FUSION_MODES = ("dynamic", "static")
SWITCH_STARTS = ("small", "large")


@dataclasses.dataclass(frozen=True)
class Context:
    """Another prompt for the same model (USCD's lame prompt, STEER's negative context): raw text or chat."""
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.prompt and not self.messages


def _check(field: str, ok: bool, reason: str) -> None:
    if not ok:
        raise InvalidArgument(field, reason)


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@dataclasses.dataclass(frozen=True)
class ContrastiveParams:
    mode: str = "cd"
    # CD (O'Brien & Lewis β formulation; Li et al. is β → ∞ with amateur temperature).
    alpha: float = 0.1
    beta: float = 0.5
    amateur_temperature: float = 1.0
    # The weaker model: CD's amateur, STEER's base model B. "" = the group's guide with role amateur (cd) or
    # small_base (steer). USCD uses the base model itself.
    guide: str = ""
    # USCD (released script of the paper's CodeLlama run).
    uncertainty_threshold: float = 0.005
    uscd_eta: float = 2 / 3
    standard_weight: float = 1.0
    lame_weight: float = -0.7
    # STEER.
    gamma: float = 0.2
    eta: float = 0.6
    # USCD's lame prompt / STEER's negative context.
    contrast_context: Context = Context()

    def validate(self) -> "ContrastiveParams":
        f = "contrastive."
        _check(f + "mode", self.mode in CONTRASTIVE_MODES, f"must be one of {CONTRASTIVE_MODES}")
        _check(f + "alpha", _finite(self.alpha) and 0 < self.alpha <= 1,
               f"the plausibility cutoff must be in (0, 1], got {self.alpha}")
        _check(f + "beta", _finite(self.beta) and self.beta >= 0, f"must be >= 0, got {self.beta}")
        _check(f + "amateur_temperature", _finite(self.amateur_temperature) and self.amateur_temperature > 0,
               f"must be > 0, got {self.amateur_temperature}")
        _check(f + "uncertainty_threshold", _finite(self.uncertainty_threshold) and self.uncertainty_threshold >= 0,
               f"must be >= 0, got {self.uncertainty_threshold}")
        _check(f + "uscd_eta", _finite(self.uscd_eta) and self.uscd_eta >= 0, f"must be >= 0, got {self.uscd_eta}")
        _check(f + "standard_weight", _finite(self.standard_weight), "must be finite")
        _check(f + "lame_weight", _finite(self.lame_weight), "must be finite")
        _check(f + "gamma", _finite(self.gamma) and self.gamma >= 0, f"must be >= 0, got {self.gamma}")
        _check(f + "eta", _finite(self.eta) and self.eta >= 0, f"must be >= 0, got {self.eta}")
        if self.mode in ("uscd", "steer"):
            what = "USCD's lame prompt" if self.mode == "uscd" else "STEER's negative context"
            _check(f + "contrast_context", not self.contrast_context.empty,
                   f"mode {self.mode!r} needs {what} (prompt or messages)")
        return self


@dataclasses.dataclass(frozen=True)
class LogitFusionParams:
    mode: str = "dynamic"
    # Expert tasks or guide names; empty: every expert of the group.
    experts: tuple[str, ...] = ()
    # Static mode: one α for all experts, or one per expert. Empty: 1.0 (proxy-tuning).
    alphas: tuple[float, ...] = ()
    # Dynamic mode: α searched over {0, step, 2·step, ..., grid_max}, one expert active per step.
    grid_max: float = 2.0
    grid_step: float = 0.1
    # The small base S; "" = the group's guide with role small_base.
    small_base: str = ""
    # Return the chosen α vector of every step in the report.
    report_weights: bool = False

    def validate(self) -> "LogitFusionParams":
        f = "logit_fusion."
        _check(f + "mode", self.mode in FUSION_MODES, f"must be one of {FUSION_MODES}")
        for i, a in enumerate(self.alphas):
            _check(f"{f}alphas[{i}]", _finite(a), "must be finite")
        _check(f + "grid_step", _finite(self.grid_step) and self.grid_step > 0, f"must be > 0, got {self.grid_step}")
        _check(f + "grid_max", _finite(self.grid_max) and self.grid_max >= 0, f"must be >= 0, got {self.grid_max}")
        _check(f + "grid_max", self.grid_max / self.grid_step <= 200,
               f"grid_max / grid_step gives {self.grid_max / self.grid_step:.0f} grid points; at most 200")
        return self


@dataclasses.dataclass(frozen=True)
class RefusalSteeringParams:
    decision: RefusalParams = RefusalParams()
    # Request-declared refusal prefixes (category, text) for models without refusal tokens; replace the config's.
    prefixes: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class EntropySwitchParams:
    # Bits; None = the group's calibrated default (its config's `entropy_threshold`). ±inf allowed: +inf keeps the
    # small model, −inf (with min_span 0) hands every token after the first to the large one.
    threshold: float | None = None
    window: int = 5
    min_span: int = 10
    # The small model's guide; "" = the group's guide with role small.
    small: str = ""
    start: str = "small"
    # Return which model wrote each token and the rolling entropy there.
    trace: bool = False

    def validate(self) -> "EntropySwitchParams":
        f = "entropy_switch."
        if self.threshold is not None:
            _check(f + "threshold", not math.isnan(self.threshold), "must be a number of bits (±inf allowed), not NaN")
        _check(f + "window", self.window >= 1, f"must be >= 1, got {self.window}")
        _check(f + "min_span", self.min_span >= 0, f"must be >= 0, got {self.min_span}")
        _check(f + "start", self.start in SWITCH_STARTS, f"must be one of {SWITCH_STARTS}")
        return self


TokenLevelStrategy = ContrastiveParams | LogitFusionParams | RefusalSteeringParams | EntropySwitchParams


@dataclasses.dataclass(frozen=True)
class BestOfNParams:
    """Best-of-N (decoding/best_of_n.py). Request-level: candidates are whole samples, the judge compares them."""
    n: int = 4
    # The candidates' sampling: these (field, value) pairs replace the request's own `sampling` fields; a request
    # that is greedy and sets no candidate temperature samples its candidates at temperature 0.7.
    sampling_overrides: tuple[tuple[str, object], ...] = ()
    # The judge's guide (role judge); "" = the group's first judge guide, else the base model itself.
    judge: str = ""
    # "generate" or "score"; None = "generate" for knockout, "score" for pointwise (which reads probabilities).
    verdict: str | None = None
    both_orders: bool = False
    selection: str = "knockout"
    template: str = "math"
    # Seeds the candidates (sample i: seed + i) and the bracket's coins; None = the request's seed, else drawn.
    seed: int | None = None
    # Tokens the judge may write per comparison (GENERATE); None = the group's limit.
    judge_max_tokens: int | None = None
    # A token-level strategy every candidate is decoded with; None = plain sampling.
    candidates: TokenLevelStrategy | None = None

    DEFAULT_CANDIDATE_TEMPERATURE = 0.7

    @property
    def verdict_mode(self) -> str:
        return self.verdict or ("score" if self.selection == "pointwise" else "generate")

    def validate(self) -> "BestOfNParams":
        f = "best_of_n."
        _check(f + "n", isinstance(self.n, int) and self.n >= 1, f"must be >= 1, got {self.n}")
        _check(f + "judge_max_tokens", self.judge_max_tokens is None or self.judge_max_tokens >= 1,
               f"must be >= 1, got {self.judge_max_tokens}")
        _check(f + "selection", self.selection in SELECTIONS, f"must be one of {SELECTIONS}")
        _check(f + "template", self.template in TEMPLATES, f"must be one of {TEMPLATES}")
        if self.verdict is not None:
            _check(f + "verdict", self.verdict in VERDICTS, f"must be one of {VERDICTS}")
            _check(f + "verdict", not (self.selection == "pointwise" and self.verdict == "generate"),
                   "pointwise selection reads the judge's probability of Correct: leave verdict unset or send SCORE")
        _check(f + "both_orders", not (self.both_orders and self.selection == "pointwise"),
               "pointwise selection shows one response at a time: there is no order to balance")
        return self


Strategy = TokenLevelStrategy | BestOfNParams


@dataclasses.dataclass
class ContrastiveReport:
    mode: str
    guide: str
    steps: int = 0
    # Steps where the contrast changed the scores (USCD: uncertain steps; CD/STEER: every step).
    contrasted_steps: int = 0


@dataclasses.dataclass
class LogitFusionReport:
    mode: str
    small_base: str
    experts: tuple[str, ...]
    steps: int = 0
    # Mean α per expert over the steps.
    mean_weights: tuple[float, ...] = ()
    # The α vector of every step (report_weights only).
    step_weights: list[tuple[float, ...]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class RefusalReport:
    action: str  # "refuse" | "respond" | "none" (the model was left alone)
    category: str | None
    probabilities: dict[str, float]
    respond_probability: float
    forced_token_ids: tuple[int, ...]


@dataclasses.dataclass
class EntropySwitchStep:
    large: bool  # which model wrote the token
    entropy: float  # its entropy there (bits, before temperature)
    rolling_entropy: float  # the rolling mean the switching rule saw after it


@dataclasses.dataclass
class EntropySwitchReport:
    small: str  # the small model's guide
    threshold: float  # the threshold used (the group's default when the request left it unset)
    steps: int = 0
    large_tokens: int = 0
    switches: int = 0
    # Catch-up tokens per model: at each activation, the tokens the other model wrote since this one last ran (fed
    # in one forward; a model's first activation feeds the prompt too). Each token costs one forward of its writer;
    # forward passes per model are in usage.
    small_catch_up_tokens: int = 0
    large_catch_up_tokens: int = 0
    parameter_ratio: float = 1.0  # P_S / P_L
    trace: list[EntropySwitchStep] = dataclasses.field(default_factory=list)

    @property
    def large_fraction(self) -> float:
        return self.large_tokens / self.steps if self.steps else 0.0


@dataclasses.dataclass
class BestOfNCandidate:
    text: str
    token_ids: list[int]
    finish_reason: str
    # The final answer that put it in a team (math template), None when it has none.
    answer: str | None


@dataclasses.dataclass(frozen=True)
class BestOfNProgress:
    """A finished phase, streamed before the winner: "candidates", "round" (knockout) or "scored" (pointwise)."""
    phase: str
    round: int = 0
    remaining: int = 0
    judge_calls: int = 0


@dataclasses.dataclass
class BestOfNReport:
    selection: str
    verdict: str
    both_orders: bool
    template: str
    judge: str  # the judge's guide, or the base model's name when the base judges without a guide
    seed: int
    candidates: list[BestOfNCandidate]
    winner: int
    judge_calls: int = 0
    judge_tokens: int = 0  # tokens the judge wrote (GENERATE; SCORE writes none)
    bracket: Bracket | None = None  # knockout
    pointwise_scores: list[float] = dataclasses.field(default_factory=list)  # pointwise


Report = ContrastiveReport | LogitFusionReport | RefusalReport | EntropySwitchReport | BestOfNReport
