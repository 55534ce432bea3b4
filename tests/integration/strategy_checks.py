"""End-to-end checks of the token-level strategies over gRPC, run against each server config that imports them
(test_server.py: transformers; test_vllm_server.py: vLLM with the fusion logits processor)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from chorus.v1 import decoding_pb2 as pb

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
}


@pytest.fixture(scope="module")
def strategy_runs(stub):
    """Every mode alone, then all of them at once with plain requests beside them."""
    alone = {name: stub.Generate(chat(**fields), timeout=300) for name, fields in MODES.items()}
    plain = [chat(q) for q in ("What is the capital of France?", "Name three primary colors.")]
    requests = [chat(**fields) for fields in MODES.values()] + plain
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda r: stub.Generate(r, timeout=600), requests))
    return alone, dict(zip(MODES, together)), together[len(MODES):], [stub.Generate(p, timeout=120) for p in plain]


def test_every_strategy_and_mode_answers_with_its_report(strategy_runs):
    alone, _, _, _ = strategy_runs
    for name, response in alone.items():
        assert len(response.token_ids) == TOKENS and response.text, name
        which = response.report.WhichOneof("report")
        assert which == next(iter(MODES[name])), name
        assert response.usage.forward_passes[BASE] >= TOKENS, name
    cd = alone["cd"].report.contrastive
    assert (cd.mode, cd.guide, cd.steps, cd.contrasted_steps) == ("cd", "exit8", TOKENS, TOKENS)
    assert alone["cd"].usage.forward_passes["smollm2-135m-exit8"] >= TOKENS
    assert alone["uscd"].report.contrastive.mode == "uscd"
    fusion = alone["fusion-dynamic"].report.logit_fusion
    assert list(fusion.experts) == ["concise", "french"] and len(fusion.steps) == TOKENS
    assert all(sum(1 for a in step.alphas if a) <= 1 for step in fusion.steps)  # one expert active per step
    refusal = alone["refusal-threshold"].report.refusal_steering
    assert refusal.decision == "refuse" and refusal.category == "refuse"
    assert list(alone["refusal-threshold"].token_ids[:len(refusal.forced_token_ids)]) == \
        list(refusal.forced_token_ids)
    assert alone["refusal-threshold"].text.startswith(("I'm sorry", "I cannot", "Sorry", "Unfortunately"))
    assert 0 <= refusal.probabilities["refuse"] <= 1
    assert alone["refusal-logit-bias"].report.refusal_steering.decision == "respond"


def test_strategies_mixed_with_plain_requests_equal_their_solo_runs(strategy_runs):
    alone, together, plain_together, plain_alone = strategy_runs
    for name in MODES:
        assert together[name].token_ids == alone[name].token_ids, name
    assert [r.token_ids for r in plain_together] == [r.token_ids for r in plain_alone]


def test_neutral_knobs_reduce_to_plain_greedy(stub):
    plain = stub.Generate(chat(), timeout=120).token_ids
    neutral = [
        dict(contrastive=pb.ContrastiveDecoding(beta=0.0)),
        dict(contrastive=pb.ContrastiveDecoding(mode=pb.ContrastiveDecoding.MODE_STEER, gamma=0.0, eta=0.0,
                                                contrast_context=NEGATIVE)),
        dict(logit_fusion=pb.LogitFusion(mode=pb.LogitFusion.MODE_STATIC, alphas=[0.0])),
    ]
    for fields in neutral:
        assert stub.Generate(chat(**fields), timeout=300).token_ids == plain, fields


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
    (dict(entropy_switch=pb.EntropySwitch()), grpc.StatusCode.UNIMPLEMENTED, "strategy 'entropy_switch'"),
])
def test_bad_strategy_knobs_are_refused_with_a_usable_message(stub, fields, code, field):
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(chat(**fields), timeout=60)
    assert info.value.code() == code, info.value.details()
    assert info.value.details().startswith(field), info.value.details()


def test_list_models_reports_strategies_and_guides(stub):
    models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=30).models}
    support = {s.strategy: s for s in models[BASE].strategies}
    for strategy in ("plain", "contrastive", "logit_fusion", "refusal_steering"):
        assert support[strategy].available, strategy
    for strategy in ("entropy_switch", "best_of_n", "rerank"):
        assert not support[strategy].available and support[strategy].reason
    assert models["exit8"].role == "amateur" and models["concise"].role == "expert:concise"
    assert models["self"].role == "small_base"
