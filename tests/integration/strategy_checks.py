"""End-to-end checks of the token-level strategies over gRPC, run against each server config that imports them
(test_server.py: transformers; test_vllm_server.py: vLLM with the fusion logits processor)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from chorus.v1 import decoding_pb2 as pb
from server.config import load_deploy_file
from tests.integration.conftest import ROOT, status_of, wait_for_load

BASE = "smollm2-135m-instruct"
QUESTION = "Give me a tip for staying healthy."
TOKENS = 24


def chat(question: str = QUESTION, **strategy) -> pb.GenerateRequest:
    return pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content=question)],
                              sampling=pb.SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True),
                              **strategy)


LAME = pb.Context(messages=[pb.ChatMessage(role="user", content="Answer.")])
NEGATIVE = pb.Context(prompt="Drink water. Sleep well. Eat vegetables.")
MODES = {
    "cd": dict(contrastive=pb.ContrastiveDecoding()),
    "uscd": dict(contrastive=pb.ContrastiveDecoding(mode=pb.ContrastiveDecoding.MODE_USCD, contrast_context=LAME)),
    "steer": dict(contrastive=pb.ContrastiveDecoding(mode=pb.ContrastiveDecoding.MODE_STEER,
                                                     contrast_context=NEGATIVE)),
    "fusion-dynamic": dict(logit_fusion=pb.LogitFusion(report_weights=True)),
    "fusion-static": dict(logit_fusion=pb.LogitFusion(mode=pb.LogitFusion.MODE_STATIC)),
    "refusal-argmax": dict(refusal_steering=pb.RefusalSteering()),
    "refusal-threshold": dict(refusal_steering=pb.RefusalSteering(mode=pb.RefusalSteering.MODE_THRESHOLD,
                                                                  threshold=0.0)),
    "refusal-logit-bias": dict(refusal_steering=pb.RefusalSteering(mode=pb.RefusalSteering.MODE_LOGIT_BIAS,
                                                                   bias=-5.0)),
    "entropy-switch": dict(entropy_switch=pb.EntropySwitch(trace=True)),
}


@pytest.fixture(scope="module")
def strategy_answers(stub):
    """Every mode's answer, all sent at once with two plain requests beside them. That batched answers equal solo
    ones and the naive full-recompute reference is checked in-process, where it is cheaper and exact
    (tests/test_lockstep_engine.py, tests/test_vllm_engine.py); the server adds routing and streaming, not
    batching."""
    requests = [chat(**fields) for fields in MODES.values()] + [chat("What is the capital of France?")] * 2
    with ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(lambda r: stub.Generate(r, timeout=600), requests))
    return dict(zip(MODES, answers))


def test_every_strategy_and_mode_answers_with_its_report(strategy_answers, server):
    answers = strategy_answers
    config = load_deploy_file(ROOT / server.config).chorus
    on_vllm = config.models[config.default_model].engine == "vllm"
    for name, response in answers.items():
        assert len(response.token_ids) == TOKENS and response.text, name
        which = response.report.WhichOneof("report")
        assert which == next(iter(MODES[name])), name
        if name != "entropy-switch" or on_vllm:  # on transformers switching runs the base only where it writes
            assert response.usage.forward_passes[BASE] >= TOKENS, name
    cd = answers["cd"].report.contrastive
    assert (cd.mode, cd.guide, cd.steps, cd.contrasted_steps) == ("cd", "exit8", TOKENS, TOKENS)
    assert answers["cd"].usage.forward_passes["smollm2-135m-exit8"] >= TOKENS
    assert answers["uscd"].report.contrastive.mode == "uscd"
    fusion = answers["fusion-dynamic"].report.logit_fusion
    assert list(fusion.experts) == ["concise", "french"] and len(fusion.steps) == TOKENS
    assert all(sum(1 for a in step.alphas if a) <= 1 for step in fusion.steps)  # one expert active per step
    refusal = answers["refusal-threshold"].report.refusal_steering
    assert refusal.decision == "refuse" and refusal.category == "refuse"
    assert list(answers["refusal-threshold"].token_ids[:len(refusal.forced_token_ids)]) == \
        list(refusal.forced_token_ids)
    assert answers["refusal-threshold"].text.startswith(("I'm sorry", "I cannot", "Sorry", "Unfortunately"))
    assert 0 <= refusal.probabilities["refuse"] <= 1
    assert answers["refusal-logit-bias"].report.refusal_steering.decision == "respond"
    switch = answers["entropy-switch"].report.entropy_switch
    assert (switch.small, switch.steps, len(switch.trace)) == ("exit8", TOKENS, TOKENS)
    assert switch.large_tokens == sum(s.large for s in switch.trace)
    assert switch.large_fraction == pytest.approx(switch.large_tokens / TOKENS)
    assert 0 < switch.parameter_ratio < 1 and switch.threshold > 0
    assert switch.compute_saved == pytest.approx(1 - (switch.large_fraction + (1 - switch.large_fraction)
                                                      * switch.parameter_ratio), abs=1e-5)
    assert all(s.entropy >= 0 for s in switch.trace)
    # One forward per token, of the model that wrote it (on vLLM the base runs at every position anyway), plus, for
    # the small model that starts, the extra passes of a prompt prefilled in chunks: all these requests arrive at
    # once and share each step's token budget (exact counts with whole-prompt prefills: test_lockstep_engine.py).
    small = "smollm2-135m-exit8"
    passes = {BASE: TOKENS if on_vllm else switch.large_tokens, small: TOKENS - switch.large_tokens}
    got = dict(answers["entropy-switch"].usage.forward_passes)
    assert set(got) == {model for model, n in passes.items() if n}, got
    assert got.get(BASE, 0) == passes[BASE], got
    assert passes[small] <= got[small] < passes[small] + answers["entropy-switch"].usage.prompt_tokens, got


def test_neutral_knobs_reduce_to_plain_greedy(stub):
    plain = stub.Generate(chat(), timeout=120).token_ids
    neutral = [
        dict(contrastive=pb.ContrastiveDecoding(beta=0.0)),
        dict(contrastive=pb.ContrastiveDecoding(mode=pb.ContrastiveDecoding.MODE_STEER, gamma=0.0, eta=0.0,
                                                contrast_context=NEGATIVE)),
        dict(logit_fusion=pb.LogitFusion(mode=pb.LogitFusion.MODE_STATIC, alphas=[0.0])),
    ]
    with ThreadPoolExecutor(len(neutral)) as pool:
        answers = list(pool.map(lambda fields: stub.Generate(chat(**fields), timeout=300).token_ids, neutral))
    for fields, tokens in zip(neutral, answers):
        assert tokens == plain, fields


@pytest.mark.parametrize("fields, code, field", [
    (dict(contrastive=pb.ContrastiveDecoding(alpha=1.5)), grpc.StatusCode.INVALID_ARGUMENT, "contrastive.alpha"),
    (dict(contrastive=pb.ContrastiveDecoding(alpha=0.0)), grpc.StatusCode.INVALID_ARGUMENT, "contrastive.alpha"),
    (dict(contrastive=pb.ContrastiveDecoding(beta=-1.0)), grpc.StatusCode.INVALID_ARGUMENT, "contrastive.beta"),
    (dict(contrastive=pb.ContrastiveDecoding(guide="gpt-5")), grpc.StatusCode.INVALID_ARGUMENT, "contrastive.guide"),
    (dict(contrastive=pb.ContrastiveDecoding(mode=pb.ContrastiveDecoding.MODE_USCD)),
     grpc.StatusCode.INVALID_ARGUMENT, "contrastive.contrast_context"),
    (dict(logit_fusion=pb.LogitFusion(experts=["law"])), grpc.StatusCode.INVALID_ARGUMENT, "logit_fusion.experts"),
    (dict(logit_fusion=pb.LogitFusion(grid_step=0.0)), grpc.StatusCode.INVALID_ARGUMENT, "logit_fusion.grid_step"),
    (dict(refusal_steering=pb.RefusalSteering(categories=["violence"])), grpc.StatusCode.INVALID_ARGUMENT,
     "refusal_steering"),
    (dict(refusal_steering=pb.RefusalSteering(softmax_temperature=0.0)), grpc.StatusCode.INVALID_ARGUMENT,
     "refusal_steering.softmax_temperature"),
    (dict(contrastive=pb.ContrastiveDecoding(mode=pb.ContrastiveDecoding.MODE_USCD, contrast_context=pb.Context(
        prompt="Answer.", messages=[pb.ChatMessage(role="user", content="Answer.")]))),
     grpc.StatusCode.INVALID_ARGUMENT, "contrastive.contrast_context"),
    (dict(entropy_switch=pb.EntropySwitch(window=0)), grpc.StatusCode.INVALID_ARGUMENT, "entropy_switch.window"),
    (dict(entropy_switch=pb.EntropySwitch(min_span=-1)), grpc.StatusCode.INVALID_ARGUMENT, "entropy_switch.min_span"),
    (dict(entropy_switch=pb.EntropySwitch(threshold=float("nan"))), grpc.StatusCode.INVALID_ARGUMENT,
     "entropy_switch.threshold"),
    (dict(entropy_switch=pb.EntropySwitch(small="gpt-5")), grpc.StatusCode.INVALID_ARGUMENT, "entropy_switch.small"),
    # Enum numbers the API does not declare (found by tests/integration/fuzz_checks.py: they were INTERNAL).
    (dict(contrastive=pb.ContrastiveDecoding(mode=99)), grpc.StatusCode.INVALID_ARGUMENT, "contrastive.mode"),
    (dict(logit_fusion=pb.LogitFusion(mode=-1)), grpc.StatusCode.INVALID_ARGUMENT, "logit_fusion.mode"),
    (dict(refusal_steering=pb.RefusalSteering(mode=14)), grpc.StatusCode.INVALID_ARGUMENT, "refusal_steering.mode"),
    (dict(entropy_switch=pb.EntropySwitch(start=3)), grpc.StatusCode.INVALID_ARGUMENT, "entropy_switch.start"),
    (dict(best_of_n=pb.BestOfN(verdict=7)), grpc.StatusCode.INVALID_ARGUMENT, "best_of_n.verdict"),
])
def test_bad_strategy_knobs_are_refused_with_a_usable_message(stub, fields, code, field):
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(chat(**fields), timeout=60)
    assert info.value.code() == code, info.value.details()
    assert info.value.details().startswith(field), info.value.details()


def test_list_models_reports_strategies_and_guides(stub):
    models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=30).models}
    support = {s.strategy: s for s in models[BASE].strategies}
    for strategy in ("plain", "contrastive", "logit_fusion", "refusal_steering", "entropy_switch", "best_of_n",
                     "rerank"):
        assert support[strategy].available, strategy
    assert models["exit8"].role == "amateur,small" and models["concise"].role == "expert:concise"
    assert models["self"].role == "small_base"


@pytest.mark.parametrize("mode", ["cd", "entropy-switch"])
def test_a_strategy_streams_the_unary_completion_with_the_report_on_the_last_message_only(mode, stub):
    # Both alone: batched runs give the same tokens, but a report's floats (entropies) may differ in the last bits
    # with the batch's shape on vLLM.
    unary = stub.Generate(chat(**MODES[mode]), timeout=300)
    messages = list(stub.GenerateStream(chat(**MODES[mode]), timeout=300))
    last = messages[-1]
    assert len(messages) > 1
    assert "".join(m.text for m in messages) == unary.text
    assert [t for m in messages for t in m.token_ids] == list(unary.token_ids)
    for m in messages[:-1]:
        assert not (m.HasField("report") or m.HasField("usage") or m.seed or m.finish_reason), m
    assert last.report == unary.report and last.finish_reason == unary.finish_reason
    assert last.usage == unary.usage


# Every strategy knob at a value other than its default, each where its effect is known without the model: the
# same tokens as plain greedy (a knob that did not arrive would leave the default's contrast), other tokens, or the
# report. Short completions, all requests at once.
KNOB_TOKENS = 4
C, F, R, E = pb.ContrastiveDecoding, pb.LogitFusion, pb.RefusalSteering, pb.EntropySwitch
PREFIXES = [pb.RefusalPrefix(category="apology", text="Sorry"), pb.RefusalPrefix(category="apology", text="I'm sorry"),
            pb.RefusalPrefix(category="decline", text="Unfortunately")]
KNOBS = {
    "plain": {},
    # alpha = 1 keeps only the base's argmax plausible.
    "cd-alpha": dict(contrastive=C(alpha=1.0)),
    # The base as its own amateur: (1+beta)·log p − beta·log softmax(z/0.5) = (1−beta)·z + c, so beta = 2 picks
    # the least likely plausible token (beta = 0.5 or amateur_temperature = 1 would give plain greedy).
    "cd-self": dict(contrastive=C(guide="self", beta=2.0, amateur_temperature=0.5)),
    # No step is uncertain: plain greedy, nothing contrasted.
    "uscd-threshold": dict(contrastive=C(mode=C.MODE_USCD, contrast_context=LAME, uncertainty_threshold=0.0)),
    # The mixture is the base alone.
    "uscd-lame-weight": dict(contrastive=C(mode=C.MODE_USCD, contrast_context=LAME, lame_weight=0.0)),
    # Both weights doubled: the mixture scales, the choice stays the default's (strategy_answers' "uscd"); either weight
    # alone at its default would change the mixture.
    "uscd-weights": dict(contrastive=C(mode=C.MODE_USCD, contrast_context=LAME, standard_weight=2.0,
                                       lame_weight=-1.4)),
    # No token reaches uscd_eta / V: the standard argmax.
    "uscd-eta": dict(contrastive=C(mode=C.MODE_USCD, contrast_context=LAME, uscd_eta=1e9)),
    # eta = 0 drops the negative context; gamma = 0 the guide: plain greedy. gamma = 2 makes the guide count.
    "steer-neutral": dict(contrastive=C(mode=C.MODE_STEER, contrast_context=NEGATIVE, guide="exit8", gamma=0.0,
                                        eta=0.0)),
    "steer-gamma": dict(contrastive=C(mode=C.MODE_STEER, contrast_context=NEGATIVE, guide="exit8", gamma=2.0,
                                      eta=0.0)),
    "fusion-grid": dict(logit_fusion=F(experts=["french", "concise"], grid_max=1.0, grid_step=0.5,
                                       report_weights=True)),
    # The small base is the base itself here: with every alpha 0 the fusion is the base.
    "fusion-grid-zero": dict(logit_fusion=F(grid_max=0.0)),
    "fusion-static": dict(logit_fusion=F(mode=F.MODE_STATIC, alphas=[0.5, 1.5], small_base="exit8")),
    "refusal-thresholds": dict(refusal_steering=R(mode=R.MODE_THRESHOLD, threshold=2.0, thresholds={"refuse": 0.0})),
    "refusal-biases": dict(refusal_steering=R(mode=R.MODE_LOGIT_BIAS, bias=-100.0, biases={"refuse": 100.0})),
    "refusal-temperature": dict(refusal_steering=R(mode=R.MODE_THRESHOLD, threshold=2.0, thresholds={"refuse": 0.0},
                                                   softmax_temperature=2.0)),
    "refusal-apology": dict(refusal_steering=R(mode=R.MODE_THRESHOLD, threshold=0.0, refusal_prefixes=PREFIXES,
                                               categories=["apology"])),
    "refusal-decline": dict(refusal_steering=R(mode=R.MODE_THRESHOLD, threshold=0.0, refusal_prefixes=PREFIXES,
                                               categories=["decline"])),
    # The large model (the base) from the start and never left: plain greedy.
    "switch-large": dict(entropy_switch=E(threshold=float("-inf"), min_span=0, start=E.START_LARGE)),
    # The small model throughout (the guide named), then the large one after a span of 2.
    "switch-small": dict(entropy_switch=E(threshold=float("inf"), small="exit8", trace=True)),
    "switch-span": dict(entropy_switch=E(threshold=float("-inf"), window=1, min_span=2, trace=True)),
}


def knob_request(fields: dict) -> pb.GenerateRequest:
    request = chat(**fields)
    request.sampling.max_tokens = KNOB_TOKENS
    return request


def test_every_strategy_knob_at_a_non_default_value_is_accepted_and_takes_effect(strategy_answers, stub):
    with ThreadPoolExecutor(len(KNOBS)) as pool:
        runs = dict(zip(KNOBS, pool.map(lambda f: stub.Generate(knob_request(f), timeout=600), KNOBS.values())))
    plain = runs["plain"].token_ids
    tokens = {name: run.token_ids for name, run in runs.items()}
    report = {name: getattr(run.report, run.report.WhichOneof("report") or "contrastive") for name, run in runs.items()}

    for name in ("cd-alpha", "uscd-threshold", "uscd-lame-weight", "uscd-eta", "steer-neutral", "fusion-grid-zero",
                 "switch-large"):
        assert tokens[name] == plain, name
    for name in ("cd-self", "steer-gamma"):
        assert tokens[name] != plain, name
    assert (report["cd-self"].guide, report["steer-neutral"].guide) == ("self", "exit8")
    assert tokens["uscd-weights"] == strategy_answers["uscd"].token_ids[:KNOB_TOKENS]
    assert report["uscd-threshold"].contrasted_steps == 0
    for name in ("uscd-lame-weight", "uscd-eta"):  # the default threshold is above SmolLM2's 1/√V: every step
        assert report[name].contrasted_steps == report[name].steps == KNOB_TOKENS, name

    grid = report["fusion-grid"]
    assert list(grid.experts) == ["french", "concise"] and len(grid.steps) == KNOB_TOKENS
    assert {a for step in grid.steps for a in step.alphas} <= {0.0, 0.5, 1.0}
    for i, mean in enumerate(grid.mean_weights):
        assert mean == pytest.approx(sum(step.alphas[i] for step in grid.steps) / KNOB_TOKENS)
    assert list(report["fusion-grid-zero"].mean_weights) == [0.0, 0.0] and not report["fusion-grid-zero"].steps
    static = report["fusion-static"]
    assert (static.mode, static.small_base, list(static.mean_weights)) == ("static", "exit8", [0.5, 1.5])

    # The per-category value overrides the global one (which says the opposite).
    for name in ("refusal-thresholds", "refusal-biases", "refusal-temperature"):
        assert report[name].decision == "refuse", name
        assert tokens[name][:len(report[name].forced_token_ids)] == report[name].forced_token_ids, name
    refused = runs["refusal-thresholds"]
    assert refused.text.startswith(("I'm sorry", "I cannot", "Sorry", "Unfortunately")), refused.text
    # Prefix mode: P_respond = 1 − Σ P_c; a softmax temperature changes them all.
    for name in ("refusal-thresholds", "refusal-temperature", "refusal-apology"):
        assert report[name].respond_probability == pytest.approx(1 - sum(report[name].probabilities.values()),
                                                                 abs=1e-5), name
    assert report["refusal-temperature"].probabilities["refuse"] != \
        pytest.approx(report["refusal-thresholds"].probabilities["refuse"], rel=1e-3)
    # The request's prefixes replace the config's categories; only the controlled category may be refused, and the
    # model is left alone when the most likely category is not controlled.
    probabilities = report["refusal-apology"].probabilities
    assert set(probabilities) == {"apology", "decline"}
    top = max(probabilities, key=probabilities.get)
    other = ({"apology", "decline"} - {top}).pop()
    assert (report[f"refusal-{top}"].decision, report[f"refusal-{top}"].category) == ("refuse", top)
    assert report[f"refusal-{other}"].decision == "none" and tokens[f"refusal-{other}"] == plain
    assert runs[f"refusal-{top}"].text.startswith(("Sorry", "I'm sorry", "Unfortunately"))

    assert report["switch-large"].large_tokens == KNOB_TOKENS and not report["switch-large"].trace
    assert [s.large for s in report["switch-small"].trace] == [False] * KNOB_TOKENS
    assert report["switch-small"].small == "exit8" and tokens["switch-small"] != plain
    assert [s.large for s in report["switch-span"].trace] == [False, False, True, True]
    assert report["switch-span"].large_catch_up_tokens == 2 and report["switch-span"].switches == 1


def test_cancelled_and_expired_strategy_requests_give_back_their_guide_slots(stub, server):
    """A request of every strategy and mode is cancelled, then as many entropy-switching requests as the group has
    slots expire; then as many entropy-switching requests as there are slots (each takes one on the base and one on
    the small model: its small model runs without the base, so it is never read from the base's forward as CD's
    early-exit amateur is) must all run at once."""
    config = load_deploy_file(ROOT / server.config).chorus
    slots = next(g for g in config.groups.values() if g.base == config.default_model).max_batch_size

    def long(fields: dict, **prompt) -> pb.GenerateRequest:
        request = chat(**fields)
        if prompt:  # a raw prompt of a few tokens: cheap prefills
            request.ClearField("messages")
            request.prompt = prompt["prompt"]
        request.sampling.max_tokens = 900
        return request

    def first_token_then_cancel(stream) -> None:
        next(stream)
        stream.cancel()

    # Cancelled while decoding, each as soon as it has its slots and its first token (the others queue meanwhile).
    cancelled = [long(fields) for fields in MODES.values()]
    with ThreadPoolExecutor(len(cancelled)) as pool:
        list(pool.map(first_token_then_cancel, [stub.GenerateStream(r, timeout=300) for r in cancelled]))
    # Expired while decoding or waiting.
    with ThreadPoolExecutor(slots) as pool:
        codes = list(pool.map(lambda r: status_of(lambda: stub.Generate(r, timeout=2)),
                              [long(MODES["entropy-switch"], prompt=f"Count to {i}:") for i in range(slots)]))
    assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * slots, f"{codes}:\n{server.log()[-3000:]}"
    # Every slot is free again: `slots` long requests are all admitted (a first token each) together.
    streams = [stub.GenerateStream(long(MODES["entropy-switch"], prompt=f"Count to {i}:"), timeout=120)
               for i in range(slots)]
    try:
        for stream in streams:
            next(stream)
    finally:
        for stream in streams:
            stream.cancel()
    wait_for_load(stub)


def test_list_models_describes_every_model_of_the_config(stub, server):
    config = load_deploy_file(ROOT / server.config).chorus
    wait_for_load(stub)
    models = stub.ListModels(pb.ListModelsRequest(), timeout=30).models
    expected = []
    for group in config.groups.values():
        base = config.models[group.base]
        expected.append((base.name, "base", group.name, base.engine, base.device, base.dtype, base.max_model_len,
                         base.name == config.default_model))
        # A guide runs on transformers (on vLLM inside the fusion processor), with its own model's device and dtype.
        expected += [(guide.name, ",".join(guide.roles), group.name, "transformers", config.models[guide.model].device,
                      config.models[guide.model].dtype, base.max_model_len, False) for guide in group.guides.values()]
    got = [(m.name, m.role, m.group, m.engine, m.device, m.dtype, m.max_model_len, m.is_default) for m in models]
    assert got == expected
    for m in models:
        if m.role == "base":
            assert (m.running_requests, m.waiting_requests) == (0, 0)
            assert [s.strategy for s in m.strategies] == ["plain", "contrastive", "logit_fusion", "entropy_switch",
                                                          "refusal_steering", "best_of_n", "rerank"]
            for s in m.strategies:
                assert s.available != bool(s.reason), s
        else:
            assert not m.strategies
