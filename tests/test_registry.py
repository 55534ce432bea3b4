"""The strategy registry: every API strategy is either registered or UNIMPLEMENTED, and each entry converts its
protobuf message, reports its availability, and resolves to the plan of its own strategy."""

import pickle
from pathlib import Path

import pytest

from chorus.client import STRATEGIES
from chorus.v1 import decoding_pb2 as pb
from decoding.chat import ChatMessage
from decoding.plans import ContrastivePlan, EntropySwitchPlan, LogitFusionPlan, PlanSpec, RefusalPlan
from decoding.sampling import SamplingParams
from decoding.best_of_n import Bracket, Judgement, Match
from decoding.errors import InvalidArgument
from decoding.strategies import (BestOfNCandidate, BestOfNParams, BestOfNProgress, BestOfNReport, ContrastiveParams, ContrastiveReport, EntropySwitchParams, EntropySwitchReport,
                                 EntropySwitchStep, LogitFusionParams, LogitFusionReport, RefusalReport,
                                 RefusalSteeringParams)
from server.config import load_deploy_file, parse_chorus_config
from server.engines.base import GenerationRequest
from server.errors import FailedPrecondition, Unimplemented
from server.service import progress_proto, report_proto, to_strategy
from server.strategies import registry

CONFIG = load_deploy_file(Path(__file__).resolve().parents[1] / "deploy" / "local.yaml").chorus
GROUP = CONFIG.groups["smollm2"]
PLANS = {"contrastive": ContrastivePlan, "logit_fusion": LogitFusionPlan, "refusal_steering": RefusalPlan,
         "entropy_switch": EntropySwitchPlan}
REPORTS = {
    "contrastive": ContrastiveReport(mode="cd", guide="exit8", steps=3, contrasted_steps=2),
    "logit_fusion": LogitFusionReport(mode="dynamic", small_base="self", experts=("concise",), steps=2,
                                      mean_weights=(0.5,), step_weights=[(1.0,), (0.0,)]),
    "refusal_steering": RefusalReport(action="refuse", category="sorry", probabilities={"sorry": 0.7},
                                      respond_probability=0.3, forced_token_ids=(57, 58)),
    "entropy_switch": EntropySwitchReport(small="exit8", threshold=2.5, steps=4, large_tokens=1, switches=2,
                                          small_catch_up_tokens=1, large_catch_up_tokens=2, parameter_ratio=0.5,
                                          trace=[EntropySwitchStep(False, 3.0, 3.0), EntropySwitchStep(False, 2.0, 2.5),
                                                 EntropySwitchStep(True, 0.5, 1.8), EntropySwitchStep(False, 1.0, 1.6)]),
}


def test_every_api_strategy_is_registered_or_unimplemented():
    assert set(registry.REGISTRY) <= set(STRATEGIES)
    for field in STRATEGIES:
        if field in registry.REGISTRY:
            assert registry.strategy(field).field == field
        else:
            with pytest.raises(Unimplemented, match=field):
                registry.strategy(field)


def test_best_of_n_converts_its_message_with_composed_candidates_report_and_progress():
    request = pb.GenerateRequest(prompt="hi", best_of_n=pb.BestOfN(
        n=3, seed=5, both_orders=True, verdict=pb.BestOfN.VERDICT_SCORE, template=pb.BestOfN.TEMPLATE_GENERAL,
        sampling=pb.SamplingParams(temperature=0.9, max_tokens=12), contrastive=pb.ContrastiveDecoding(beta=0.25)))
    params = to_strategy(request)
    assert registry.strategy_of(params).kind == registry.REQUEST_LEVEL
    assert (params.n, params.seed, params.both_orders, params.verdict, params.template) == (3, 5, True, "score",
                                                                                            "general")
    assert dict(params.sampling_overrides) == {"temperature": pytest.approx(0.9), "max_tokens": 12}
    assert params.candidates == ContrastiveParams(beta=0.25)
    bad = pb.GenerateRequest(prompt="hi", best_of_n=pb.BestOfN(contrastive=pb.ContrastiveDecoding(alpha=2)))
    with pytest.raises(InvalidArgument) as error:
        to_strategy(bad)
    assert error.value.field == "best_of_n.contrastive.alpha"
    bracket = Bracket(matches=[Match(1, 0, 1, 1, (Judgement(0, 1, 0.0, 1.0, "tags", 9),), 0.0, 1.0),
                               Match(1, 2, 3, None)], byes=[(2, 4)], fallback_rounds=[], rounds=2, winner=1)
    report = BestOfNReport(selection="knockout", verdict="generate", both_orders=False, template="math",
                           judge="smollm2", seed=5, winner=1, judge_calls=1, judge_tokens=9, bracket=bracket,
                           candidates=[BestOfNCandidate("x", [1], "stop", "4"), BestOfNCandidate("y", [2], "length",
                                                                                               None)])
    message = report_proto("best_of_n", report).best_of_n
    assert (message.winner, message.judge_calls, message.rounds, message.candidates[0].answer) == (1, 1, 2, "4")
    assert message.bracket[0].winner == 1 and not message.bracket[1].HasField("winner")
    assert message.bracket[0].judgements[0].parse == "tags" and message.byes[0].candidate == 4
    progress = progress_proto("best_of_n", BestOfNProgress("round", round=1, remaining=2, judge_calls=1))
    assert progress.best_of_n.remaining == 2


def test_the_resolver_refuses_a_request_level_strategy(tokenizer):
    resolver = registry.PlanResolver(GROUP, tokenizer, 512, CONFIG.models)
    request = GenerationRequest(request_id="r", sampling=SamplingParams(), prompt="hi", strategy=BestOfNParams())
    with pytest.raises(Unimplemented, match="request-level"):
        resolver.resolve(request, [1, 2])


@pytest.mark.parametrize("field", list(PLANS))
def test_each_entry_converts_its_message_and_report(field):
    request = pb.GenerateRequest(prompt="hi")
    getattr(request, field).SetInParent()
    params = to_strategy(request)
    entry = registry.strategy(field)
    assert type(params) is entry.params_type and registry.strategy_of(params) is entry
    report = report_proto(field, REPORTS[field])
    assert report.WhichOneof("report") == field
    if field == "logit_fusion":
        assert [list(w.alphas) for w in report.logit_fusion.steps] == [[1.0], [0.0]]
    if field == "refusal_steering":
        assert list(report.refusal_steering.forced_token_ids) == [57, 58]
        assert report.refusal_steering.respond_probability == pytest.approx(0.3)
    if field == "entropy_switch":
        switch = report.entropy_switch
        assert (switch.small, switch.steps, switch.large_tokens, switch.switches) == ("exit8", 4, 1, 2)
        assert (switch.small_catch_up_tokens, switch.large_catch_up_tokens) == (1, 2)
        assert switch.large_fraction == 0.25 and switch.compute_saved == pytest.approx(1 - (0.25 + 0.75 * 0.5))
        assert [(s.large, s.entropy) for s in switch.trace] == [(False, 3.0), (False, 2.0), (True, 0.5), (False, 1.0)]


def test_availability_of_a_bare_group_says_what_to_declare():
    bare = parse_chorus_config({"models": {"m": {"path": "x"}}, "groups": {"g": {"base": "m"}}}).groups["g"]
    reasons = registry.availability(bare)
    assert set(reasons) == set(registry.REGISTRY)
    assert "role 'amateur'" in reasons["contrastive"]
    assert "role 'small_base'" in reasons["logit_fusion"]
    assert "refusal tokens or prefixes" in reasons["refusal_steering"]
    assert "role 'small'" in reasons["entropy_switch"]
    assert registry.availability(GROUP) == {field: None for field in registry.REGISTRY}


@pytest.mark.parametrize("field, params", [("contrastive", ContrastiveParams()),
                                           ("logit_fusion", LogitFusionParams()),
                                           ("refusal_steering", RefusalSteeringParams()),
                                           ("entropy_switch", EntropySwitchParams())])
def test_each_entry_resolves_to_its_own_plan_and_the_spec_pickles(field, params, tokenizer):
    resolver = registry.PlanResolver(GROUP, tokenizer, 512, CONFIG.models)
    request = GenerationRequest(request_id="r", sampling=SamplingParams(max_tokens=4),
                                messages=(ChatMessage("user", "hi"),), strategy=params)
    spec = resolver.resolve(request, tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                                                   add_generation_prompt=True, tokenize=True))
    assert spec.plan is PLANS[field]
    assert type(pickle.loads(pickle.dumps(spec)).build()) is PLANS[field]


def test_a_plan_refuses_another_strategys_params():
    with pytest.raises(TypeError, match="ContrastivePlan runs ContrastiveParams, not LogitFusionParams"):
        PlanSpec(plan=ContrastivePlan, params=LogitFusionParams()).build()


def test_a_strategy_the_group_cannot_serve_is_failed_precondition(tokenizer):
    bare = parse_chorus_config({"models": {"m": {"path": "x"}}, "groups": {"g": {"base": "m"}}}).groups["g"]
    resolver = registry.PlanResolver(bare, tokenizer, 512, {})
    request = GenerationRequest(request_id="r", sampling=SamplingParams(max_tokens=4), prompt="hi",
                                strategy=ContrastiveParams())
    with pytest.raises(FailedPrecondition, match="role 'amateur'"):
        resolver.resolve(request, [1, 2])
