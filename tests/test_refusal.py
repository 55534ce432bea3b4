"""Refusal steering decisions on the hand examples of ALGORITHMS.md section 4, monotonicity and validation."""

import math

import pytest
import torch

from decoding.errors import InvalidArgument
from decoding.refusal import RefusalMarkers, RefusalParams, decide, validate_params

# Token mode: 0 = [refuse], 1 = [respond], 2 = other.
SINGLE = RefusalMarkers(categories={"refuse": ((0,),)}, respond_id=1)
TABLE = torch.log(torch.tensor([0.30, 0.60, 0.10]))


@pytest.mark.parametrize("params, action", [
    (RefusalParams(), "respond"),
    (RefusalParams(mode="threshold", threshold=0.25), "refuse"),
    (RefusalParams(mode="threshold", threshold=0.5), "respond"),
    (RefusalParams(mode="logit_bias", bias=0.69), "respond"),
    (RefusalParams(mode="logit_bias", bias=0.70), "refuse"),
])
def test_single_token_table(params, action):
    decision = decide(TABLE, SINGLE, params)
    assert decision.action == action
    assert decision.probabilities["refuse"] == pytest.approx(0.30) and decision.respond_probability == \
        pytest.approx(0.60)
    assert decision.forced == ((0,) if action == "refuse" else (1,))


CATEGORIES = ["Humanizing", "Incomplete", "Indeterminate", "Safety", "Unsupported"]
CATEGORY_MARKERS = RefusalMarkers(categories={c: ((i,),) for i, c in enumerate(CATEGORIES)}, respond_id=5)
CATEGORY_LOGITS = torch.log(torch.tensor([0.05, 0.02, 0.01, 0.40, 0.03, 0.45, 0.04]))


@pytest.mark.parametrize("controlled, threshold, action, forced", [
    (("Safety",), 0.3, "refuse", (3,)),   # the knob can raise refusals above the model's own argmax
    (("Safety",), 0.5, "respond", (5,)),
    (("Incomplete",), 0.3, "none", ()),    # c* = Safety is not controlled: the model is left alone
])
def test_category_example(controlled, threshold, action, forced):
    decision = decide(CATEGORY_LOGITS, CATEGORY_MARKERS,
                      RefusalParams(mode="threshold", threshold=threshold, controlled=controlled))
    assert (decision.action, decision.forced) == (action, forced)
    assert decision.category == ("Safety" if action == "refuse" else None)


def test_per_category_thresholds_override():
    params = RefusalParams(mode="threshold", threshold=0.9, thresholds={"Safety": 0.3})
    assert decide(CATEGORY_LOGITS, CATEGORY_MARKERS, params).action == "refuse"


def test_refusal_rate_is_non_increasing_in_the_threshold():
    torch.manual_seed(0)
    logits = torch.randn(200, 6) * 2
    thresholds = [-0.1, 0.0, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.01]
    rates = [sum(decide(row, SINGLE, RefusalParams(mode="threshold", threshold=t)).action == "refuse"
                 for row in logits) for t in thresholds]
    assert rates == sorted(rates, reverse=True)
    assert rates[0] == rates[1] == 200 and rates[-1] == 0


def test_softmax_temperature_softens_the_decision():
    logits = torch.tensor([1.0, 3.0, 0.0])
    hard = decide(logits, SINGLE, RefusalParams(mode="threshold", threshold=0.2))
    soft = decide(logits, SINGLE, RefusalParams(mode="threshold", threshold=0.2, softmax_temperature=4.0))
    assert (hard.action, soft.action) == ("respond", "refuse")


PREFIXES = RefusalMarkers(categories={"refuse": ((7, 8, 9), (7, 4), (3,))})


def test_prefix_mode_refuse_forces_the_most_likely_prefix_and_respond_bans_first_tokens():
    logits = torch.log(torch.tensor([0.1, 0.1, 0.1, 0.05, 0.1, 0.1, 0.1, 0.3, 0.05, 0.0001]))
    refuse = decide(logits, PREFIXES, RefusalParams(mode="threshold", threshold=0.3))
    assert refuse.action == "refuse" and refuse.forced == (7, 8, 9)  # first of the prefixes starting with 7
    assert refuse.probabilities["refuse"] == pytest.approx(0.35, abs=1e-3)
    assert refuse.respond_probability == pytest.approx(0.65, abs=1e-3)
    respond = decide(logits, PREFIXES, RefusalParams())  # argmax: 0.35 < 0.65
    assert respond.action == "respond" and respond.forced == () and respond.banned == (3, 7)
    biased = decide(logits, PREFIXES, RefusalParams(mode="logit_bias", bias=1.0))  # 0.3·e > 0.1 → refuse
    assert biased.action == "refuse"


def test_markers_validation():
    with pytest.raises(ValueError, match="starts markers of both"):
        RefusalMarkers(categories={"a": ((1, 2),), "b": ((1, 3),)}).validate()
    with pytest.raises(ValueError, match="respond token"):
        RefusalMarkers(categories={"a": ((1,),)}, respond_id=1).validate()
    with pytest.raises(ValueError, match="empty marker"):
        RefusalMarkers(categories={"a": ((),)}).validate()


@pytest.mark.parametrize("params, field", [
    (RefusalParams(softmax_temperature=0.0), "refusal_steering.softmax_temperature"),
    (RefusalParams(threshold=math.nan), "refusal_steering.threshold"),
    (RefusalParams(thresholds={"violence": 0.1}), "refusal_steering.thresholds"),
    (RefusalParams(biases={"refuse": math.inf}), "refusal_steering.biases"),
    (RefusalParams(controlled=("violence",)), "refusal_steering.categories"),
])
def test_bad_params_name_the_field(params, field):
    with pytest.raises(InvalidArgument) as info:
        validate_params(params, SINGLE)
    assert info.value.field == field
