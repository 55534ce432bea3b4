"""Prompt rendering shared by every engine: the tokenizer, the chat template, and the context-length check."""

from __future__ import annotations

import dataclasses
from typing import Sequence

from decoding.chat import ChatMessage
from decoding.errors import InvalidArgument
from server.engines.base import GenerationRequest

CHAT_ROLES = ("system", "user", "assistant")


def load_tokenizer(path: str):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


def stop_token_ids(tokenizer, path: str, model_config) -> frozenset[int]:
    """The ids that end a reply: the generation config's and the model config's eos_token_id, and the tokenizer's."""
    from transformers import GenerationConfig

    try:
        generation_config = GenerationConfig.from_pretrained(path)
    except OSError:
        generation_config = None
    ids = set()
    for source in (generation_config, model_config):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        if eos is not None:
            ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def render_prompt(tokenizer, request: GenerationRequest) -> list[int]:
    """Token ids of the request's prompt: raw text as is, or messages through the model's chat template."""
    if request.messages:
        for i, m in enumerate(request.messages):
            if m.role not in CHAT_ROLES:
                raise InvalidArgument(f"messages[{i}].role", f"must be one of {CHAT_ROLES}, got {m.role!r}")
        if tokenizer.chat_template is None:
            raise InvalidArgument("messages", "this model has no chat template; send `prompt` instead")
        text = tokenizer.apply_chat_template([dataclasses.asdict(m) for m in request.messages],
                                             add_generation_prompt=True, tokenize=False)
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(request.prompt)


def chat_prompt_text(tokenizer, messages: Sequence[ChatMessage], reply_prefix: str = "") -> str:
    """Chat messages through the model's chat template, the assistant's reply begun with `reply_prefix`, as a raw
    prompt: the leading special tokens that encoding the text adds again (a BOS) are cut, so the engine's encoding
    of it is the template's own."""
    text = tokenizer.apply_chat_template([dataclasses.asdict(m) for m in messages], add_generation_prompt=True,
                                         tokenize=False) + reply_prefix
    added = tokenizer.decode(tokenizer.encode(""))
    return text[len(added):] if added and text.startswith(added) else text


def prompt_token_ids(tokenizer, request: GenerationRequest, max_model_len: int, reserve: int | None = None
                     ) -> list[int]:
    """The prompt's token ids, refused when empty or when prompt + `reserve` tokens (default: max_tokens) does not
    fit the context."""
    ids = render_prompt(tokenizer, request)
    if not ids:
        raise InvalidArgument("prompt", "renders to zero tokens")
    reserve = request.sampling.max_tokens if reserve is None else reserve
    if len(ids) + reserve > max_model_len:
        field = "sampling.max_tokens" if reserve == request.sampling.max_tokens else "prompt"
        raise InvalidArgument(field, f"prompt ({len(ids)} tokens) + {reserve} tokens to come exceeds the model's "
                                     f"context of {max_model_len} tokens")
    return ids


def check_token_ids(field: str, ids: Sequence[int], vocab_size: int) -> list[int]:
    """Token ids a caller hands in (candidates to score, a continuation): non-empty, inside the vocabulary."""
    ids = [int(i) for i in ids]
    if not ids:
        raise InvalidArgument(field, "give at least one token id")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise InvalidArgument(field, f"token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
    return ids


def check_reads(continuation: Sequence[int], candidate_ids: Sequence[Sequence[int]], vocab_size: int,
                limit: int | None = None) -> tuple[list[int], list[list[int]]]:
    """`Engine.score_along`'s arguments checked: one list of candidate ids per position of prompt + continuation
    (len(continuation) + 1), ids inside the vocabulary, at least one in all, at most `limit` at one position (vLLM's
    max_logprobs)."""
    continuation = check_token_ids("continuation", continuation, vocab_size) if len(continuation) else []
    if len(candidate_ids) != len(continuation) + 1:
        raise InvalidArgument("candidate_ids", f"one list of ids per position: {len(continuation) + 1} for a "
                                               f"continuation of {len(continuation)} tokens, got {len(candidate_ids)}")
    reads = [check_token_ids("candidate_ids", ids, vocab_size) if len(ids) else [] for ids in candidate_ids]
    if not any(reads):
        raise InvalidArgument("candidate_ids", "give at least one token id")
    widest = max(len(ids) for ids in reads)
    if limit is not None and widest > limit:
        raise InvalidArgument("candidate_ids", f"{widest} ids at one position; this vLLM engine reads at most {limit} "
                                               "(its engine argument max_logprobs)")
    return continuation, reads
