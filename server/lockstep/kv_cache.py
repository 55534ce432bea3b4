"""A KV cache with one preallocated row ("slot") per live sequence, for batched decoding of ragged sequences.

Layer l holds keys and values of shape [slots, kv_heads, max_len, head_dim]. Live sequences occupy slots
0..n-1 (kept compact: when a sequence leaves, the last one moves into its hole), so a decode step over all live
sequences attends over the view [:n, :, :kv_len] without gathering, and each row writes its new token at its own
position. Rows shorter than kv_len are masked by the attention mask the runner builds.

The object implements the one method transformers' attention layers call on a cache, `update`. The runner
sets the rows and write positions of the next forward with `plan` before calling the model.
"""

from __future__ import annotations

import torch


class SlotKVCache:
    def __init__(self, *, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (num_slots, num_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_slots = num_slots
        self.max_len = max_len
        self._rows = slice(0, 0)
        self._positions: torch.Tensor | None = None
        self._start = 0
        self._kv_len = 0

    def plan_decode(self, rows: int | torch.Tensor, positions: torch.Tensor) -> None:
        """Next forward: new tokens for each of rows 0..rows-1 (an int: the batch is a view), or for the listed
        rows (a tensor: gathered), written at `positions` ([rows] for one token each, [rows, n] for n each)."""
        self._rows = slice(0, rows) if isinstance(rows, int) else rows
        self._positions = positions if positions.dim() == 2 else positions[:, None]
        self._kv_len = int(positions.max()) + 1

    def plan_extend(self, row: int, start: int, length: int) -> None:
        """Next forward: `length` new tokens for one row, written at start..start+length-1."""
        self._rows = slice(row, row + 1)
        self._positions = None
        self._start = start
        self._kv_len = start + length

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        rows = self._rows
        if self._positions is not None:
            index = torch.arange(rows.start, rows.stop, device=keys.device) if isinstance(rows, slice) else rows
            keys[index[:, None], :, self._positions] = key_states.transpose(1, 2)
            values[index[:, None], :, self._positions] = value_states.transpose(1, 2)
        else:
            keys[rows, :, self._start:self._kv_len] = key_states
            values[rows, :, self._start:self._kv_len] = value_states
        return keys[rows, :, :self._kv_len], values[rows, :, :self._kv_len]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copies the first `length` positions of slot `src` into slot `dst` (compaction)."""
        for keys, values in zip(self.keys, self.values):
            keys[dst, :, :length] = keys[src, :, :length]
            values[dst, :, :length] = values[src, :, :length]
