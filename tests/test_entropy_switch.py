"""Entropy-adaptive model switching: the entropy in bits, the switching rule on the hand example, the plan's stream
selection and report (single and batched steps, a position stepped again, a replay), the knobs, the strategy
layer's errors, calibration's quantile, and the catch-up of a skipped model on real weights. The engines' tokens and
reports against the independent reference are in test_lockstep_engine.py and test_vllm_engine.py (cases
`entropy-switch*` of tests/strategy_cases.py); through the real server in tests/integration."""

from __future__ import annotations

import math

import pytest
import torch

from chorus.v1 import decoding_pb2 as pb
from decoding import entropy_switch
from decoding.chat import ChatMessage
from decoding.errors import InvalidArgument
from decoding.plans import EntropySwitchPlan, PlanSpec, StreamSpec
from decoding.sampling import SamplingParams
from decoding.strategies import EntropySwitchParams
from server.config import parse_chorus_config
from server.engines.base import GenerationRequest
from server.errors import ConfigError, FailedPrecondition
from server.lockstep.guides import ModelLoader
from server.lockstep.host import LockstepHost
from server.lockstep.runner import ModelRunner
from server.strategies import entropy_switch as strategy
from server.strategies.registry import PlanResolver
from tests.strategy_cases import BASE, GROUP, LOCAL_CONFIG

NEG = float("-inf")
V = 8
# A row with entropy 2 bits (uniform over 4 tokens; token 1 first among equals) and one with 0 bits (one-hot on 5).
UNSURE = torch.tensor([NEG, 0.0, 0.0, 0.0, 0.0, NEG, NEG, NEG])
SURE = torch.tensor([NEG, NEG, NEG, NEG, NEG, 0.0, NEG, NEG])


def test_entropy_in_bits():
    assert float(entropy_switch.entropy_bits(torch.zeros(4))) == pytest.approx(2.0)
    assert float(entropy_switch.entropy_bits(torch.tensor([3.0, 3.0]))) == pytest.approx(1.0)
    one_hot = entropy_switch.entropy_bits(torch.tensor([0.0, NEG, NEG]))
    assert float(one_hot) == 0.0 and not torch.isnan(one_hot)
    # Batched, and temperature is not applied: z and 2z differ.
    rows = torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0]])
    h = entropy_switch.entropy_bits(rows)
    p = torch.softmax(rows[0].double(), -1)
    assert float(h[0]) == pytest.approx(float(-(p * p.log2()).sum()), abs=1e-6)
    assert float(h[1]) < float(h[0])


def test_the_hand_example_of_the_switching_rule():
    """w = 2, τ = 1.5, d_min = 2, start small: H = 2, 2 on S → switch to L; H = 0 → H̄ = 1 but c = 1: stay;
    H = 0 → H̄ = 0, c = 2: back to S."""
    state = entropy_switch.SwitchState(active="small")
    seen = []
    for h in (2.0, 2.0, 0.0, 0.0):
        writer = state.active
        rolling = entropy_switch.advance(state, h, threshold=1.5, window=2, min_span=2)
        seen.append((writer, rolling, state.active, state.span))
    assert seen == [("small", 2.0, "small", 1), ("small", 2.0, "large", 0),
                    ("large", 1.0, "large", 1), ("large", 0.0, "small", 0)]


def test_the_large_model_is_chosen_only_strictly_above_the_threshold():
    state = entropy_switch.SwitchState(active="small")
    entropy_switch.advance(state, 1.5, threshold=1.5, window=1, min_span=0)
    assert state.active == "small"
    entropy_switch.advance(state, 1.5000001, threshold=1.5, window=1, min_span=0)
    assert state.active == "large"


def plan(threshold=1.5, window=2, min_span=2, start="small", trace=True) -> EntropySwitchPlan:
    params = EntropySwitchParams(threshold=threshold, window=window, min_span=min_span, start=start,
                                 trace=trace).validate()
    return PlanSpec(plan=EntropySwitchPlan, params=params, streams=(StreamSpec("small-model", (1, 2)),),
                    guide="tiny", threshold=threshold, parameter_ratio=0.25).build()


def drive(p: EntropySwitchPlan, small_rows, large_rows, steps: int) -> list[str]:
    """Steps `p` as the host does: only the active model's row is handed in. Returns the writer per step."""
    writers = []
    for position in range(steps):
        large = p.needs_base(position)
        assert p.streams_at(position) == (() if large else (0,))
        base = large_rows[position] if large else torch.full((V,), float("nan"))  # a skipped base: stale
        streams = torch.empty((0, V)) if large else small_rows[position][None]
        scores = p.step(base, streams, position)
        assert torch.equal(scores, large_rows[position] if large else small_rows[position])
        writers.append("L" if large else "S")
    return writers


def test_the_plan_steps_only_the_active_model_and_reports_the_hand_example():
    p = plan()
    # The small model is always unsure, the large one always sure: S S L L S S L L ...
    writers = drive(p, [UNSURE] * 8, [SURE] * 8, 8)
    assert "".join(writers) == "SSLLSSLL"
    report = p.report()
    assert (report.small, report.threshold, report.steps, report.large_tokens, report.switches) == (
        "tiny", 1.5, 8, 4, 3)
    assert report.large_fraction == 0.5
    # Large catches up at 2 (the 2 tokens S wrote) and 6 (4 and 5); S at 4 (the 2 L wrote).
    assert (report.large_catch_up_tokens, report.small_catch_up_tokens) == (4, 2)
    assert [s.large for s in report.trace] == [w == "L" for w in writers]
    assert [s.entropy for s in report.trace] == pytest.approx([2, 2, 0, 0, 2, 2, 0, 0], abs=1e-6)
    assert [s.rolling_entropy for s in report.trace] == pytest.approx([2, 2, 1, 0, 1, 2, 1, 0], abs=1e-6)
    proto = strategy.report_to_proto(report)
    assert proto.large_fraction == 0.5 and proto.parameter_ratio == 0.25
    assert proto.compute_saved == pytest.approx(1 - (0.5 + 0.5 * 0.25))
    # The report of a plan rebuilt elsewhere from the records alone (the vLLM report channel) is the same.
    rebuilt = plan().replay(dict(enumerate(p.records())))
    assert rebuilt.report() == report


def test_infinite_thresholds_keep_one_model():
    assert set(drive(plan(threshold=math.inf, min_span=0), [UNSURE] * 6, [SURE] * 6, 6)) == {"S"}
    assert drive(plan(threshold=-math.inf, min_span=0), [SURE] * 6, [SURE] * 6, 6) == ["S"] + ["L"] * 5
    assert set(drive(plan(threshold=-math.inf, min_span=0, start="large"), [SURE] * 6, [SURE] * 6, 6)) == {"L"}


def test_the_minimum_span_holds_a_model_however_sure_it_is():
    writers = "".join(drive(plan(threshold=1.0, window=1, min_span=3), [UNSURE] * 12, [SURE] * 12, 12))
    assert writers == "SSSLLLSSSLLL"
    assert "".join(drive(plan(threshold=1.0, window=1, min_span=0), [UNSURE] * 6, [SURE] * 6, 6)) == "SLSLSL"


def test_batched_steps_equal_single_steps_and_a_repeated_position_is_replaced():
    rows = [[UNSURE, SURE, UNSURE, UNSURE, SURE, UNSURE], [SURE] * 6]
    configs = [dict(threshold=1.5, window=2, min_span=2), dict(threshold=0.5, window=1, min_span=0, start="large"),
               dict(threshold=math.inf, min_span=0)]
    solo = [plan(**c) for c in configs]
    together = [plan(**c) for c in configs]
    for position in range(6):
        bases, streams = [], []
        for p in together:
            large = p.needs_base(position)
            bases.append(rows[1][position] if large else torch.zeros(V))
            streams.append(torch.empty((0, V)) if large else rows[0][position][None])
        fused = EntropySwitchPlan.step_rows(together, torch.stack(bases), streams, [position] * len(together))
        for i, p in enumerate(solo):
            large = p.needs_base(position)
            one = p.step(rows[1][position] if large else torch.zeros(V),
                         torch.empty((0, V)) if large else rows[0][position][None], position)
            assert torch.equal(fused[i], one)
    assert [p.report() for p in together] == [p.report() for p in solo]
    # vLLM may fuse a position again (partial prefills); the record is replaced and the state replayed.
    again = plan()
    drive(again, [UNSURE] * 4, [SURE] * 4, 4)
    assert again.needs_base(3)
    again.step(SURE, torch.empty((0, V)), 3)
    assert again.steps == 4 and again.report() == drive_report([UNSURE] * 4, [SURE] * 4, 4)


def drive_report(small_rows, large_rows, steps):
    p = plan()
    drive(p, small_rows, large_rows, steps)
    return p.report()


@pytest.mark.parametrize("knobs, field", [({"window": 0}, "entropy_switch.window"),
                                          ({"min_span": -1}, "entropy_switch.min_span"),
                                          ({"threshold": math.nan}, "entropy_switch.threshold")])
def test_bad_knobs_name_their_field(knobs, field):
    with pytest.raises(InvalidArgument) as error:
        strategy.from_proto(pb.EntropySwitch(**knobs))
    assert error.value.field == field


def test_knobs_from_the_request_and_their_defaults():
    assert strategy.from_proto(pb.EntropySwitch()) == EntropySwitchParams(threshold=None, window=5, min_span=10,
                                                                          small="", start="small", trace=False)
    params = strategy.from_proto(pb.EntropySwitch(threshold=-math.inf, window=3, min_span=0, small="exit8",
                                                  start=pb.EntropySwitch.START_LARGE, trace=True))
    assert params == EntropySwitchParams(threshold=-math.inf, window=3, min_span=0, small="exit8", start="large",
                                         trace=True)


def chat_request(strategy_params) -> GenerationRequest:
    return GenerationRequest(request_id="r", sampling=SamplingParams(max_tokens=4),
                             messages=(ChatMessage("user", "hi"),), strategy=strategy_params)


def group_with(guides: dict, threshold=None):
    group = {"base": "m", "guides": guides}
    if threshold is not None:
        group["entropy_threshold"] = threshold
    return parse_chorus_config({"models": {"m": {"path": "embedded:smollm2-135m-instruct"},
                                           "s": {"path": "embedded:smollm2-135m-instruct", "early_exit_layers": 4}},
                                "groups": {"g": group}})


def test_the_strategy_layer_resolves_the_small_guide_and_the_default_threshold(tokenizer):
    config = LOCAL_CONFIG
    resolver = PlanResolver(GROUP, tokenizer, 512, config.models)
    spec = resolver.resolve(chat_request(EntropySwitchParams()), [1, 2, 3])
    assert spec.plan is EntropySwitchPlan and spec.guide == "exit8"
    assert spec.streams == (StreamSpec("smollm2-135m-exit8", (1, 2, 3)),)
    assert spec.threshold == GROUP.entropy_threshold
    # P_S / P_L: 8 of 30 layers plus the head, over the whole model without its input embedding.
    assert spec.parameter_ratio == pytest.approx(56_632_896 / 134_515_008)
    assert resolver.resolve(chat_request(EntropySwitchParams(threshold=0.25)), [1, 2, 3]).threshold == 0.25


def test_the_strategy_layer_refuses_what_it_cannot_serve(tokenizer):
    config = group_with({"tiny": {"model": "s", "roles": ["small"]}, "me": {"model": "m", "roles": ["amateur"]}})
    resolver = PlanResolver(config.groups["g"], tokenizer, 512, config.models)
    with pytest.raises(FailedPrecondition, match="entropy_threshold"):
        resolver.resolve(chat_request(EntropySwitchParams()), [1, 2])
    with pytest.raises(InvalidArgument) as error:
        resolver.resolve(chat_request(EntropySwitchParams(threshold=1.0, small="nope")), [1, 2])
    assert error.value.field == "entropy_switch.small" and "unknown guide" in str(error.value)
    with pytest.raises(InvalidArgument, match="the base model itself"):
        resolver.resolve(chat_request(EntropySwitchParams(threshold=1.0, small="me")), [1, 2])
    bare = group_with({"me": {"model": "m", "roles": ["amateur"]}}, threshold=1.0)
    assert "role 'small'" in strategy.availability(bare.groups["g"])
    with pytest.raises(FailedPrecondition, match="role 'small'"):
        PlanResolver(bare.groups["g"], tokenizer, 512, bare.models).resolve(chat_request(EntropySwitchParams()),
                                                                            [1, 2])
    assert strategy.availability(group_with({"tiny": {"model": "s", "roles": ["small"]}}, 2.0).groups["g"]) is None


@pytest.mark.parametrize("threshold", [math.inf, math.nan, "high", True])
def test_a_config_threshold_must_be_a_finite_number(threshold):
    with pytest.raises(ConfigError, match="groups.g.entropy_threshold"):
        group_with({"tiny": {"model": "s", "roles": ["small"]}}, threshold)


def test_calibration_takes_the_quantile_of_the_rolling_entropies():
    values = [float(v) for v in range(1, 11)]  # 1..10
    threshold = entropy_switch.threshold_for_fraction(values, 0.3)
    assert sum(v > threshold for v in values) == 3
    with pytest.raises(ValueError):
        entropy_switch.threshold_for_fraction(values, 1.0)
    with pytest.raises(ValueError):
        entropy_switch.threshold_for_fraction([], 0.5)


@pytest.mark.parametrize("start, threshold, expected", [("small", -math.inf, "SSSLLLL"),
                                                        ("large", math.inf, "LLLSSSS")])
def test_a_model_skipped_for_several_positions_catches_up_to_a_fresh_forward(start, threshold, expected, hf_model,
                                                                             tokenizer):
    """The model that did not write for three positions catches up on those tokens in one extend of its kept KV
    cache; its logits then equal a full forward over the prompt and every token so far."""
    loader = ModelLoader(LOCAL_CONFIG.models)
    small_model = "smollm2-135m-exit8"
    runners = {name: ModelRunner(loader.load(name), vocab_size=len(tokenizer), max_slots=2, max_len=128)
               for name in (BASE, small_model)}
    host = LockstepHost(runners, len(tokenizer), base_model=BASE)
    prompt = tokenizer.encode("The capital of France is")
    params = EntropySwitchParams(threshold=threshold, window=1, min_span=3, start=start)
    spec = PlanSpec(plan=EntropySwitchPlan, params=params, streams=(StreamSpec(small_model, tuple(prompt)),),
                    guide="exit8", threshold=threshold)
    host.add("r", spec, base_context=prompt)
    generated: list[int] = []
    writers = ""
    for _ in range(len(expected)):
        large = host.plan("r").needs_base(len(generated))
        writers += "L" if large else "S"
        scores = host.step([("r", generated)])
        request = host._requests["r"]
        stream = request.base if large else request.streams[0]
        model = hf_model if large else loader.load(small_model)
        with torch.inference_mode():
            fresh = model(torch.tensor([prompt + generated])).logits[0, -1, :len(tokenizer)]
        assert torch.allclose(stream.logits[:len(tokenizer)].float(), fresh, atol=1e-4), (writers, len(generated))
        assert torch.equal(scores[0], stream.logits[:len(tokenizer)].float())
        generated.append(int(scores[0].argmax()))
    assert writers == expected
    # One forward per token a model wrote: the start model's prompt prefill gives the first token, the other model's
    # first forward feeds the prompt and the tokens so far at once (it was not prefilled at the start), then one
    # catch-up extend or decode step per token.
    assert host.forward_passes("r") == {BASE: writers.count("L"), small_model: writers.count("S")}
