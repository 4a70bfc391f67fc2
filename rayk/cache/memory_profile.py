"""A snapshot of where one worker's KV memory goes, tier by tier.

Physical blocks are the pool's blocks; logical blocks are entries of requests' block tables (a
block shared by several requests counts once physically, once per table logically). Internal
fragmentation is the token slots allocated to requests but holding no token (the unused tail of
each request's last block). External fragmentation describes how the free blocks lie in id order:
paged attention never needs contiguous blocks, but batched copies of contiguous runs are cheaper.
Overheads are estimates of host memory the bookkeeping itself takes. Recycled host bytes are the
idle buffers of disk reads and writes and of peer exports, kept to be filled again instead of
fresh memory.
"""

from __future__ import annotations

from collections import Counter

from rayk.cache.block_pool import BlockPool
from rayk.cache.kv_cache_manager import KVCacheManager
from rayk.cache.events import TIERS

_BLOCK_TABLE_ENTRY_BYTES = 4  # int32, as block tables reach the attention kernels


def memory_profile(manager: KVCacheManager) -> dict:
    layout = manager.kv_cache.layout
    requests = manager.request_usage()
    logical_blocks = sum(blocks for blocks, _ in requests)
    total_tokens = sum(tokens for _, tokens in requests)
    unused_slots = manager.num_unused_slots
    device = _pool_profile(manager.pool, len(manager.reserved["device"]))
    device |= {
        "active_sequences": len(requests),
        "total_tokens": total_tokens,
        "bytes_per_token": layout.bytes_per_token,
        "logical_blocks": logical_blocks,
        "internal_fragmentation": {
            "unused_slots": unused_slots,
            "fraction": unused_slots / (logical_blocks * manager.block_size) if logical_blocks else 0.0,
        },
        "page_table_bytes": logical_blocks * _BLOCK_TABLE_ENTRY_BYTES,
    }
    profile = {"device": device}
    if manager.host is not None:
        profile["host"] = _pool_profile(manager.host.pool, len(manager.reserved["host"]))
    if manager.disk is not None:
        disk = manager.disk
        profile["disk"] = {
            "total_bytes": disk.max_bytes,
            "used_bytes": disk.num_bytes,
            "free_bytes": max(0, disk.max_bytes - disk.num_bytes),
            "cached_blocks": len(disk),
            "rejected": disk.num_rejected,
        }
    query = manager.num_query_tokens
    for tier in TIERS:
        if tier in profile:
            hits = manager.hit_tokens_by_tier[tier]
            profile[tier]["hit_tokens"] = hits
            profile[tier]["hit_rate"] = hits / query if query else 0.0
    profile["prefix_cache"] = {"query_tokens": query, "hit_tokens": manager.num_hit_tokens}
    profile["recycled_host_bytes"] = {  # idle buffers kept to be filled again (rayk.cache.recycled_memory)
        "disk_reads": manager.disk.read_memory.idle_bytes if manager.disk is not None else 0,
        "disk_writes": manager.disk.write_memory.idle_bytes if manager.disk is not None else 0,
        "exports": manager.chain.export_memory.idle_bytes,
    }
    for tier, pool in (("device", manager.pool), ("host", manager.host.pool if manager.host else None)):
        if pool is not None and pool.lifecycle is not None:
            profile[tier]["lifecycle"] = pool.lifecycle.summary()
    return profile


def _pool_profile(pool: BlockPool, reserved: int) -> dict:
    """Bytes: used (referenced or pinned) + free (allocatable) + reserved (set aside) = total."""
    bytes_per_block = pool.bytes_per_block
    free = pool.free_block_ids()
    held = pool.num_blocks - len(free) - reserved
    pinned_idle = sum(1 for k in pool.pinned if pool.ref_counts[pool.cached[k]] == 0)
    runs = _runs(free)
    return {
        "total_bytes": pool.num_blocks * bytes_per_block,
        "used_bytes": held * bytes_per_block,
        "free_bytes": len(free) * bytes_per_block,
        "reserved_bytes": reserved * bytes_per_block,
        "bytes_per_block": bytes_per_block,
        "physical_blocks": {
            "total": pool.num_blocks,
            "referenced": held - pinned_idle,
            "free": len(free),
            "cached": pool.num_cached_blocks,
            "pinned": len(pool.pinned),
            "reserved": reserved,
        },
        "external_fragmentation": {
            "free_runs": len(runs),
            "largest_free_run": max(runs, default=0),
            "run_length_histogram": dict(sorted(Counter(runs).items())),
            "index": 1 - max(runs, default=0) / len(free) if free else 0.0,
        },
        "allocator_overhead_bytes": pool.bookkeeping_bytes(),
        "evictions": pool.num_evictions,
    }


def _runs(sorted_ids: list[int]) -> list[int]:
    """Lengths of the runs of consecutive ids."""
    runs = []
    for i, block in enumerate(sorted_ids):
        if i and block == sorted_ids[i - 1] + 1:
            runs[-1] += 1
        else:
            runs.append(1)
    return runs
