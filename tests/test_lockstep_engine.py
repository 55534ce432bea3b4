"""Token-level strategies on the transformers engine, in-process on the real SmolLM2 weights and the guides of
deploy/local.yaml: batched, KV-cached lock-step decoding equals an independent naive full-recompute reference
(tests/independent_reference.py)."""

import asyncio
import dataclasses
import math

import pytest
import torch

from decoding.errors import InvalidArgument
from decoding.plans import ContrastivePlan, EntropySwitchPlan, PlanSpec, StreamSpec
from decoding.strategies import ContrastiveParams, EntropySwitchParams, LogitFusionParams, RefusalSteeringParams
from server.calibration import calibrate_entropy
from server.engines.transformers_engine import TransformersEngine
from server.errors import FailedPrecondition
from server.lockstep.guides import ModelLoader, early_exits_of
from server.lockstep.host import LockstepHost
from server.lockstep.runner import ModelRunner
from tests import independent_reference as reference
from tests.strategy_cases import (BASE, GROUP, LOCAL_CONFIG, QUESTIONS, REFERENCE_MAX_LEN, STEPS, STRATEGIES,
                                  assert_equal_to_reference, collect, engine_weights, reference_trace,
                                  reference_tokens, request, run_mixed)

MAX_LEN = REFERENCE_MAX_LEN


@pytest.fixture(scope="module")
def engine(model_path):
    models = {**LOCAL_CONFIG.models}
    models = {n: dataclasses.replace(m, max_model_len=MAX_LEN) for n, m in models.items()}
    config = dataclasses.replace(LOCAL_CONFIG, models=models)
    # A step budget that fits every prompt whole: each stream is prefilled in one forward, so the forward-pass counts
    # below are exact (chunked prefill has its own test, tests/test_engine_prefill.py).
    engine = TransformersEngine(models[BASE], dataclasses.replace(GROUP, max_batch_size=12, max_step_tokens=4096),
                                config)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def mixed_run(engine):
    return asyncio.run(run_mixed(engine))


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_batched_lockstep_equals_naive_recompute(name, mixed_run):
    assert_equal_to_reference(name, mixed_run[0])


@pytest.mark.parametrize("name", ["cd", "fusion-dynamic"])
def test_literal_step_by_step_recompute_agrees(name, mixed_run):
    """The teacher-forced reference stands for the literal one (one full forward per stream per step): spot check."""
    tokens, last = mixed_run[0][(name, QUESTIONS[2])]
    weights = engine_weights(last.report)
    literal = reference_tokens(name, QUESTIONS[2], weights=weights)
    assert len(literal) == len(tokens) == STEPS
    assert literal == tokens == reference_trace(name, QUESTIONS[2], tuple(tokens), weights).tokens


def test_plain_requests_beside_strategies_are_unchanged(mixed_run, engine):
    _, plain = mixed_run
    for question, (tokens, last) in zip(QUESTIONS, plain):
        solo = asyncio.run(collect(engine, dataclasses.replace(request("cd", question), strategy=None)))[0]
        assert tokens == solo
        assert last.report is None and last.usage.forward_passes == {BASE: len(tokens)}


def test_reports_and_forward_passes(mixed_run):
    runs, _ = mixed_run
    steps = len(runs[("cd", QUESTIONS[0])][0])
    assert steps == STEPS
    cd = runs[("cd", QUESTIONS[0])][1]
    assert cd.report.mode == "cd" and cd.report.guide == "exit8" and cd.report.steps == steps
    assert cd.usage.forward_passes == {BASE: steps, "smollm2-135m-exit8": steps}
    uscd = runs[("uscd", QUESTIONS[0])][1]
    # The base on the prompt and on the lame prompt, each prefill a pass or more (chunked across steps when the
    # mixed run's newcomers exceed a step's token budget).
    assert set(uscd.usage.forward_passes) == {BASE} and uscd.usage.forward_passes[BASE] >= 2 * steps
    # Exactly the steps where the reference found the base uncertain on the prompt (some, not all; none near λ).
    uscd_trace = reference_trace("uscd", QUESTIONS[0], tuple(runs[("uscd", QUESTIONS[0])][0]))
    assert not any(uscd_trace.borderline) and 0 < sum(uscd_trace.contrasted) < steps
    assert uscd.report.contrasted_steps == sum(uscd_trace.contrasted)
    fusion = runs[("fusion-dynamic-one-expert", QUESTIONS[0])][1]
    assert fusion.report.experts == ("concise",) and len(fusion.report.step_weights) == steps
    # Large = small on the embedded config: with one expert every step is the DLF identity case, alpha* = 1.
    assert all(w == (1.0,) for w in fusion.report.step_weights)
    assert fusion.usage.forward_passes == {BASE: 2 * steps}  # small base reuses the base's logits
    refusal = runs[("refusal-threshold", QUESTIONS[0])]
    assert refusal[1].report.action == "refuse" and refusal[1].report.category == "refuse"
    forced = refusal[1].report.forced_token_ids
    assert len(forced) > 1 and tuple(refusal[0][:len(forced)]) == forced  # the whole prefix, not its first token
    # Entropy switching: one forward per token of the model that writes it (the start model's prompt prefill gives
    # the first token; the other model is not prefilled until it first writes, then fed the prompt and the tokens
    # so far at once; then a catch-up extend or a decode step per token).
    for name in ("entropy-switch", "entropy-switch-large-first"):
        for question in QUESTIONS:
            tokens, last = runs[(name, question)]
            large = [step.large for step in last.report.trace]
            passes = {model: n for model, n in ((BASE, sum(large)), (EXIT8, steps - sum(large))) if n}
            assert last.usage.forward_passes == passes, (name, question)
            assert last.report.switches == sum(a != b for a, b in zip(large, large[1:]))


EXIT8 = "smollm2-135m-exit8"


def greedy(model: str, prompt: list[int], steps: int) -> list[int]:
    """One model's greedy tokens, recomputing the whole sequence every step (the independent reference's forward)."""
    tokens: list[int] = []
    for _ in range(steps):
        tokens.append(int(reference.logits(model, tuple(prompt + tokens))[0].argmax()))
    return tokens


def test_an_early_exit_amateur_on_the_prompt_is_read_from_the_bases_forward(tokenizer):
    """CD with the early-exit amateur on the base's own prompt: the host reads the amateur's logits from the base's
    forward (its head on the hidden state after layer 8) and opens no slot on the amateur's model; the fused scores
    equal a host that runs the amateur as a model of its own, step for step, beside a request whose amateur is on
    another context (a slot of its own). Entropy switching skips the base at some positions: its small model keeps
    a slot of its own."""
    loader = ModelLoader(LOCAL_CONFIG.models)

    def host(exits):
        runners = {BASE: ModelRunner(loader.load(BASE), vocab_size=len(tokenizer), max_slots=2, max_len=128,
                                     exit_layers=exits.values()),
                   EXIT8: ModelRunner(loader.load(EXIT8), vocab_size=len(tokenizer), max_slots=2, max_len=128)}
        return LockstepHost(runners, len(tokenizer), base_model=BASE, exits=exits)

    read, own = host(early_exits_of(LOCAL_CONFIG.models, BASE, [EXIT8])), host({})
    assert read.exits == {EXIT8: 8}
    prompts = {"same": tokenizer.encode("The capital of France is"), "other": tokenizer.encode("Once upon a time")}
    specs = {key: PlanSpec(plan=ContrastivePlan, params=ContrastiveParams(),
                           streams=(StreamSpec(EXIT8, tuple(prompts["same"])),), guide="exit8")
             for key in prompts}
    assert read.slots_needed(specs["same"], prompts["same"]) == {BASE: 1}
    assert read.slots_needed(specs["other"], prompts["other"]) == {BASE: 1, EXIT8: 1}
    assert own.slots_needed(specs["same"], prompts["same"]) == {BASE: 1, EXIT8: 1}
    switch = PlanSpec(plan=EntropySwitchPlan, params=EntropySwitchParams(threshold=1.0),
                      streams=specs["same"].streams, guide="exit8", threshold=1.0)
    assert read.slots_needed(switch, prompts["same"]) == {BASE: 1, EXIT8: 1}
    for h in (read, own):
        for key in prompts:
            h.add(key, specs[key], base_context=prompts[key])
    assert len(read.runners[EXIT8].live) == 1 and len(own.runners[EXIT8].live) == 2
    generated = {key: [] for key in prompts}
    for _ in range(8):
        rows = [(key, generated[key]) for key in prompts]
        fused = read.step(rows)
        assert torch.allclose(fused, own.step(rows), atol=1e-4)
        for key, row in zip(prompts, fused):
            generated[key].append(int(row.argmax()))
    assert read.forward_passes("same") == own.forward_passes("same") == {BASE: 8, EXIT8: 8}


def test_infinite_thresholds_give_one_models_greedy_output(engine):
    """τ = +∞: the small model's own greedy decoding, the large one never runs past its prefill; τ = −∞ from the
    large model: plain greedy decoding; τ = −∞ from the small model with min_span 0: its first token, then the
    large model's greedy continuation."""
    question = QUESTIONS[0]
    prompt = reference.render({"messages": [{"role": "user", "content": question}]})

    def run(**knobs):
        req = dataclasses.replace(request("cd", question, steps=12), strategy=EntropySwitchParams(**knobs))
        return asyncio.run(collect(engine, req))

    small_tokens, small_last = run(threshold=math.inf)
    assert small_tokens == greedy(EXIT8, prompt, 12)
    # The large model never wrote, so it never ran, not even on the prompt.
    assert small_last.report.large_tokens == 0 and small_last.usage.forward_passes == {EXIT8: 12}
    plain = asyncio.run(collect(engine, dataclasses.replace(request("cd", question, steps=12), strategy=None)))[0]
    large_tokens, large_last = run(threshold=-math.inf, min_span=0, start="large")
    assert large_tokens == plain and large_last.report.large_tokens == 12
    mixed_tokens, mixed_last = run(threshold=-math.inf, min_span=0)
    assert mixed_tokens[0] == small_tokens[0]
    assert mixed_tokens[1:] == greedy(BASE, prompt + mixed_tokens[:1], 11)
    assert (mixed_last.report.large_tokens, mixed_last.report.large_catch_up_tokens) == (11, 1)


def test_calibration_finds_a_threshold_whose_run_gives_the_fraction_it_reports(engine):
    prompts = QUESTIONS
    result = calibrate_entropy(engine, prompts, target=0.5, max_tokens=16, window=3, min_span=2, rounds=3,
                               tolerance=0.0, log=lambda line: None)
    assert len(result.runs) == 3 and (result.threshold, result.measured_fraction) in result.runs
    assert 0 < result.tokens <= 16 * len(prompts) and result.prompts == len(prompts)
    assert abs(result.measured_fraction - 0.5) == min(abs(f - 0.5) for _, f in result.runs)
    # Greedy: a request at the reported threshold gives exactly the reported fraction.
    large = total = 0
    for question in prompts:
        req = dataclasses.replace(request("cd", question, steps=16, ignore_eos=False), strategy=EntropySwitchParams(
            threshold=result.threshold, window=3, min_span=2))
        tokens, last = asyncio.run(collect(engine, req))
        large, total = large + last.report.large_tokens, total + len(tokens)
    assert large / total == pytest.approx(result.measured_fraction)
    assert f"entropy_threshold: {result.threshold:.3f}" in result.config_line("questions")


def test_bad_knobs_and_unservable_strategies(engine):
    def refused(strategy):
        req = dataclasses.replace(request("cd", QUESTIONS[0]), strategy=strategy)
        return asyncio.run(collect(engine, req))

    with pytest.raises(InvalidArgument, match="unknown guide 'nope'"):
        refused(ContrastiveParams(guide="nope"))
    with pytest.raises(InvalidArgument, match="unknown expert 'chemistry'"):
        refused(LogitFusionParams(experts=("chemistry",)))
    with pytest.raises(InvalidArgument, match="alphas"):
        refused(LogitFusionParams(mode="static", alphas=(1.0, 1.0, 1.0)))
    with pytest.raises(InvalidArgument, match="unknown guide 'tiny'"):
        refused(EntropySwitchParams(small="tiny"))


def test_strategy_the_config_cannot_serve_is_failed_precondition(model_path):
    bare = dataclasses.replace(GROUP, guides={}, refusal=None, max_batch_size=2)
    models = {BASE: dataclasses.replace(LOCAL_CONFIG.models[BASE], max_model_len=MAX_LEN)}
    small = TransformersEngine(models[BASE], bare)
    try:
        for strategy, needs in [(ContrastiveParams(), "amateur"), (LogitFusionParams(), "small_base"),
                                (RefusalSteeringParams(), "refusal"), (EntropySwitchParams(), "role 'small'")]:
            req = dataclasses.replace(request("cd", QUESTIONS[0]), strategy=strategy)
            with pytest.raises(FailedPrecondition, match=needs):
                asyncio.run(collect(small, req))
        assert small.strategy_support()["contrastive"] is not None
    finally:
        small.shutdown()
