"""Shared by the engine tests of the token-level strategies: one request per strategy and mode, and a naive
reference that recomputes every stream's full forward from scratch at each step (no KV cache, no batching).

`naive_greedy` is that reference literally (one full forward per stream per step: quadratic). `reference_choices`
gets the same logits for every step at once, from one full causal forward per stream over its context and the
tokens under test (a causal model's logits at step t see only the tokens before t), and replays the plan over them:
the tokens under test are the reference's greedy tokens iff each is the reference's choice after the ones before
it. It is what the engine tests use (32 tokens × 3 prompts × 9 cases on both engines); a test checks that it
agrees with `naive_greedy`."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from pathlib import Path

import torch

from decoding.refusal import RefusalParams
from decoding.sampling import SamplingParams
from decoding.strategies import ContrastiveParams, Context, LogitFusionParams, RefusalSteeringParams
from server.config import load_deploy_file
from server.engines.base import ChatMessage, GenerationRequest
from server.engines.guides import ModelLoader
from server.engines.lockstep import PlanResolver
from server.engines.prompts import load_tokenizer
from server.models import resolve_model_path

REPO = Path(__file__).resolve().parents[1]
LOCAL_CONFIG = load_deploy_file(REPO / "deploy" / "local.yaml").chorus
GROUP = LOCAL_CONFIG.groups["smollm2"]
BASE = GROUP.base

QUESTIONS = ["What is the capital of France?", "Give me a tip for staying healthy.", "Describe a cat in one line."]
STEPS = 32
REFERENCE_MAX_LEN = 512

STRATEGIES = {
    "cd": ContrastiveParams(),
    "cd-li": ContrastiveParams(beta=4.0, amateur_temperature=0.5),
    "uscd": ContrastiveParams(mode="uscd", contrast_context=Context(
        messages=(ChatMessage("user", "Answer."),))),
    "steer": ContrastiveParams(mode="steer", guide="exit8", contrast_context=Context(
        prompt="A cat sat on the mat. The sky is blue. Apples are red.")),
    "fusion-dynamic": LogitFusionParams(),
    "fusion-dynamic-one-expert": LogitFusionParams(experts=("concise",), report_weights=True),
    "fusion-static": LogitFusionParams(mode="static", alphas=(0.5, 0.8)),
    "refusal-threshold": RefusalSteeringParams(decision=RefusalParams(mode="threshold", threshold=0.0)),
    "refusal-argmax": RefusalSteeringParams(),
}


def request(name: str, question: str, steps: int = STEPS, **sampling) -> GenerationRequest:
    return GenerationRequest(
        request_id=f"{name}:{question}", messages=(ChatMessage("user", question),),
        sampling=SamplingParams(**{"max_tokens": steps, "temperature": 0, "ignore_eos": True, **sampling}).validate(),
        strategy=STRATEGIES[name])


@torch.inference_mode()
def naive_greedy(models: dict, tokenizer, req: GenerationRequest, max_model_len: int) -> list[int]:
    """Greedy tokens of `req` recomputing each stream's whole context every step (the research-script way)."""
    prompt_ids, spec = _resolve(tokenizer, req, max_model_len)
    plan = spec.build()
    vocab = len(tokenizer)
    generated: list[int] = []

    def last_logits(model_name, ids):
        return models[model_name](torch.tensor([ids])).logits[0, -1, :vocab].float()

    for position in range(req.sampling.max_tokens):
        base = last_logits(BASE, prompt_ids + generated)
        streams = [base if s.model is None else last_logits(s.model, list(s.ids) + generated) for s in spec.streams]
        scores = plan.step(base, torch.stack(streams) if streams else base.new_empty((0, vocab)), position)
        forced = plan.forced_token(position)
        generated.append(forced if forced is not None else int(scores.argmax()))
    return generated


def _resolve(tokenizer, req: GenerationRequest, max_model_len: int):
    text = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in req.messages], add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer.encode(text, add_special_tokens=False)
    return prompt_ids, PlanResolver(GROUP, tokenizer, max_model_len).resolve(req, prompt_ids)


@torch.inference_mode()
def teacher_forced_choices(models: dict, tokenizer, req: GenerationRequest, tokens: list[int],
                           max_model_len: int) -> list[int]:
    """The reference's token at each step t given tokens[:t] (see the module docstring)."""
    prompt_ids, spec = _resolve(tokenizer, req, max_model_len)
    plan = spec.build()
    vocab = len(tokenizer)

    def every_step(model_name, ids):  # row t: next-token logits after ids + tokens[:t]
        return models[model_name](torch.tensor([list(ids) + tokens[:-1]])).logits[0, len(ids) - 1:, :vocab].float()

    base = every_step(BASE, prompt_ids)
    streams = [base if s.model is None else every_step(s.model, s.ids) for s in spec.streams]
    choices = []
    for position in range(len(tokens)):
        rows = torch.stack([s[position] for s in streams]) if streams else base.new_empty((0, vocab))
        scores = plan.step(base[position], rows, position)
        forced = plan.forced_token(position)
        choices.append(forced if forced is not None else int(scores.argmax()))
    return choices


@functools.cache
def _reference_models() -> tuple[dict, object]:
    loader = ModelLoader(LOCAL_CONFIG.models)
    models = {name: loader.load(name) for name in {BASE, *GROUP.guide_models}}
    return models, load_tokenizer(resolve_model_path(LOCAL_CONFIG.models[BASE].path))


@functools.cache
def reference_choices(name: str, question: str, tokens: tuple[int, ...]) -> tuple[int, ...]:
    """teacher_forced_choices of request(name, question) on the embedded weights, cached for the session."""
    models, tokenizer = _reference_models()
    return tuple(teacher_forced_choices(models, tokenizer, request(name, question, steps=len(tokens)), list(tokens),
                                        REFERENCE_MAX_LEN))


def first_difference(tokens, choices) -> str:
    step = next((i for i, (a, b) in enumerate(zip(tokens, choices)) if a != b), None)
    return "equal" if step is None else f"step {step}: engine {tokens[step]}, reference {choices[step]}"


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


def assert_equal_to_reference(name: str, runs: dict, tokenizer) -> None:
    for question in QUESTIONS:
        tokens, last = runs[(name, question)]
        choices = list(reference_choices(name, question, tuple(tokens)))
        assert tokens == choices, (name, question, first_difference(tokens, choices), tokenizer.decode(tokens))
        assert last.report is not None
        # Each generated token is one step (vLLM's re-fused partial-prefill rows are not counted twice).
        assert getattr(last.report, "steps", len(tokens)) == len(tokens)


def reference_tokens(name: str, question: str) -> tuple[int, ...]:
    """naive_greedy of request(name, question) (the literal, quadratic reference)."""
    models, tokenizer = _reference_models()
    return tuple(naive_greedy(models, tokenizer, request(name, question), REFERENCE_MAX_LEN))
