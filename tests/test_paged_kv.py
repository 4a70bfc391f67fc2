"""Blocks leave and enter a pool as raw bytes plus metadata, many per call, bit for bit."""

from __future__ import annotations

import pytest
import torch

from rayk.cache.paged_kv import KVLayout, PagedKVCache

LAYOUT = KVLayout(num_layers=2, block_size=4, num_kv_heads=2, head_dim=8, dtype=torch.float16)


def test_layer_views_are_flash_attn_paged_shape_and_share_storage():
    cache = PagedKVCache(LAYOUT, num_blocks=5)
    assert cache.key_cache(1).shape == (5, 4, 2, 8) and cache.key_cache(1).is_contiguous()
    cache.value_cache(0)[3, 1, 0, 2] = 7
    assert cache.kv[1, 0, 3, 1, 0, 2] == 7
    assert cache.num_bytes == 5 * LAYOUT.bytes_per_block == 5 * 4 * 2 * 2 * 2 * 8 * 2


def test_exported_blocks_import_bit_for_bit_into_other_slots():
    source, target = PagedKVCache(LAYOUT, 6), PagedKVCache(LAYOUT, 6)
    source.kv.copy_(torch.randn(source.kv.shape))
    payload, metadata = source.export_blocks([4, 1, 2])
    assert payload.dtype.name == "uint8" and payload.nbytes == 3 * LAYOUT.bytes_per_block
    assert metadata["num_blocks"] == 3 and metadata["dtype"] == "float16"
    target.import_blocks([0, 5, 3], bytes(payload), metadata)
    for src, dst in [(4, 0), (1, 5), (2, 3)]:
        assert torch.equal(target.kv[:, :, dst], source.kv[:, :, src])
    assert not target.kv[:, :, [1, 2, 4]].any()


def test_blocks_of_another_layout_are_refused_without_writing():
    source = PagedKVCache(KVLayout(2, 8, 2, 8, torch.float16), 2)
    target = PagedKVCache(LAYOUT, 2)
    payload, metadata = source.export_blocks([0])
    with pytest.raises(ValueError, match=r"metadata differs in \['block_size'\]"):
        target.import_blocks([0], payload, metadata)
    good_payload, good_metadata = target.export_blocks([0])
    with pytest.raises(ValueError, match="payload has 10 bytes"):
        target.import_blocks([0], good_payload[:10], good_metadata)
    assert not target.kv.any()
