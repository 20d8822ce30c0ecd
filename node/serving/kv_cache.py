"""A static KV cache: one preallocated [slots, kv_heads, max_len, head_dim] tensor per layer and K/V.

Preallocation keeps every decode step's tensors at fixed addresses (what CUDA graphs need) and
makes admitting a request free: a slot is reused by overwriting it, never reallocated.
"""

from __future__ import annotations

import torch


def length_buckets(max_len: int, smallest: int = 128) -> list[int]:
    """Attention widths a decode step may use: powers of two up to `max_len` (and `max_len` itself)."""
    out, n = [], smallest
    while n < max_len:
        out.append(n)
        n *= 2
    return [*out, max_len]


class StaticKVCache:
    def __init__(
        self,
        *,
        layers: int,
        slots: int,
        kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (slots, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.max_len = max_len
        self.buckets = length_buckets(max_len)

    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self.keys, *self.values))

    def bucket(self, length: int) -> int:
        """The smallest attention width that covers `length` positions."""
        return next(b for b in self.buckets if b >= length)

    def write_prompt(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [n, kv_heads, T, head_dim] for the prompts in `slots` (positions 0..T-1)."""
        t = k.shape[2]
        self.keys[layer][slots, :, :t] = k
        self.values[layer][slots, :, :t] = v

    def write_token(self, layer: int, rows: torch.Tensor, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [B, kv_heads, head_dim], one new token per row at its own position (graph-safe)."""
        self.keys[layer][rows, :, pos] = k
        self.values[layer][rows, :, pos] = v
