"""The pool tensor is flash_attn's paged layout, and blocks move in and out of it many per call."""

from __future__ import annotations

import torch

from rayk.cache.paged_kv import KVLayout, PagedKVCache

LAYOUT = KVLayout(num_layers=2, block_size=4, num_kv_heads=2, head_dim=8, dtype=torch.float16)


def test_layer_views_are_flash_attn_paged_shape_and_share_storage():
    cache = PagedKVCache(LAYOUT, num_blocks=5)
    assert cache.key_cache(1).shape == (5, 4, 2, 8) and cache.key_cache(1).is_contiguous()
    cache.value_cache(0)[3, 1, 0, 2] = 7
    assert cache.kv[1, 0, 3, 1, 0, 2] == 7
    assert cache.num_bytes == 5 * LAYOUT.bytes_per_block == 5 * 4 * 2 * 2 * 2 * 8 * 2


def test_gathered_blocks_scatter_bit_for_bit_into_other_slots():
    source, target = PagedKVCache(LAYOUT, 6), PagedKVCache(LAYOUT, 6)
    source.kv.copy_(torch.randn(source.kv.shape))
    target.scatter([0, 5, 3], source.gather([4, 1, 2]))
    for src, dst in [(4, 0), (1, 5), (2, 3)]:
        assert torch.equal(target.kv[:, :, dst], source.kv[:, :, src])
    assert not target.kv[:, :, [1, 2, 4]].any()
