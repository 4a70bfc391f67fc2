"""Builds one worker's tiered KV cache from a ``CacheConfig``: the device pool and its tensor,
the host and disk tiers below it, the tier chain over them and the manager over that.

It needs no model: a KV layout and a model fingerprint are enough, so a worker, a benchmark or a
test can build the same cache the engine serves from.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil
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


def _available_bytes(device: torch.device) -> int:
    """Memory a new allocation on ``device`` can take now: free CUDA memory, or available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


def _check_fits(what: str, blocks: int, block_bytes: int, device: torch.device) -> None:
    """Refuses a pool that cannot fit before allocating it, so an oversized request fails with
    the numbers instead of an allocator error or an out-of-memory kill."""
    requested = blocks * block_bytes
    available = _available_bytes(device)
    if requested > available:
        raise ValueError(
            f"{what}={blocks} blocks of {block_bytes} bytes need {requested} bytes ({requested / 2**30:.1f} GiB), "
            f"more than the {available} bytes ({available / 2**30:.1f} GiB) available on {device}"
        )


def build_tiered_cache(config: CacheConfig, layout: KVLayout, fingerprint: bytes, device: torch.device, num_device_blocks: int) -> TieredCache:
    """The device pool of ``num_device_blocks`` blocks and the tiers ``config`` asks for.

    Each pool's bytes are checked against the memory available before any is allocated (the
    device pool against ``device``, the host tier against RAM); together they may still exceed it.
    """
    policy = config.eviction_policy
    host_blocks = _host_blocks(config, layout)
    _check_fits("num_device_blocks", num_device_blocks, layout.bytes_per_block, device)
    _check_fits("host_blocks", host_blocks, HostTier.block_bytes(layout, config.compression("host")), torch.device("cpu"))
    kv_cache = PagedKVCache(layout, num_device_blocks, device)
    # Each tier mirrors its own candidates, so each gets its own policy object: an instance
    # serves the device, the tiers below get copies of it.
    pool = BlockPool(num_device_blocks, layout.block_size, tier="device", policy=make_policy(policy), bytes_per_block=layout.bytes_per_block)
    hasher = BlockHasher(fingerprint, layout.block_size, config.hash_algorithm)
    integrity_key = config.integrity_key()
    disk = None
    if config.disk_dir is not None:
        # With the hasher, a segment whose keys do not hash from their parents and tokens is refused.
        disk = DiskTier(
            config.disk_dir,
            layout,
            fingerprint,
            config.disk_bytes,
            copy_policy(policy),
            compress=config.compression("disk"),
            write_timeout_s=config.disk_write_timeout_s,
            hasher=hasher,
            integrity_key=integrity_key,
        )
    host = None
    if host_blocks:
        host = HostTier(layout, host_blocks, copy_policy(policy), lower=disk, compress=config.compression("host"), copy_engine=CopyEngine(device))
    for tier_pool in [pool] + ([host.pool] if host else []):
        tier_pool.lifecycle = LifecycleSampler(config.lifecycle_sample_rate)
    chain = TierChain(pool, kv_cache, fingerprint, host=host, disk=disk, integrity_key=integrity_key)
    manager = KVCacheManager(chain, hasher, config.enable_prefix_caching)
    return TieredCache(kv_cache, pool, host, disk, chain, manager)
