"""The Triton kernel of ``rayk.model.store_kvcache``, in its own module so that importing rayk
does not import Triton (0.2-0.3 s of every start); it is imported on the first CUDA store."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _store_kvcache_kernel(key_ptr, key_stride, value_ptr, value_stride, key_cache_ptr, value_cache_ptr, slot_mapping_ptr, D: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token)
    offsets = tl.arange(0, D)
    key = tl.load(key_ptr + token * key_stride + offsets)
    value = tl.load(value_ptr + token * value_stride + offsets)
    tl.store(key_cache_ptr + slot * D + offsets, key)
    tl.store(value_cache_ptr + slot * D + offsets, value)


def store_kvcache_triton(key, value, key_cache, value_cache, slot_mapping) -> None:
    """One program per token; ``kv_heads * head_dim`` must be a power of two (one row per program)."""
    tokens, heads, dim = key.shape
    row = heads * dim
    assert row > 0 and row & (row - 1) == 0, f"kv_heads * head_dim = {row} is not a power of two"
    assert key.stride(-1) == 1 and key.stride(-2) == dim and value.stride(-1) == 1 and value.stride(-2) == dim
    assert key_cache.is_contiguous() and value_cache.is_contiguous()
    assert slot_mapping.numel() == tokens
    _store_kvcache_kernel[(tokens,)](key, key.stride(0), value, value.stride(0), key_cache, value_cache, slot_mapping, row)
