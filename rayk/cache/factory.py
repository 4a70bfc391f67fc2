"""Builds one worker's tiered KV cache from a ``CacheConfig``: the device pool and its tensor,
the host and disk tiers below it, the tier chain over them and the manager over that.

It needs no model: a KV layout and a model fingerprint are enough, so a worker, a benchmark or a
test can build the same cache the engine serves from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rayk.cache.block_pool import BlockPool
from rayk.cache.disk_tier import DiskTier
from rayk.cache.host_tier import HostTier
from rayk.cache.kv_cache_manager import KVCacheManager
from rayk.cache.lifecycle import LifecycleSampler
from rayk.cache.paged_kv import KVLayout, PagedKVCache
from rayk.cache.policies import copy_policy, make_policy
from rayk.cache.tier_chain import TierChain
from rayk.cache.transfer import CopyEngine
from rayk.config import CacheConfig
from rayk.hashing import BlockHasher


@dataclass
class TieredCache:
    """The parts of one cache, wired: ``manager`` is what the scheduler talks to, ``chain`` what
    moves blocks between the tiers."""

    kv_cache: PagedKVCache
    pool: BlockPool
    host: HostTier | None
    disk: DiskTier | None
    chain: TierChain
    manager: KVCacheManager


def _host_blocks(config: CacheConfig, layout: KVLayout) -> int:
    """The host tier's blocks: ``host_blocks``, or as many as ``host_bytes`` holds."""
    if config.host_bytes is None:
        return config.host_blocks
    block_bytes = HostTier.block_bytes(layout, config.compression("host"))
    if config.host_bytes and config.host_bytes < block_bytes:
        raise ValueError(f"CacheConfig.host_bytes={config.host_bytes} holds no block: one block of this model takes {block_bytes} bytes")
    return config.host_bytes // block_bytes


def build_tiered_cache(config: CacheConfig, layout: KVLayout, fingerprint: bytes, device: torch.device, num_device_blocks: int) -> TieredCache:
    """The device pool of ``num_device_blocks`` blocks and the tiers ``config`` asks for."""
    policy = config.eviction_policy
    kv_cache = PagedKVCache(layout, num_device_blocks, device)
    # Each tier mirrors its own candidates, so each gets its own policy object: an instance
    # serves the device, the tiers below get copies of it.
    pool = BlockPool(num_device_blocks, layout.block_size, tier="device", policy=make_policy(policy), bytes_per_block=layout.bytes_per_block)
    disk = None
    if config.disk_dir is not None:
        disk = DiskTier(config.disk_dir, layout, fingerprint, config.disk_bytes, copy_policy(policy), compress=config.compression("disk"))
    host = None
    host_blocks = _host_blocks(config, layout)
    if host_blocks:
        host = HostTier(layout, host_blocks, copy_policy(policy), lower=disk, compress=config.compression("host"), copy_engine=CopyEngine(device))
    for tier_pool in [pool] + ([host.pool] if host else []):
        tier_pool.lifecycle = LifecycleSampler(config.lifecycle_sample_rate)
    chain = TierChain(pool, kv_cache, fingerprint, host=host, disk=disk)
    manager = KVCacheManager(chain, BlockHasher(fingerprint, layout.block_size, config.hash_algorithm), config.enable_prefix_caching)
    return TieredCache(kv_cache, pool, host, disk, chain, manager)
