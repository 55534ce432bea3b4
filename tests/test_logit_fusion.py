"""Static proxy-tuning and dynamic logit fusion on the hand examples and invariants of ALGORITHMS.md section 2."""

import math

import pytest
import torch

from decoding.logit_fusion import alpha_grid, dynamic_fusion, static_fusion
from decoding.numerics import kl_divergence, mask_to_neg_inf, sanitize

GRID = alpha_grid(2.0, 0.1)


def test_dlf_identity_hand_example():
    large = small = torch.tensor([[0.0, 0.0]])
    expert = torch.tensor([[[math.log(3), 0.0]]])  # Q_ft = [0.75, 0.25]
    lp = lambda x: torch.log_softmax(x, -1)  # noqa: E731
    assert float(kl_divergence(lp(expert[0]), lp(small))) == pytest.approx(0.130812, abs=1e-6)
    assert float(kl_divergence(lp(small), lp(expert[0]))) == pytest.approx(0.143841, abs=1e-6)
    scores, weights = dynamic_fusion(large, small, expert, GRID)
    assert weights.tolist() == [[1.0]]
    assert torch.allclose(scores.exp(), torch.tensor([[0.75, 0.25]]), atol=1e-6)
    # The loss at α = 0.9 is ≈ 0.00118 > 0, so 1.0 wins.
    p09 = lp(large + 0.9 * (expert[0] - small))
    loss = ((kl_divergence(p09, lp(large)) - 0.130812) ** 2 + (kl_divergence(lp(large), p09) - 0.143841) ** 2)
    assert float(loss) == pytest.approx(0.00118, abs=2e-5)


def test_grid_is_exact_on_tenths():
    assert len(GRID) == 21 and float(GRID[10]) == 1.0 and float(GRID[0]) == 0.0 and float(GRID[-1]) == 2.0
    assert len(alpha_grid(1.0, 0.25)) == 5


def test_expert_equal_to_small_base_picks_the_first_grid_point():
    torch.manual_seed(0)
    large, small = torch.randn(2, 30), torch.randn(2, 30)
    scores, weights = dynamic_fusion(large, small, small.unsqueeze(0).clone(), GRID)
    assert weights.tolist() == [[0.0], [0.0]]
    assert torch.allclose(scores, torch.log_softmax(large, -1), atol=1e-6)


def test_equal_losses_up_to_float_noise_go_to_the_first_candidate():
    # Two experts that are permutations of each other over a uniform small base: every a has the same loss on
    # either expert, as with L = S and a = 1 on the embedded config. Noise far below the loss (a batched vs a
    # recomputed forward) must not move the choice off the first expert.
    torch.manual_seed(4)
    small = torch.zeros(1, 40)
    expert = torch.randn(1, 40)
    experts = torch.stack([expert, expert.roll(1, dims=-1)])
    assert dynamic_fusion(small, small, experts, GRID)[1].tolist() == [[1.0, 0.0]]
    for seed in range(5):
        torch.manual_seed(seed)
        noisy_large = small + 1e-6 * torch.randn(1, 40)
        assert dynamic_fusion(noisy_large, small, experts, GRID)[1].tolist() == [[1.0, 0.0]]


def test_alpha_zero_gives_the_large_model_and_static_alpha_one_is_proxy_tuning():
    torch.manual_seed(1)
    large, small, experts = torch.randn(3, 20), torch.randn(3, 20), torch.randn(2, 3, 20)
    assert torch.allclose(static_fusion(large, small, experts, [0.0, 0.0]), torch.log_softmax(large, -1), atol=1e-6)
    expected = torch.log_softmax(large + experts.sum(0) - 2 * small, -1)
    assert torch.allclose(static_fusion(large, small, experts, [1.0, 1.0]), expected, atol=1e-5)


def test_static_logits_or_log_probs_are_the_same_distribution():
    torch.manual_seed(2)
    large, small, experts = torch.randn(2, 20), torch.randn(2, 20), torch.randn(1, 2, 20)
    lp = lambda x: torch.log_softmax(x, -1)  # noqa: E731
    assert torch.allclose(static_fusion(large, small, experts, [0.7]),
                          static_fusion(lp(large) + 3, lp(small) - 1, lp(experts) * 1.0 + 5, [0.7]), atol=1e-5)


def dlf_loss(large, small, experts, alphas):
    lp = lambda x: torch.log_softmax(x, -1)  # noqa: E731
    fused = lp(large + sum(a * (e - small) for a, e in zip(alphas, experts)))
    return sum((kl_divergence(fused, lp(large)) - kl_divergence(lp(e), lp(small))) ** 2
               + (kl_divergence(lp(large), fused) - kl_divergence(lp(small), lp(e))) ** 2 for e in experts)


def test_multi_expert_search_is_one_hot_and_minimizes_the_summed_loss():
    torch.manual_seed(3)
    large, small, experts = torch.randn(1, 16), torch.randn(1, 16), torch.randn(2, 1, 16)
    _, weights = dynamic_fusion(large, small, experts, GRID)
    assert int((weights != 0).sum()) <= 1
    best = float(dlf_loss(large[0], small[0], experts[:, 0], weights[0].tolist()))
    for t in range(2):
        for a in GRID.tolist():
            alphas = [a if i == t else 0.0 for i in range(2)]
            assert best <= float(dlf_loss(large[0], small[0], experts[:, 0], alphas)) + 1e-6


def test_closed_form_kls_choose_the_naive_grid_minimum_on_peaked_rows_with_masked_tokens():
    # dynamic_fusion gets KL(P̃‖P) and KL(P‖P̃) from log Z and two expectations; a naive search that builds every
    # candidate's log-softmax must reach the same minimum (float noise within the tie band) on sharp distributions.
    for seed in range(6):
        torch.manual_seed(seed)
        large, small, experts = 6 * torch.randn(1, 3000), 6 * torch.randn(1, 3000), 6 * torch.randn(2, 1, 3000)
        large[0, :50] = float("-inf")
        _, weights = dynamic_fusion(large, small, experts, GRID)
        naive = [float(dlf_loss(sanitize(large)[0], small[0], experts[:, 0], [a if i == t else 0.0 for i in range(2)]))
                 for t in range(2) for a in GRID.tolist()]
        chosen = float(dlf_loss(sanitize(large)[0], small[0], experts[:, 0], weights[0].tolist()))
        assert chosen <= min(naive) * (1 + 1e-3) + 1e-6


def test_batched_rows_equal_single_row_calls():
    torch.manual_seed(4)
    large, small, experts = torch.randn(4, 24), torch.randn(4, 24), torch.randn(2, 4, 24)
    scores, weights = dynamic_fusion(large, small, experts, GRID)
    for i in range(4):
        s, w = dynamic_fusion(large[i:i + 1], small[i:i + 1], experts[:, i:i + 1], GRID)
        assert torch.allclose(s, scores[i:i + 1], atol=1e-6) and torch.equal(w, weights[i:i + 1])


def test_kl_helpers():
    p = torch.log(torch.tensor([0.75, 0.25]))
    q = torch.log(torch.tensor([0.5, 0.5]))
    assert float(kl_divergence(p, p)) == 0.0
    assert float(kl_divergence(p, q)) == pytest.approx(0.130812, abs=1e-6)  # KL(P‖Q): the first argument is P
    assert float(kl_divergence(q, p)) == pytest.approx(0.143841, abs=1e-6)
    assert float(torch.nn.functional.kl_div(q, p, log_target=True, reduction="sum")) == \
        pytest.approx(float(kl_divergence(p, q)), abs=1e-7)
    torch.manual_seed(5)
    a, b = torch.log_softmax(torch.randn(10, 7), -1), torch.log_softmax(torch.randn(10, 7), -1)
    assert (kl_divergence(a, b) >= 0).all()
    zero = torch.log(torch.tensor([1.0, 0.0]))  # p has a zero: the term contributes 0, not NaN
    assert float(kl_divergence(zero, q)) == pytest.approx(math.log(2), abs=1e-6)


def test_sanitize_and_mask_never_leave_a_row_without_a_token():
    x = sanitize(torch.tensor([[-math.inf, math.nan, 1.0, math.inf]]))
    assert torch.isfinite(x).all() and float(x[0, 2]) == 1.0
    masked = mask_to_neg_inf(torch.tensor([[0.1, 0.9, 0.5]]), torch.zeros(1, 3, dtype=torch.bool))
    assert torch.isfinite(masked).sum() == 1 and int(masked.argmax()) == 1
