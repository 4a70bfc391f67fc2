"""Writing new tokens' K and V into the paged cache.

``store_kvcache`` copies row ``i`` of ``key``/``value`` ([tokens, kv_heads, head_dim]) into slot
``slot_mapping[i]`` (``block * block_size + offset``) of the caches ([blocks, block_size,
kv_heads, head_dim]). On CUDA a Triton kernel (``store_kvcache_triton.py``, beside this file)
does it, one program per token; elsewhere ``index_copy_`` does, and ``store_kvcache_torch`` is
the twin the kernel is tested against.
"""

from __future__ import annotations

import importlib.util

# Looked up, not imported: importing Triton costs every start 0.2-0.3 s, and CPU runs never use it.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def store_kvcache_torch(key, value, key_cache, value_cache, slot_mapping) -> None:
    heads, dim = key.shape[1], key.shape[2]
    key_cache.view(-1, heads, dim).index_copy_(0, slot_mapping, key)
    value_cache.view(-1, heads, dim).index_copy_(0, slot_mapping, value)


def store_kvcache_triton(key, value, key_cache, value_cache, slot_mapping) -> None:
    """The Triton path (imports Triton on first use); ``kv_heads * head_dim`` must be a power of two."""
    from rayk.model.store_kvcache_triton import store_kvcache_triton as kernel

    kernel(key, value, key_cache, value_cache, slot_mapping)


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def store_kvcache(key, value, key_cache, value_cache, slot_mapping) -> None:
    if key.is_cuda and _TRITON_INSTALLED and _is_power_of_two(key.shape[1] * key.shape[2]):
        store_kvcache_triton(key, value, key_cache, value_cache, slot_mapping)
    else:
        store_kvcache_torch(key, value, key_cache, value_cache, slot_mapping)
