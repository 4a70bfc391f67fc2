"""Writing new tokens' K and V into the paged cache.

``store_kvcache`` copies row ``i`` of ``key``/``value`` ([tokens, kv_heads, head_dim]) into slot
``slot_mapping[i]`` (``block * block_size + offset``) of the caches ([blocks, block_size,
kv_heads, head_dim]). On CUDA a Triton kernel does it, one program per token; elsewhere
``index_copy_`` does, and ``store_kvcache_torch`` is the twin the kernel is tested against.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def store_kvcache_torch(key, value, key_cache, value_cache, slot_mapping) -> None:
    heads, dim = key.shape[1], key.shape[2]
    key_cache.view(-1, heads, dim).index_copy_(0, slot_mapping, key)
    value_cache.view(-1, heads, dim).index_copy_(0, slot_mapping, value)


if triton is not None:

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
    """The Triton path; ``kv_heads * head_dim`` must be a power of two (one row per program)."""
    tokens, heads, dim = key.shape
    row = heads * dim
    assert _is_power_of_two(row), f"kv_heads * head_dim = {row} is not a power of two"
    assert key.stride(-1) == 1 and key.stride(-2) == dim and value.stride(-1) == 1 and value.stride(-2) == dim
    assert key_cache.is_contiguous() and value_cache.is_contiguous()
    assert slot_mapping.numel() == tokens
    _store_kvcache_kernel[(tokens,)](key, key.stride(0), value, value.stride(0), key_cache, value_cache, slot_mapping, row)


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def store_kvcache(key, value, key_cache, value_cache, slot_mapping) -> None:
    if key.is_cuda and triton is not None and _is_power_of_two(key.shape[1] * key.shape[2]):
        store_kvcache_triton(key, value, key_cache, value_cache, slot_mapping)
    else:
        store_kvcache_torch(key, value, key_cache, value_cache, slot_mapping)
