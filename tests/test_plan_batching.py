"""Plan.step_rows: the rows of many requests fused in one call of the math per mode equal each plan's own `step`,
scores and records alike, on random rows with mixed per-row knobs and masked (−inf) tokens.

Scores are compared with torch.allclose(rtol=1e-5, atol=1e-5, equal_nan=True) and the same −inf positions; records
and reports must be equal exactly (USCD's contrasted flags, the dynamic weights chosen per step)."""

from __future__ import annotations

import pytest
import torch

from decoding import logit_fusion
from decoding.logit_fusion import alpha_grid, dynamic_fusion, static_fusion
from decoding.plans import ContrastivePlan, LogitFusionPlan, Plan, PlanSpec, RefusalPlan, StreamSpec
from decoding.refusal import RefusalMarkers, RefusalParams
from decoding.strategies import ContrastiveParams, LogitFusionParams, RefusalSteeringParams

V = 64
RTOL = ATOL = 1e-5


def contrastive(mode: str, **knobs) -> PlanSpec:
    streams = 2 if mode == "steer" else 1
    return PlanSpec(plan=ContrastivePlan, params=ContrastiveParams(mode=mode, **knobs),
                    streams=tuple(StreamSpec(f"m{i}", (1,)) for i in range(streams)), guide="m0")


def fusion(experts: int, **knobs) -> PlanSpec:
    names = tuple(f"e{i}" for i in range(experts))
    return PlanSpec(plan=LogitFusionPlan, params=LogitFusionParams(report_weights=True, **knobs),
                    streams=tuple(StreamSpec(name, (1,)) for name in ("s",) + names), guide="s", experts=names)


def masked(rows: torch.Tensor, generator: torch.Generator, share: float = 0.15, shared: bool = False) -> torch.Tensor:
    """`rows` with about `share` of the entries set to −inf (never a whole row); `shared`: the same entries in every
    row (a vocabulary mask all models of a request get), else each row its own."""
    mask = torch.rand(rows.shape[-1:] if shared else rows.shape, generator=generator) < share
    mask[..., 0] = False
    return rows.masked_fill(mask, float("-inf"))


def random_rows(specs: list[PlanSpec], generator: torch.Generator, position: int):
    """base [B, V] and each row's streams [S_i, V], masked. Row i's logits are scaled per row so that USCD meets
    both peaked (certain) and flat (uncertain) rows, and fusion rows make the base a mix of the small base and an
    expert, so the dynamic search does not always pick the same weight (their models share a mask, except every
    fourth row: a token one model excludes and another does not makes the KL targets huge, and the search picks 0)."""
    base, streams = [], []
    for i, spec in enumerate(specs):
        scale = (0.05, 1.0, 6.0)[(i + position) % 3]
        rows = torch.randn(len(spec.streams) + 1, V, generator=generator) * scale
        if spec.plan is LogitFusionPlan:
            small, expert = rows[1], rows[2 + (i + position) % (len(spec.streams) - 1)]
            mix = float(torch.rand((), generator=generator)) * 2
            rows[0] = small + mix * (expert - small) + 0.3 * torch.randn(V, generator=generator)
        rows = masked(rows, generator, shared=spec.plan is LogitFusionPlan and (i + position) % 4 != 3)
        base.append(rows[0])
        streams.append(rows[1:])
    return torch.stack(base), streams


def assert_same_scores(batched: torch.Tensor, expected: torch.Tensor):
    assert batched.shape == expected.shape and batched.dtype == torch.float32
    assert torch.equal(torch.isneginf(batched), torch.isneginf(expected))
    assert torch.allclose(batched, expected, rtol=RTOL, atol=ATOL, equal_nan=True)


def run_both(specs: list[PlanSpec], plan_class: type[Plan], positions: list[list[int]], seed: int = 0):
    """Steps one set of plans row by row and another through `step_rows` on the same rows; checks every step and
    returns (batched plans, row-by-row plans)."""
    generator = torch.Generator().manual_seed(seed)
    batched, single = [spec.build() for spec in specs], [spec.build() for spec in specs]
    for step in positions:
        base, streams = random_rows(specs, generator, step[0])
        expected = torch.stack([plan.step(base[i], streams[i], step[i]) for i, plan in enumerate(single)])
        scores = plan_class.step_rows(batched, base, streams, step)
        assert_same_scores(scores, expected)
        for b, s in zip(batched, single):
            assert b._records == s._records and b.records() == s.records()
    for b, s in zip(batched, single):
        assert b.report() == s.report()
    return batched, single


# Positions per step and row: rows at different positions, and a repeated position (its record is replaced).
POSITIONS = [[0, 3, 1, 7, 0, 2, 5, 1], [1, 4, 2, 8, 1, 3, 6, 2], [1, 4, 3, 8, 2, 3, 7, 2], [2, 5, 4, 9, 3, 4, 8, 3]]


def test_cd_rows_with_their_own_alpha_beta_and_amateur_temperature():
    knobs = [(0.1, 0.5, 1.0), (0.5, 0.0, 1.0), (0.02, 2.0, 0.5), (1.0, 1.0, 1.0), (0.3, 0.25, 2.0),
             (0.1, 5.0, 0.7), (0.9, 0.1, 1.5), (0.05, 1.5, 3.0)]
    specs = [contrastive("cd", alpha=a, beta=b, amateur_temperature=t) for a, b, t in knobs]
    batched, _ = run_both(specs, ContrastivePlan, POSITIONS)
    assert [plan.steps for plan in batched] == [3, 3, 4, 3, 4, 3, 4, 3]  # repeated positions counted once


def test_uscd_rows_on_both_sides_of_their_threshold():
    knobs = [(0.005, 2 / 3, 1.0, -0.7), (0.0, 1.0, 1.0, -0.5), (0.02, 0.5, 0.8, -0.2), (1.0, 2 / 3, 1.0, -0.7),
             (0.01, 0.0, 1.0, -2.0), (0.004, 2.0, 1.2, 0.3), (0.05, 2 / 3, 1.0, -0.7), (0.008, 1.0, 0.5, -0.9)]
    specs = [contrastive("uscd", uncertainty_threshold=u, uscd_eta=e, standard_weight=ws, lame_weight=wl)
             for u, e, ws, wl in knobs]
    batched, _ = run_both(specs, ContrastivePlan, POSITIONS, seed=1)
    flags = [flag for plan in batched for flag in plan.records()]
    assert True in flags and False in flags, "the rows must fall on both sides of their thresholds"
    # Within one step too: some rows contrasted, others not (the threshold is per row, not the first row's).
    assert len({plan.record(POSITIONS[-1][i]) for i, plan in enumerate(batched)}) == 2


def test_steer_rows():
    specs = [contrastive("steer", gamma=g, eta=e) for g, e in
             [(0.2, 0.6), (0.0, 0.0), (1.0, 0.1), (0.5, 2.0), (0.05, 0.3), (2.0, 0.0), (0.3, 0.3), (0.7, 1.2)]]
    run_both(specs, ContrastivePlan, POSITIONS, seed=2)


def test_mixed_contrastive_modes_in_one_batch():
    specs = [contrastive("cd", alpha=0.2, beta=1.0), contrastive("uscd", uncertainty_threshold=0.01),
             contrastive("steer", gamma=0.4, eta=0.2), contrastive("cd", alpha=0.05, beta=0.3, amateur_temperature=0.5),
             contrastive("steer"), contrastive("uscd", uncertainty_threshold=0.3, lame_weight=-0.2),
             contrastive("cd"), contrastive("uscd")]
    run_both(specs, ContrastivePlan, POSITIONS, seed=3)


def test_static_fusion_rows_with_per_expert_alphas():
    specs = [fusion(2, mode="static", alphas=(0.5, 1.5)), fusion(2, mode="static", alphas=(2.0,)),
             fusion(1, mode="static"), fusion(2, mode="static", alphas=(-0.3, 0.0)),
             fusion(1, mode="static", alphas=(0.25,)), fusion(2, mode="static", alphas=(1.0, 0.7)),
             fusion(1, mode="static", alphas=(3.0,)), fusion(2, mode="static")]
    run_both(specs, LogitFusionPlan, POSITIONS, seed=4)


@pytest.mark.parametrize("experts", [1, 2, "mixed"])
def test_dynamic_fusion_rows_with_different_grids(experts):
    grids = [(2.0, 0.1), (1.0, 0.25), (3.0, 0.5), (2.0, 0.1), (0.5, 0.05), (2.0, 0.1), (1.5, 0.3), (2.0, 0.2)]
    specs = [fusion(experts if experts != "mixed" else 1 + i % 2, mode="dynamic", grid_max=m, grid_step=s)
             for i, (m, s) in enumerate(grids)]
    batched, _ = run_both(specs, LogitFusionPlan, POSITIONS, seed=5)
    chosen = {weights for plan in batched for weights in plan.records()}
    assert len(chosen) > 4, f"the rows should choose various weights, got {chosen}"


def test_static_and_dynamic_rows_in_one_batch():
    specs = [fusion(2, mode="dynamic"), fusion(2, mode="static", alphas=(0.5, 1.5)), fusion(1, mode="dynamic"),
             fusion(1, mode="static", alphas=(0.8,)), fusion(2, mode="dynamic", grid_max=1.0, grid_step=0.5),
             fusion(2, mode="static"), fusion(1, mode="dynamic", grid_max=4.0, grid_step=0.25),
             fusion(2, mode="dynamic", grid_max=2.0, grid_step=0.4)]
    run_both(specs, LogitFusionPlan, POSITIONS, seed=6)


def test_refusal_rows():
    markers = RefusalMarkers(categories={"sorry": ((3, 4),), "cannot": ((5,), (6, 7))}, respond_id=None)
    specs = [PlanSpec(plan=RefusalPlan, params=RefusalSteeringParams(RefusalParams(**knobs)), markers=markers)
             for knobs in [dict(mode="threshold", threshold=0.0), dict(mode="threshold", threshold=2.0),
                           dict(mode="argmax"), dict(mode="logit_bias", bias=3.0),
                           dict(mode="logit_bias", bias=-3.0), dict(mode="threshold", thresholds={"cannot": 0.0}),
                           dict(mode="argmax", controlled=("cannot",)), dict(mode="threshold", threshold=0.5)]]
    batched, _ = run_both(specs, RefusalPlan, POSITIONS, seed=7)
    assert {plan.decision.action for plan in batched if plan.decision} == {"refuse", "respond"}


def test_step_rows_refuses_another_class_and_mismatched_rows():
    cd, fused = contrastive("cd").build(), fusion(1).build()
    base, streams = torch.randn(2, V), [torch.randn(1, V), torch.randn(2, V)]
    with pytest.raises(TypeError, match="ContrastivePlan.step_rows got a LogitFusionPlan"):
        ContrastivePlan.step_rows([cd, fused], base, streams, [0, 0])
    with pytest.raises(ValueError, match="1 plans for 2 base rows"):
        ContrastivePlan.step_rows([cd], base, streams[:1], [0])


@pytest.mark.parametrize("elements_per_pass", [None, 1])
def test_math_takes_per_row_alphas_and_grids(elements_per_pass, monkeypatch):
    if elements_per_pass is not None:  # the dynamic search in passes of one row, as on a CPU at a real vocabulary
        monkeypatch.setitem(logit_fusion.CANDIDATE_ELEMENTS, "cpu", elements_per_pass)
    generator = torch.Generator().manual_seed(8)
    large, small = masked(torch.randn(4, V, generator=generator), generator), torch.randn(4, V, generator=generator)
    experts = masked(torch.randn(2, 4, V, generator=generator), generator)
    alphas = torch.tensor([[0.5, 1.5], [0.0, 0.0], [2.0, -1.0], [1.0, 1.0]])
    batched = static_fusion(large, small, experts, alphas)
    for i in range(4):
        assert_same_scores(batched[i:i + 1], static_fusion(large[i:i + 1], small[i:i + 1], experts[:, i:i + 1],
                                                           alphas[i].tolist()))
    grids = [alpha_grid(2.0, 0.1), alpha_grid(1.0, 0.25), alpha_grid(3.0, 0.5), alpha_grid(2.0, 0.1)]
    padded = torch.nn.utils.rnn.pad_sequence(grids, batch_first=True, padding_value=float("nan"))
    scores, weights = dynamic_fusion(large, small, experts, padded)
    for i in range(4):
        s, w = dynamic_fusion(large[i:i + 1], small[i:i + 1], experts[:, i:i + 1], grids[i])
        assert_same_scores(scores[i:i + 1], s)
        assert torch.equal(weights[i:i + 1], w)
    # A shared [K] grid still works, and equals the same grid given per row.
    shared = dynamic_fusion(large, small, experts, grids[0])
    per_row = dynamic_fusion(large, small, experts, grids[0].expand(4, -1))
    assert torch.equal(shared[1], per_row[1]) and torch.allclose(shared[0], per_row[0], equal_nan=True)
