"""Shared fixtures. Tests that need the real SmolLM2 weights use `model_path`; `make test` fetches them first, and
a test run without them fails with the command to run (never skips)."""

from __future__ import annotations

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
