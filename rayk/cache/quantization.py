"""int8 compression of cold KV blocks, with one scale per block, layer, K/V and head.

``quantize_int8`` maps each ``[block_size, head_dim]`` slice ``x`` of a block to
``round(x / s)`` in int8, with ``s = max|x| / 127`` (float32). Dequantizing returns ``q * s`` in
the pool's dtype, so each element is off by at most ``s / 2 = max|x| / 254`` (plus the dtype's
own rounding): under 0.4% of the largest magnitude in its block and head. Blocks shrink to
about a quarter (from float32) or a half (from 16-bit). It is off unless asked for, and the
error is measured in tests/test_compression.py, both on values and on greedy tokens.
"""

from __future__ import annotations

import torch

INT8_MAX = 127


def quantize_int8(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``blocks``: ``[2, layers, n, block_size, heads, dim]`` -> (int8 of that shape, float32
    scales ``[2, layers, n, heads]``)."""
    x = blocks.float()
    scales = x.abs().amax(dim=(3, 5)) / INT8_MAX
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(x / safe[:, :, :, None, :, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scales[:, :, :, None, :, None]).to(dtype)


def compressed_block_bytes(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int) -> int:
    """Bytes of one int8 block with its scales."""
    return 2 * num_layers * block_size * num_kv_heads * head_dim + 2 * num_layers * num_kv_heads * 4
