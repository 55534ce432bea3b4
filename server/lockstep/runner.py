"""One transformers causal LM with a slot KV cache: extend one sequence, or decode one token for all at once.

This is the per-model primitive of the lock-step engine. A step of a token-level strategy asks each model of a
group (base, guides) for the next-token logits of its live sequences; every call here is one batched forward.
Logits come back in float32 over the real vocabulary (padded lm_head rows sliced off).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from server.lockstep.kv_cache import SlotKVCache


# What one forward costs beyond its tokens, in tokens, by device type: ragged rows are split into several forwards
# when the padding saved is worth more. CPU, measured on 2 cores with SmolLM2-135M (float32): a forward costs about
# 60 ms plus 2 ms per token position, i.e. ~30 tokens; one prompt of 500 beside eight catch-ups of 10 took 8.1 s as
# one padded forward and 1.1 s as two (bench/padding.py). Any other device: never measured (no GPU was lent); a
# forward's fixed cost is worth far more tokens there, so the default splits only where padding would add more than
# 512 token positions, a guess to replace by a measurement.
FORWARD_OVERHEAD_TOKENS = {"cpu": 32}
FORWARD_OVERHEAD_TOKENS_OTHER = 512


def padding_groups(lengths: Sequence[int], overhead: int) -> list[list[int]]:
    """Splits ragged rows (their token counts) into forwards, each padded to its longest row, at the least cost

        Σ over forwards g of  overhead + |g| · max_{i ∈ g} lengths[i]

    (token positions computed, plus `overhead` per forward). Some optimal split is a run of consecutive rows in
    length order (a row can move from a forward with a longer longest row into one whose longest row is at least its
    own at no extra cost: the width it joins stays, the forward it leaves loses a row), and rows of equal length can
    always share one (splitting them only adds an overhead), so a dynamic program over the distinct lengths finds it
    exactly in O(d²). Returns the row indices of each forward, the shortest rows first. E.g. [500, 10 × 8] with
    overhead 32: the eight rows of 10 in one forward (80 + 32) and the 500 alone (500 + 32), against 9 · 500 + 32
    padded together."""
    by_length: dict[int, list[int]] = {}
    for row in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        by_length.setdefault(lengths[row], []).append(row)
    distinct = list(by_length)
    rows_up_to = [0]  # rows_up_to[j]: how many rows the j shortest distinct lengths hold
    for length in distinct:
        rows_up_to.append(rows_up_to[-1] + len(by_length[length]))
    best = [0] + [None] * len(distinct)  # best[j]: the least cost of the rows of the j shortest distinct lengths
    cut = [0] * (len(distinct) + 1)
    for j in range(1, len(distinct) + 1):
        for i in range(j):
            cost = best[i] + overhead + (rows_up_to[j] - rows_up_to[i]) * distinct[j - 1]
            if best[j] is None or cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], len(distinct)
    while j > 0:
        groups.append([row for length in distinct[cut[j]:j] for row in by_length[length]])
        j = cut[j]
    return groups[::-1]


class SlotsExhausted(RuntimeError):
    pass


@dataclasses.dataclass(eq=False)
class Slot:
    """A live sequence's row in the cache. `index` changes when the cache compacts; `length` is tokens cached.
    `exit_states`: for each of the runner's `exit_layers` k, the hidden state after layer k at the last token fed."""
    index: int
    length: int = 0
    exit_states: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)


class ModelRunner:
    def __init__(self, model, *, vocab_size: int, max_slots: int, max_len: int,
                 forward_overhead_tokens: int | None = None, exit_layers: Sequence[int] = ()):
        """`forward_overhead_tokens`: the per-forward cost `padding_groups` weighs padding against (default: by the
        model's device type, FORWARD_OVERHEAD_TOKENS; a very large value keeps every batch of ragged rows in one
        padded forward). `exit_layers`: layers k whose hidden state h_k each forward over slots keeps in its slots'
        `exit_states`, so that an early-exit view of this model (the first k layers, the same final norm and head)
        on the same tokens needs no forward of its own: its logits are `head(h_k)` (`early_exit_view`)."""
        config = model.config
        self.model = model
        self.device = next(model.parameters()).device
        self.forward_overhead_tokens = (FORWARD_OVERHEAD_TOKENS.get(self.device.type, FORWARD_OVERHEAD_TOKENS_OTHER)
                                        if forward_overhead_tokens is None else forward_overhead_tokens)
        self.vocab_size = vocab_size
        self.max_len = max_len
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.cache = SlotKVCache(
            num_layers=config.num_hidden_layers, num_slots=max_slots,
            num_kv_heads=config.num_key_value_heads, head_dim=head_dim, max_len=max_len,
            dtype=model.dtype, device=self.device)
        self.live: list[Slot] = []
        self.forward_passes = 0
        self.exit_layers = tuple(sorted(set(exit_layers)))
        for k in self.exit_layers:
            if not 1 <= k < config.num_hidden_layers:
                raise ValueError(f"exit layer {k}: the model's layers are 1..{config.num_hidden_layers}")

    @property
    def free_slots(self) -> int:
        return self.cache.num_slots - len(self.live)

    def cache_usage(self) -> float:
        """Tokens cached over the cache's capacity (slots × max_len), 0..1."""
        return sum(slot.length for slot in list(self.live)) / (self.cache.num_slots * self.max_len)

    def open(self) -> Slot:
        if not self.free_slots:
            raise SlotsExhausted(f"all {self.cache.num_slots} slots are in use")
        slot = Slot(index=len(self.live))
        self.live.append(slot)
        return slot

    def close(self, slot: Slot) -> None:
        """Frees the slot; the last live sequence moves into the hole so live slots stay 0..n-1."""
        last = self.live.pop()
        if last is not slot:
            self.cache.move(last.index, slot.index, last.length)
            last.index = slot.index
            self.live[slot.index] = last
        slot.index = -1

    def fork(self, slot: Slot) -> Slot:
        """A new slot holding a copy of `slot`'s cached tokens (no forward)."""
        copy = self.open()
        self.cache.move(slot.index, copy.index, slot.length)
        copy.length = slot.length
        copy.exit_states = dict(slot.exit_states)
        return copy

    @torch.inference_mode()
    def tail_log_probs(self, sequences: list[list[int]], keep: int) -> torch.Tensor:
        """Log-softmax of the next-token logits at the last `keep` positions of each sequence: [B, keep, V] float32
        (row b, j: the distribution after sequences[b][:len - keep + j + 1]; for a sequence shorter than `keep`, only
        its last len places mean anything). Batched forwards (rows of very different lengths split as
        `padding_groups` says), left-padded, without the slot cache (scoring reads a prompt once and keeps nothing)."""
        if max(len(s) for s in sequences) > self.max_len:
            raise ValueError(f"a sequence is over the model's {self.max_len} tokens")
        groups = padding_groups([len(s) for s in sequences], self.forward_overhead_tokens)
        if len(groups) == 1:
            return self._tail_log_probs(sequences, keep)
        out = torch.empty((len(sequences), keep, self.vocab_size), dtype=torch.float32, device=self.device)
        for group in groups:
            out[group] = self._tail_log_probs([sequences[i] for i in group], keep)
        return out

    def _tail_log_probs(self, sequences: list[list[int]], keep: int) -> torch.Tensor:
        width = max(keep, *(len(s) for s in sequences))  # a row shorter than `keep` has padding in its first places
        ids = torch.zeros((len(sequences), width), dtype=torch.long, device=self.device)
        mask = torch.zeros_like(ids)
        for row, sequence in enumerate(sequences):
            ids[row, width - len(sequence):] = torch.tensor(sequence, device=self.device)
            mask[row, width - len(sequence):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                         logits_to_keep=keep)
        self.forward_passes += 1
        return out.logits[:, -keep:, :self.vocab_size].float().log_softmax(-1)

    @torch.inference_mode()
    def extend(self, slot: Slot, token_ids: list[int]) -> torch.Tensor:
        """Appends tokens to one sequence (prefill, or catch-up) and returns next-token logits [V] in float32."""
        start, count = slot.length, len(token_ids)
        if start + count > self.max_len:
            raise ValueError(f"sequence would reach {start + count} tokens, over the cache's {self.max_len}")
        ids = torch.tensor([token_ids], device=self.device)
        positions = torch.arange(start, start + count, device=self.device).unsqueeze(0)
        keys = torch.arange(start + count, device=self.device)
        mask = (keys.unsqueeze(0) <= positions.squeeze(0).unsqueeze(1))[None, None]
        self.cache.plan_extend(slot.index, start, count)
        logits = self._forward(ids, mask, positions, [slot])
        slot.length += count
        return logits[0]

    @torch.inference_mode()
    def extend_many(self, slots: list[Slot], token_lists: list[list[int]]) -> torch.Tensor:
        """Appends tokens to several sequences (prefill chunks of newcomers, catch-ups) in batched forwards, rows of
        very different lengths split as `padding_groups` says; returns each one's next-token logits
        [len(slots), V] in float32."""
        for slot, tokens in zip(slots, token_lists):
            if slot.length + len(tokens) > self.max_len:
                raise ValueError(f"sequence would reach {slot.length + len(tokens)} tokens, over the cache's "
                                 f"{self.max_len}")
        groups = padding_groups([len(tokens) for tokens in token_lists], self.forward_overhead_tokens)
        if len(groups) == 1:
            return self._extend_ragged(slots, token_lists)
        logits = torch.empty((len(slots), self.vocab_size), dtype=torch.float32, device=self.device)
        for group in groups:
            logits[group] = self._extend_ragged([slots[i] for i in group], [token_lists[i] for i in group])
        return logits

    def _extend_ragged(self, slots: list[Slot], token_lists: list[list[int]]) -> torch.Tensor:
        """One forward for ragged rows. Each row's tokens sit at the end of the block (so the block's last column
        is every row's last token and only it reaches the head), at their own positions; the row's padding columns
        get the positions right after its tokens: they write into cache cells past the row's length, which no real
        token attends to (a query at position p sees keys <= p) and later tokens overwrite."""
        width = max(len(tokens) for tokens in token_lists)
        ids = torch.zeros((len(slots), width), dtype=torch.long, device=self.device)
        positions = torch.empty((len(slots), width), dtype=torch.long, device=self.device)
        for row, (slot, tokens) in enumerate(zip(slots, token_lists)):
            count = len(tokens)
            ids[row, width - count:] = torch.tensor(tokens, device=self.device)
            positions[row, width - count:] = torch.arange(slot.length, slot.length + count, device=self.device)
            pads = torch.arange(slot.length + count, slot.length + width, device=self.device)[:width - count]
            positions[row, :width - count] = pads.clamp(max=self.max_len - 1)
        keys = torch.arange(int(positions.max()) + 1, device=self.device)
        mask = (keys[None, None, :] <= positions[:, :, None])[:, None]
        self.cache.plan_decode(torch.tensor([s.index for s in slots], device=self.device), positions)
        logits = self._forward(ids, mask, positions, slots)
        for slot, tokens in zip(slots, token_lists):
            slot.length += len(tokens)
        return logits

    @torch.inference_mode()
    def decode(self, slots: list[Slot], token_ids: list[int]) -> torch.Tensor:
        """One new token for each of `slots` (any live slots, in any order); returns logits [len(slots), V] in the
        order of `slots`. All live slots (the lock-step engine): the batch is a view of the compact cache. A subset
        (vLLM steps only the requests it scheduled): their rows are gathered."""
        rows = torch.tensor([s.index for s in slots], device=self.device)
        ids = torch.tensor(token_ids, device=self.device)
        positions = torch.tensor([s.length for s in slots], device=self.device)
        if int(positions.max()) >= self.max_len:
            raise ValueError(f"a sequence is at the cache's limit of {self.max_len} tokens")
        whole = len(slots) == len(self.live)
        if whole:  # batch row i = cache row i: put the inputs in cache order
            ids = torch.empty_like(ids).index_copy_(0, rows, ids)
            positions = torch.empty_like(positions).index_copy_(0, rows, positions)
        keys = torch.arange(int(positions.max()) + 1, device=self.device)
        mask = (keys.unsqueeze(0) <= positions.unsqueeze(1))[:, None, None, :]
        self.cache.plan_decode(len(slots) if whole else rows, positions)
        batch_order = sorted(slots, key=lambda s: s.index) if whole else slots
        logits = self._forward(ids.unsqueeze(1), mask, positions.unsqueeze(1), batch_order)
        for s in slots:
            s.length += 1
        return logits[rows] if whole else logits

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 slots: Sequence[Slot]) -> torch.Tensor:
        """One forward of the batch whose row i is `slots[i]`, each row's last token in the last column; keeps each
        slot's hidden state after every exit layer (hooks live only for this forward: the layer modules are shared
        with early-exit views of this model, whose own forwards keep nothing)."""
        states: dict[int, torch.Tensor] = {}

        def keeper(layer: int):
            def keep(module, inputs, output):
                hidden = output[0] if isinstance(output, tuple) else output
                states[layer] = hidden[:, -1].clone()  # not a view that keeps the whole block alive
            return keep

        layers = self.model.model.layers
        hooks = [layers[k - 1].register_forward_hook(keeper(k)) for k in self.exit_layers]
        try:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=self.cache,
                             use_cache=True, logits_to_keep=1)
        finally:
            for hook in hooks:
                hook.remove()
        self.forward_passes += 1
        for k, hidden in states.items():
            for row, slot in enumerate(slots):
                slot.exit_states[k] = hidden[row]
        return out.logits[:, -1, :self.vocab_size].float()

    @torch.inference_mode()
    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits [B, V] (float32) from hidden states [B, H] before the final norm: the last step of this
        model's forward, for an early-exit view's rows whose layers ran inside the full model's forward."""
        return self.model.lm_head(self.model.model.norm(hidden))[:, :self.vocab_size].float()


def decode_streams(runners: dict[str, ModelRunner], streams: list[tuple[str, Slot, int]]) -> list[torch.Tensor]:
    """One decode step for many streams (model name, slot, next token) over several models: one batched forward
    per model, covering every live slot of that model. Returns each stream's next-token logits [V], in order."""
    batches: dict[str, tuple[list[Slot], list[int]]] = {}
    places = []
    for name, slot, token in streams:
        slots, tokens = batches.setdefault(name, ([], []))
        places.append((name, len(slots)))
        slots.append(slot)
        tokens.append(token)
    logits = {name: runners[name].decode(slots, tokens) for name, (slots, tokens) in batches.items()}
    return [logits[name][row] for name, row in places]
