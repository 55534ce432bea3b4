"""Shared by the engine tests of the token-level strategies: one request per strategy and mode, and the check of an
engine's tokens and report against the independent reference (tests/independent_reference.py), which recomputes
every stream's full forward without KV cache or batching and imports nothing from decoding/ or server/.

Each case is plain data (the strategy's knobs that differ from the defaults): the engines get it as the request's
strategy params, the reference reads it with the papers' defaults. The engine tests compare against the
reference's teacher-forced replay (32 tokens × 3 prompts × every case on both engines); a test checks that it
agrees with the literal step-by-step recompute."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from pathlib import Path

import pytest

from decoding.chat import ChatMessage
from decoding.refusal import RefusalParams
from decoding.sampling import SamplingParams
from decoding.strategies import (ContrastiveParams, Context, EntropySwitchParams, LogitFusionParams,
                                 RefusalSteeringParams)
from server.config import load_deploy_file
from server.engines.base import GenerationRequest
from tests import independent_reference as reference

REPO = Path(__file__).resolve().parents[1]
LOCAL_CONFIG = load_deploy_file(REPO / "deploy" / "local.yaml").chorus
GROUP = LOCAL_CONFIG.groups["smollm2"]
BASE = GROUP.base
assert BASE == reference.BASE and list(GROUP.guides) == list(reference.GUIDES)

QUESTIONS = ["What is the capital of France?", "Give me a tip for staying healthy.", "Describe a cat in one line."]
STEPS = 24
REFERENCE_MAX_LEN = 512

CASES = {
    "cd": {"strategy": "contrastive"},
    "cd-li": {"strategy": "contrastive", "beta": 4.0, "amateur_temperature": 0.5},
    # λ below the default 0.005: the std of a distribution over V tokens is at most ~1/√V (0.0045 at SmolLM2's
    # V = 49152), so with the default the gate never finds a step certain; at 0.003 it goes both ways here.
    "uscd": {"strategy": "contrastive", "mode": "uscd", "uncertainty_threshold": 0.003,
             "contrast_context": {"messages": ({"role": "user", "content": "Answer."},)}},
    "steer": {"strategy": "contrastive", "mode": "steer", "guide": "exit8",
              "contrast_context": {"prompt": "A cat sat on the mat. The sky is blue. Apples are red."}},
    # Per-step weights reported: with large = small here, a = 1 on either expert gives equal losses, which the
    # engines' float32 search may break either way (the reference takes the engine's α where it ties).
    "fusion-dynamic": {"strategy": "logit_fusion", "report_weights": True},
    "fusion-dynamic-one-expert": {"strategy": "logit_fusion", "experts": ("concise",), "report_weights": True},
    # Experts named out of their declaration order, one α each: α follows the expert it is given with.
    "fusion-static": {"strategy": "logit_fusion", "mode": "static", "experts": ("french", "concise"),
                      "alphas": (0.5, 0.8)},
    # No α: proxy-tuning's 1.0 for every expert.
    "fusion-static-default": {"strategy": "logit_fusion", "mode": "static"},
    "refusal-threshold": {"strategy": "refusal_steering", "mode": "threshold", "threshold": 0.0},
    "refusal-argmax": {"strategy": "refusal_steering"},
    # The request's own prefixes, on the usual first tokens of these answers; θ = 1: always respond, which bans them.
    "refusal-respond": {"strategy": "refusal_steering", "mode": "threshold", "threshold": 1.0,
                        "prefixes": (("refuse", "The"), ("refuse", "A"), ("refuse", "1."))},
    # The group's calibrated threshold, window 5, minimum span 10, the small model (exit8) first.
    "entropy-switch": {"strategy": "entropy_switch", "trace": True},
    # The large model first, a short window and span so that 32 tokens switch several times.
    "entropy-switch-large-first": {"strategy": "entropy_switch", "start": "large", "window": 2, "min_span": 3,
                                   "threshold": 1.5, "trace": True},
}


def strategy_params(case: dict):
    """The engines' params for a case."""
    knobs = {k: v for k, v in case.items() if k != "strategy"}
    if case["strategy"] == "contrastive":
        if "contrast_context" in knobs:
            context = knobs.pop("contrast_context")
            knobs["contrast_context"] = Context(prompt=context.get("prompt"), messages=tuple(
                ChatMessage(m["role"], m["content"]) for m in context.get("messages", ())))
        return ContrastiveParams(**knobs)
    if case["strategy"] == "logit_fusion":
        return LogitFusionParams(**knobs)
    if case["strategy"] == "entropy_switch":
        return EntropySwitchParams(**knobs)
    prefixes = knobs.pop("prefixes", ())
    return RefusalSteeringParams(decision=RefusalParams(**knobs), prefixes=prefixes)


STRATEGIES = {name: strategy_params(case) for name, case in CASES.items()}


def request(name: str, question: str, steps: int = STEPS, **sampling) -> GenerationRequest:
    return GenerationRequest(
        request_id=f"{name}:{question}", messages=(ChatMessage("user", question),),
        sampling=SamplingParams(**{"max_tokens": steps, "temperature": 0, "ignore_eos": True, **sampling}).validate(),
        strategy=STRATEGIES[name])


@functools.cache
def reference_trace(name: str, question: str, tokens: tuple[int, ...], weights: tuple | None = None
                    ) -> reference.Trace:
    """The independent reference's teacher-forced replay of case `name` over `tokens` (given the engine's dynamic
    fusion weights per step, for near ties), cached for the session."""
    return reference.teacher_forced(CASES[name], question, list(tokens), weights)


def reference_tokens(name: str, question: str, steps: int = STEPS, weights: tuple | None = None) -> list[int]:
    """The independent reference's literal greedy tokens (every stream recomputed from scratch at every step)."""
    return reference.literal_tokens(CASES[name], question, steps, weights).tokens


def engine_weights(report) -> tuple | None:
    """A dynamic fusion report's α per step (for the reference's near ties), else None."""
    return tuple(tuple(w) for w in report.step_weights) if getattr(report, "step_weights", None) else None


def first_difference(tokens, choices) -> str:
    step = next((i for i, (a, b) in enumerate(zip(tokens, choices)) if a != b), None)
    return "equal" if step is None else f"step {step}: engine {tokens[step]}, reference {choices[step]}"


def assert_matches_reference(name: str, question: str, tokens: list[int], report, steps: int = STEPS) -> None:
    """The engine's tokens are the reference's greedy tokens, and its report says what the reference decided."""
    tokens = list(tokens)
    assert len(tokens) == steps, (name, question, len(tokens))
    assert report is not None
    trace = reference_trace(name, question, tuple(tokens), engine_weights(report))
    assert len(trace.tokens) == len(tokens)
    assert tokens == trace.tokens, (name, question, first_difference(tokens, trace.tokens),
                                    reference.tokenizer().decode(tokens))
    case = CASES[name]
    if case["strategy"] == "contrastive":
        assert (report.mode, report.guide, report.steps) == (case.get("mode", "cd"), trace.guide, steps)
        # USCD contrasts where the standard prompt's distribution is uncertain; a gate within float noise of λ
        # may fall either way.
        sure = sum(c and not b for c, b in zip(trace.contrasted, trace.borderline))
        assert sure <= report.contrasted_steps <= sure + sum(trace.borderline), (report, trace.contrasted)
    elif case["strategy"] == "logit_fusion":
        assert (report.mode, report.small_base, report.experts, report.steps) == (
            case.get("mode", "dynamic"), trace.guide, trace.experts, steps)
        assert len(trace.weights) == steps
        mean = [sum(column) / steps for column in zip(*trace.weights)]
        assert list(report.mean_weights) == pytest.approx(mean, abs=1e-6), (report.mean_weights, trace.weights)
        if case.get("report_weights"):
            assert len(report.step_weights) == steps
            assert [list(w) for w in report.step_weights] == [pytest.approx(w, abs=1e-6) for w in trace.weights]
        else:
            assert report.step_weights == []
    elif case["strategy"] == "entropy_switch":
        assert not any(trace.borderline), ("a rolling entropy within float noise of the threshold: pick another",
                                           trace.entropies)
        assert (report.small, report.steps) == (trace.guide, steps)
        assert [s.large for s in report.trace] == trace.large
        assert [s.entropy for s in report.trace] == pytest.approx(trace.entropies, abs=1e-3)
        assert report.large_tokens == sum(trace.large)
        assert report.switches == sum(a != b for a, b in zip(trace.large, trace.large[1:]))
    else:
        decided = trace.refusal
        assert (report.action, report.category, report.forced_token_ids) == (
            decided["action"], decided["category"], decided["forced"])
        assert tuple(tokens[:len(decided["forced"])]) == decided["forced"]
        assert report.probabilities == pytest.approx(decided["probabilities"], abs=1e-3)
        assert report.respond_probability == pytest.approx(decided["respond_probability"], abs=1e-3)


async def collect(engine, req: GenerationRequest):
    """(token ids, last chunk) of one request."""
    chunks = [c async for c in engine.generate(req)]
    return [t for c in chunks for t in c.token_ids], chunks[-1]


async def run_mixed(engine):
    """Every strategy × QUESTIONS and one plain request per question, all submitted at once (they queue for
    slots). Returns ({(name, question): (tokens, last chunk)}, [(tokens, last chunk) of the plain ones])."""
    cases = [(name, q) for name in STRATEGIES for q in QUESTIONS]
    plain = [dataclasses.replace(request("cd", q), strategy=None, request_id=f"plain:{q}") for q in QUESTIONS]
    results = await asyncio.gather(*(collect(engine, request(n, q)) for n, q in cases),
                                   *(collect(engine, p) for p in plain))
    return dict(zip(cases, results[:len(cases)])), results[len(cases):]


def assert_equal_to_reference(name: str, runs: dict) -> None:
    for question in QUESTIONS:
        tokens, last = runs[(name, question)]
        assert_matches_reference(name, question, tokens, last.report)
