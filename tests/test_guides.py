"""Guide models: the early-exit view shares the base's weights and equals truncating the network; the tokenizer
check refuses guides whose vocabulary, special tokens or chat template differ from the base's."""

import pytest
import torch

from server.config import parse_chorus_config
from server.lockstep.guides import check_tokenizers, early_exit_view
from server.errors import ConfigError
from tests.conftest import EMBEDDED


def test_early_exit_view_shares_weights_and_equals_the_first_layers(hf_model, tokenizer):
    view = early_exit_view(hf_model, 8)
    assert view.model.embed_tokens.weight.data_ptr() == hf_model.model.embed_tokens.weight.data_ptr()
    assert len(view.model.layers) == 8 and len(hf_model.model.layers) == 30
    ids = torch.tensor([tokenizer.encode("The capital of France is")])
    with torch.inference_mode():
        hidden = hf_model(ids, output_hidden_states=True).hidden_states[8]  # after layer 8
        expected = hf_model.lm_head(hf_model.model.norm(hidden))
        assert torch.allclose(view(ids).logits, expected, atol=1e-5)
    with pytest.raises(ConfigError):
        early_exit_view(hf_model, 30)


def config_with_guide(path):
    return parse_chorus_config({"models": {"base": {"path": EMBEDDED}, "other": {"path": str(path)}},
                                "groups": {"g": {"base": "base",
                                                 "guides": {"a": {"model": "other", "roles": ["amateur"]}}}}})


def test_same_tokenizer_passes(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    check_tokenizers(config_with_guide(tmp_path))


def test_tokenizer_mismatch_stops_the_config_naming_both_models(tokenizer, tmp_path):
    changed = tmp_path / "changed"
    tokenizer.save_pretrained(changed)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(changed)
    tok.add_tokens(["<extra-token>"])
    tok.save_pretrained(changed)
    with pytest.raises(ConfigError) as info:
        check_tokenizers(config_with_guide(changed))
    message = str(info.value)
    assert "'other'" in message and "'base'" in message and "vocabulary sizes differ" in message


def test_chat_templates_that_render_chats_alike_pass_and_others_stop_the_config(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    def saved_with_template(folder, template):
        tokenizer.save_pretrained(tmp_path / folder)
        tok = AutoTokenizer.from_pretrained(tmp_path / folder)
        tok.chat_template = template
        tok.save_pretrained(tmp_path / folder)
        return tmp_path / folder

    # Text that renders nothing for a chat (a comment, like Qwen2.5-Coder's tool-call escaping): fusable.
    check_tokenizers(config_with_guide(saved_with_template("alike", tokenizer.chat_template + "{# tools #}")))
    # A template that renders a chat otherwise: refused.
    with pytest.raises(ConfigError, match="chat templates render the same messages differently"):
        check_tokenizers(config_with_guide(saved_with_template("other", tokenizer.chat_template.replace(
            "<|im_start|>", "<|im_start|> "))))
