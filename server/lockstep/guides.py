"""Loading a group's guide models beside its base, and the tokenizer check that makes fusing them meaningful.

Token-level fusion adds logits of several models token id by token id, so every model of a group must map the same
ids to the same strings, agree on the special tokens, and render chats alike. `check_tokenizers`
enforces that when the server loads its config; a mismatch stops it with a message naming both models.
"""

from __future__ import annotations

from typing import Sequence

import torch

from server.config import ChorusConfig, ModelSpec
from server.engines.prompts import load_tokenizer
from server.errors import ConfigError
from server.models import resolve_model_path

_SPECIAL = ("bos_token_id", "eos_token_id", "pad_token_id")
# Chats a group's prompts and contexts are made of (system, user and assistant turns; no tools, which the API does not
# have): two chat templates that render these alike are alike for fusion, whatever else differs in their text (the
# Qwen2.5-Coder 0.5B and 1.5B templates differ only in the escaping of a tool-call example).
_PROBE_CHATS = (
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a colour."}],
)


def tokenizer_mismatch(a, b) -> str | None:
    """Why two tokenizers cannot be fused, or None when they can."""
    if len(a) != len(b):
        return f"vocabulary sizes differ ({len(a)} vs {len(b)})"
    vocab_a, vocab_b = a.get_vocab(), b.get_vocab()
    if vocab_a != vocab_b:
        differing = sorted(set(vocab_a.items()) ^ set(vocab_b.items()), key=lambda kv: kv[1])[:3]
        return f"token id → string mappings differ, e.g. {differing}"
    for name in _SPECIAL:
        if getattr(a, name) != getattr(b, name):
            return f"{name} differs ({getattr(a, name)} vs {getattr(b, name)})"
    if getattr(a, "add_bos_token", None) != getattr(b, "add_bos_token", None):
        return "add_bos_token differs"
    if a.chat_template != b.chat_template and (a.chat_template is None or b.chat_template is None or any(
            a.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            != b.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) for chat in _PROBE_CHATS)):
        return "chat templates render the same messages differently"
    return None


def check_tokenizers(config: ChorusConfig) -> None:
    """Raises ConfigError when a guide's tokenizer cannot be fused with its base's."""
    tokenizers: dict[str, object] = {}

    def tokenizer(name: str):
        if name not in tokenizers:
            tokenizers[name] = load_tokenizer(resolve_model_path(config.models[name].path))
        return tokenizers[name]

    for group in config.groups.values():
        for model in group.guide_models:
            if model == group.base or config.models[model].path == config.models[group.base].path:
                continue
            why = tokenizer_mismatch(tokenizer(group.base), tokenizer(model))
            if why:
                raise ConfigError(f"groups.{group.name}: guide model {model!r} cannot be fused with base model "
                                  f"{group.base!r}: {why}")


def early_exit_view(model, layers: int):
    """The first `layers` decoder layers of `model` with its final norm and head, sharing all weights.

    logits = head(norm(h_k)) where h_k is the hidden state after layer k: a weak model of the same tokenizer.
    """
    from transformers import AutoModelForCausalLM

    total = model.config.num_hidden_layers
    if layers >= total:
        raise ConfigError(f"early_exit_layers = {layers} must be below the model's {total} layers")
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:layers]
    with torch.device("meta"):
        view = AutoModelForCausalLM.from_config(config)
    inner, source = view.model, model.model
    for name, module in source.named_children():
        setattr(inner, name, torch.nn.ModuleList(list(module)[:layers]) if name == "layers" else module)
    view.lm_head = model.lm_head
    return view.to(dtype=model.dtype).eval()


def parameter_count(spec: ModelSpec) -> int:
    """The parameters each token's forward of `spec` multiplies by: every weight but the input embedding (a lookup),
    the output head included even when it is tied to the embedding (an early-exit model: its layers, the final norm
    and the head). Counted from the config on the meta device, without loading any weight."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(resolve_model_path(spec.path))
    if spec.early_exit_layers:
        config.num_hidden_layers = spec.early_exit_layers
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:spec.early_exit_layers]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return model.num_parameters() - embedding.numel() + (head.numel() if head is embedding else 0)


def early_exits_of(models: dict[str, ModelSpec], base: str, names: Sequence[str]) -> dict[str, int]:
    """The models among `names` that are early-exit views of the checkpoint `base` runs whole (the same weights,
    dtype and device): name → its layer count. Their layers are the base's first ones, so on the base's context
    they need no forward of their own (`LockstepHost` reads them from the base's)."""
    spec = models[base]
    if spec.early_exit_layers:
        return {}
    key = ModelLoader.checkpoint_key(spec)
    return {name: models[name].early_exit_layers for name in names
            if models[name].early_exit_layers and ModelLoader.checkpoint_key(models[name]) == key}


class ModelLoader:
    """Loads each checkpoint once per replica; early-exit models are views of an already loaded checkpoint."""

    def __init__(self, models: dict[str, ModelSpec]):
        self._models = models
        self._loaded: dict[tuple[str, str, str], object] = {}

    def load(self, name: str):
        spec = self._models[name]
        full = self._checkpoint(spec)
        return early_exit_view(full, spec.early_exit_layers) if spec.early_exit_layers else full

    @staticmethod
    def checkpoint_key(spec: ModelSpec) -> tuple[str, str, str]:
        """Models with equal keys share one loaded checkpoint."""
        return resolve_model_path(spec.path), spec.dtype, spec.device

    def _checkpoint(self, spec: ModelSpec):
        from transformers import AutoModelForCausalLM

        key = self.checkpoint_key(spec)
        if key not in self._loaded:
            self._loaded[key] = AutoModelForCausalLM.from_pretrained(
                key[0], dtype=getattr(torch, spec.dtype)).to(spec.device).eval()
        return self._loaded[key]
