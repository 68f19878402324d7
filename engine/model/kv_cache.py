"""KVCache: per-request, full-length store of post-RoPE keys and values, one slot per absolute position.

Slot p holds the K/V most recently computed for position p. Storing K after RoPE makes a cached key bit-identical
to the one a fresh full forward would produce from the same hidden state (RoPE is elementwise), and saves
re-rotating the whole cache every step as the pre-RoPE reference caches do.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        # One extra slot at the end: padded query rows of a ragged batch write there, never over a real position.
        shape = (batch, kv_heads, capacity + 1, head_dim)
        # Zero-filled, not empty: a slot never written must not leak another request's memory into attention.
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.capacity = capacity
        self.scratch = capacity

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def write(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """positions [B, T]; k, v [B, kv_heads, T, hd] -> slots positions[b, t] of row b."""
        idx = positions[:, None, :, None].expand_as(k)  # [B, kv_heads, T, hd]
        self.k[layer].scatter_(2, idx, k)
        self.v[layer].scatter_(2, idx, v)

    def read(self, layer: int, keys: torch.Tensor | None = None, key_len: int | None = None):
        """keys [B, K] slot indices (any order, any subset) or None for the prefix [0, key_len)."""
        k, v = self.k[layer], self.v[layer]
        if keys is None:
            n = self.capacity if key_len is None else key_len
            return k[:, :, :n], v[:, :, :n]
        idx = keys[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])  # [B, kv_heads, K, hd]
        return torch.gather(k, 2, idx), torch.gather(v, 2, idx)

    def truncate_view(self, key_len: int) -> None:
        """Zero every slot from key_len on (used when a method drops a cached suffix)."""
        for t in self.k + self.v:
            t[:, :, key_len: self.capacity].zero_()
