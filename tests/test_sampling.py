import math

import pytest
import torch
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from decoding.errors import InvalidArgument
from decoding.sampling import SamplingParams, _filtered_scores, make_generator, sample


@pytest.mark.parametrize("kwargs, field", [
    ({"max_tokens": 0}, "sampling.max_tokens"),
    ({"max_tokens": -5}, "sampling.max_tokens"),
    ({"temperature": -0.1}, "sampling.temperature"),
    ({"temperature": math.inf}, "sampling.temperature"),
    ({"top_p": 0.0}, "sampling.top_p"),
    ({"top_p": 1.5}, "sampling.top_p"),
    ({"top_p": math.nan}, "sampling.top_p"),
    ({"top_k": -1}, "sampling.top_k"),
    ({"stop": ("ok", "")}, "sampling.stop[1]"),
])
def test_validation_names_the_field(kwargs, field):
    with pytest.raises(InvalidArgument) as info:
        SamplingParams(**kwargs).validate()
    assert info.value.field == field
    assert str(info.value).startswith(field)


def test_defaults_are_valid():
    assert SamplingParams().validate().top_p == 1.0


def _reference_scores(row, temperature, top_k, top_p):
    """transformers' warpers, applied in the order generate() applies them, to one row."""
    scores = TemperatureLogitsWarper(temperature)(None, row.unsqueeze(0))
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores[0]


def test_masks_match_transformers_warpers_per_row():
    torch.manual_seed(0)
    logits = torch.randn(5, 200) * 3
    knobs = [(1.0, 0, 1.0), (0.7, 10, 1.0), (1.3, 0, 0.9), (0.5, 50, 0.5), (2.0, 3, 0.99)]
    ours = _filtered_scores(logits, torch.tensor([k[0] for k in knobs]), torch.tensor([k[1] for k in knobs]),
                            torch.tensor([k[2] for k in knobs]))
    for i, (t, k, p) in enumerate(knobs):
        ref = _reference_scores(logits[i], t, k, p)
        assert torch.equal(torch.isinf(ours[i]), torch.isinf(ref)), f"row {i}: kept sets differ"
        kept = ~torch.isinf(ref)
        torch.testing.assert_close(ours[i][kept], ref[kept])


def test_greedy_rows_take_argmax_and_do_not_touch_their_generator():
    logits = torch.tensor([[0.1, 2.0, 0.3], [5.0, 0.0, 0.0]])
    generator = make_generator(1)
    state = generator.get_state().clone()
    tokens = sample(logits, [SamplingParams(temperature=0), SamplingParams(temperature=0)], [generator, None])
    assert tokens.tolist() == [1, 0]
    assert torch.equal(generator.get_state(), state)


def test_top_k_one_is_greedy_and_top_p_tiny_keeps_the_best():
    torch.manual_seed(1)
    logits = torch.randn(3, 50)
    for params in (SamplingParams(top_k=1), SamplingParams(top_p=1e-6)):
        tokens = sample(logits, [params] * 3, [make_generator(i) for i in range(3)])
        assert tokens.tolist() == logits.argmax(-1).tolist()


def test_same_seed_same_tokens_whatever_shares_the_batch():
    torch.manual_seed(2)
    mine = torch.randn(1, 100)
    alone = [int(sample(mine, [SamplingParams(seed=7)], [g])[0]) for g in [make_generator(7)] for _ in range(20)]
    generator = make_generator(7)
    others = [make_generator(100 + i) for i in range(3)]
    batched = []
    for step in range(20):
        noise = torch.randn(3, 100)
        logits = torch.cat([noise[:1], mine, noise[1:]])
        params = [SamplingParams(temperature=0.5), SamplingParams(seed=7), SamplingParams(temperature=0),
                  SamplingParams(top_k=5)]
        batched.append(int(sample(logits, params, [others[0], generator, None, others[1]])[1]))
    assert batched == alone


def test_sampled_frequencies_follow_the_distribution():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    generator = make_generator(3)
    counts = torch.zeros(3)
    for _ in range(3000):
        counts[sample(logits, [SamplingParams()], [generator])[0]] += 1
    torch.testing.assert_close(counts / 3000, torch.tensor([0.6, 0.3, 0.1]), atol=0.03, rtol=0)
