"""Contrastive decoding, USCD and STEER on the hand examples and invariants of ALGORITHMS.md section 1."""

import math

import pytest
import torch

from decoding.contrastive import contrastive_scores, steer_scores, uscd_scores

EXPERT = torch.tensor([[2.0, 1.8, -1.0]])
AMATEUR = torch.tensor([[3.0, 0.0, 0.0]])


def test_obrien_lewis_hand_example():
    scores = contrastive_scores(EXPERT, AMATEUR, alpha=0.1, beta=0.5)
    assert scores[0, 2] == -math.inf
    assert int(scores.argmax()) == 1 and int(EXPERT.argmax()) == 0
    assert torch.allclose(torch.softmax(scores, -1), torch.tensor([[0.2315, 0.7685, 0.0]]), atol=1e-4)
    # The same as the raw-logit formula cd = 1.5·z_e − 0.5·z_a = [1.5, 2.7, −inf] up to a per-row constant.
    raw = torch.tensor([[1.5, 2.7]])
    assert torch.allclose(scores[0, :2] - scores[0, 0], raw[0] - raw[0, 0], atol=1e-5)


def test_li_et_al_example_amateur_temperature_keeps_the_choice():
    # Li et al.'s objective is β → ∞; with τ_a = 0.5 the contrastive choice is still token 1.
    for temperature in (1.0, 0.5):
        assert int(contrastive_scores(EXPERT, AMATEUR, 0.1, 100.0, temperature).argmax()) == 1


def test_beta_zero_is_the_masked_expert():
    torch.manual_seed(0)
    expert, amateur = torch.randn(4, 50), torch.randn(4, 50)
    scores = contrastive_scores(expert, amateur, alpha=0.1, beta=0.0)
    log_e = torch.log_softmax(expert, -1)
    kept = torch.isfinite(scores)
    assert torch.equal(scores[kept], log_e[kept])
    assert torch.equal(scores.argmax(-1), expert.argmax(-1))


def test_expert_argmax_never_masked_and_alpha_one_keeps_only_the_max():
    torch.manual_seed(1)
    expert, amateur = torch.randn(8, 40), torch.randn(8, 40) * 5
    for alpha in (0.01, 0.1, 0.5, 1.0):
        scores = contrastive_scores(expert, amateur, alpha, 2.0)
        assert torch.isfinite(scores.gather(1, expert.argmax(-1, keepdim=True))).all()
    assert (torch.isfinite(contrastive_scores(expert, amateur, 1.0, 2.0)).sum(-1) == 1).all()


def test_shift_invariance_of_either_model():
    torch.manual_seed(2)
    expert, amateur = torch.randn(3, 30), torch.randn(3, 30)
    reference = torch.softmax(contrastive_scores(expert, amateur, 0.1, 0.5), -1)
    for e, a in ((expert + 7.0, amateur), (expert, amateur - 3.0), (expert * 1.0 - 100.0, amateur + 100.0)):
        assert torch.allclose(torch.softmax(contrastive_scores(e, a, 0.1, 0.5), -1), reference, atol=1e-5)


def test_logits_or_log_probs_give_the_same_distribution():
    torch.manual_seed(3)
    expert, amateur, negative = torch.randn(3, 30), torch.randn(3, 30), torch.randn(3, 30)
    lp = lambda x: torch.log_softmax(x, -1)  # noqa: E731
    assert torch.allclose(torch.softmax(contrastive_scores(expert, amateur, 0.1, 0.5), -1),
                          torch.softmax(contrastive_scores(lp(expert), lp(amateur), 0.1, 0.5), -1), atol=1e-6)
    assert torch.allclose(steer_scores(expert, amateur, negative, 0.2, 0.6),
                          steer_scores(lp(expert), lp(amateur), lp(negative), 0.2, 0.6), atol=1e-5)


def test_minus_inf_in_the_amateur_never_wins():
    amateur = torch.tensor([[0.0, -math.inf, 0.0]])
    scores = contrastive_scores(torch.tensor([[1.0, 1.0, 0.9]]), amateur, 0.1, 0.5)
    assert not torch.isnan(scores).any() and not torch.isposinf(scores).any()
    assert not torch.isnan(contrastive_scores(torch.tensor([[-math.inf, 0.0, 1.0]]), amateur, 0.1, 0.5)).any()


def test_per_row_knobs_equal_single_row_calls():
    torch.manual_seed(4)
    expert, amateur = torch.randn(3, 20), torch.randn(3, 20)
    alphas, betas = torch.tensor([0.1, 0.5, 1.0]), torch.tensor([0.0, 0.5, 2.0])
    batched = contrastive_scores(expert, amateur, alphas, betas)
    for i in range(3):
        single = contrastive_scores(expert[i:i + 1], amateur[i:i + 1], float(alphas[i]), float(betas[i]))
        assert torch.equal(batched[i:i + 1], single)


def test_uscd_confident_step_is_the_standard_distribution_exactly():
    standard = torch.full((1, 100), -20.0)
    standard[0, 3] = 10.0  # one-hot-ish: std of p_s is large
    scores, contrasted = uscd_scores(standard, torch.randn(1, 100), 0.005, 2 / 3, 1.0, -0.7)
    assert not bool(contrasted[0])
    assert torch.equal(scores, torch.log_softmax(standard, -1))


def test_uscd_std_is_at_most_one_over_root_v_so_a_threshold_above_it_contrasts_every_step():
    # SmolLM2's vocabulary: the most peaked p_s there is (one-hot) has std 1/√V ≈ 0.00451, below the default λ 0.005.
    vocab = 49152
    one_hot = torch.full((1, vocab), -1e4)
    one_hot[0, 7] = 0.0
    bound = 1 / math.sqrt(vocab)
    for threshold, contrasted_expected in ((0.005, True), (bound * 1.001, True), (bound * 0.999, False)):
        _, contrasted = uscd_scores(one_hot, torch.zeros(1, vocab), threshold, 2 / 3, 1.0, -0.7)
        assert bool(contrasted[0]) is contrasted_expected, threshold


def test_uscd_uniform_step_contrasts_in_probability_space():
    # p_s uniform (std 0) → contrast; p_s = 0.1 each over 10 tokens, p_l puts 0.2 on token 0 → 0.1 − 0.14 < 0 → −inf.
    standard = torch.zeros(1, 10)
    lame = torch.log(torch.tensor([[0.2] + [0.8 / 9] * 9]))
    scores, contrasted = uscd_scores(standard, lame, 0.005, 2 / 3, 1.0, -0.7)
    assert bool(contrasted[0])
    assert scores[0, 0] == -math.inf
    expected = math.log(0.1 - 0.7 * 0.8 / 9)
    assert torch.allclose(scores[0, 1:], torch.full((9,), expected), atol=1e-5)


def test_uscd_eta_filter_and_all_masked_fallback():
    standard = torch.log(torch.tensor([[0.5, 0.3, 0.19, 0.01]]))
    scores, _ = uscd_scores(standard, torch.zeros(1, 4), 1.0, 1.0, 1.0, 0.0)  # K = {p_s ≥ 1/4}
    assert torch.isfinite(scores[0, :2]).all() and (scores[0, 2:] == -math.inf).all()
    scores, _ = uscd_scores(standard, standard, 1.0, 0.0, 1.0, -2.0)  # mixture negative everywhere
    assert torch.isfinite(scores).sum() == 1 and int(scores.argmax()) == 0


def test_steer_neutral_knobs_and_formula():
    torch.manual_seed(5)
    f, b, n = torch.randn(2, 25), torch.randn(2, 25), torch.randn(2, 25)
    assert torch.allclose(steer_scores(f, b, n, 0.0, 0.0), torch.log_softmax(f, -1), atol=1e-6)
    lp = lambda x: torch.log_softmax(x, -1)  # noqa: E731
    expected = torch.log_softmax(1.2 * lp(f) - 0.2 * lp(b) - 0.6 * lp(n), -1)
    assert torch.allclose(steer_scores(f, b, n, 0.2, 0.6), expected, atol=1e-5)
    assert torch.allclose(steer_scores(f, b, n, 0.2, 0.6).exp().sum(-1), torch.ones(2), atol=1e-5)


@pytest.mark.parametrize("beta", [0.25, 0.5, 1.0])
def test_cd_is_expert_times_ratio_power_on_the_head(beta):
    # p_CD ∝ p_e · (p_e / p_a)^β on the plausible head.
    torch.manual_seed(6)
    expert, amateur = torch.randn(1, 12), torch.randn(1, 12)
    p_e, p_a = torch.softmax(expert, -1), torch.softmax(amateur, -1)
    head = p_e >= 0.1 * p_e.max()
    expected = torch.where(head, p_e * (p_e / p_a) ** beta, torch.zeros_like(p_e))
    expected = expected / expected.sum()
    assert torch.allclose(torch.softmax(contrastive_scores(expert, amateur, 0.1, beta), -1), expected, atol=1e-5)
