"""Manual memory control over one worker's tiers: evict, pin, offload, prefetch, budgets,
snapshots.

Blocks are named by their keys; ``KVCacheManager`` resolves a prompt to its chain of keys. Every
operation acts on the blocks it can and says how many it moved; blocks that a running request
holds are never moved or evicted from under it. A pinned block stays on the device, never
evicted, until unpinned. Pins and budgets that would leave the device unable to hold one
``max_model_len`` sequence are refused with an error that names the numbers.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from rayk.cache.block_pool import BlockPool, BlockRecord
from rayk.cache.disk_tier import DiskTier
from rayk.cache.kv_cache_manager import KVCacheManager
from rayk.cache.policies import EvictionPolicy, make_policy
from rayk.hashing import BlockHash

TIER_NAMES = ("device", "host", "disk")


class MemoryController:
    def __init__(self, manager: KVCacheManager, min_device_blocks: int):
        """``min_device_blocks``: the device blocks one ``max_model_len`` sequence needs."""
        self.manager = manager
        self.min_device_blocks = min_device_blocks

    # -- where blocks are ---------------------------------------------------------------------

    def locate(self, keys: Sequence[BlockHash]) -> dict[str, int]:
        """How many of ``keys`` each tier holds."""
        m = self.manager
        self._settle()
        counts = dict.fromkeys(TIER_NAMES, 0)
        for key in keys:
            counts["device"] += key in m.pool.cached
            counts["host"] += m.host is not None and key in m.host.pool.cached
            counts["disk"] += m.disk is not None and m.disk.contains(key)
        return counts

    # -- evict, offload, prefetch -------------------------------------------------------------

    def evict(self, keys: Sequence[BlockHash]) -> dict[str, int]:
        """Drops the keys from every tier (blocks in use or pinned on the device stay there)."""
        m = self.manager
        self._settle()
        evicted = {"device": len(m.pool.evict(keys)), "host": 0, "disk": 0}
        if m.host is not None:
            evicted["host"] = m.host.evict(keys)
        if m.disk is not None:
            m.disk.flush()
            evicted["disk"] = m.disk.evict(keys)
        return evicted

    def offload(self, keys: Sequence[BlockHash], tier: str = "host") -> int:
        """Moves the keys' free, unpinned blocks down to ``tier`` ("host" or "disk"), out of the
        tiers above it; returns how many blocks now sit only there or below."""
        m = self.manager
        if tier not in ("host", "disk"):
            raise ValueError(f"offload tier must be 'host' or 'disk', got {tier!r}")
        target = m.host if tier == "host" else m.disk
        if target is None:
            raise ValueError(f"offload to {tier!r}, but this engine has no {tier} tier")
        self._settle()
        start = time.perf_counter()
        moved = m.pool.evict(keys)
        if moved:
            if tier == "host":
                m.host.demote(moved, m.kv_cache)
            else:
                m.disk.store(moved, m.kv_cache.gather([r.block for r in moved]))
            m.record_transfer("offload", "device", tier, len(moved), start)
        if tier == "disk" and m.host is not None:
            start = time.perf_counter()
            from_host = m.host.pool.evict(keys)
            if from_host:
                m.disk.store(from_host, m.host.gather([r.block for r in from_host]))
                m.record_transfer("offload", "host", "disk", len(from_host), start)
            moved += from_host
        self._settle()
        return len(moved)

    def prefetch(self, keys: Sequence[BlockHash], tier: str = "device") -> int:
        """Copies the keys' blocks up into ``tier`` ("device" or "host") from the tiers below;
        returns how many blocks were copied. Keys must form a chain in order (a prompt's)."""
        m = self.manager
        if tier not in ("device", "host"):
            raise ValueError(f"prefetch tier must be 'device' or 'host', got {tier!r}")
        if tier == "host" and m.host is None:
            raise ValueError("prefetch to 'host', but this engine has no host tier")
        self._settle()
        start = time.perf_counter()
        records, blocks = self._read_below(keys, tier)
        if not records:
            return 0
        if tier == "host":
            m.host.store(records, blocks)
            m.record_transfer("prefetch", "disk", "host", len(records), start)
            return len(records)
        fit = min(len(records), m.pool.num_free_blocks)
        if fit:
            device_blocks = m._allocate(fit)
            m.kv_cache.scatter(device_blocks, blocks[:, :, :fit])
            for block, record in zip(device_blocks, records):
                m.pool.cache_block(block, record.key, record.parent, record.tokens, record.depth)
            m.pool.free(device_blocks)
            m.record_transfer("prefetch", "below", "device", fit, start)
        return fit

    def _settle(self) -> None:
        """Waits for pending host copies and disk writes, so every tier shows what it holds."""
        m = self.manager
        if m.host is not None:
            m.host.drain()
        if m.disk is not None:
            m.disk.flush()

    def _read_below(self, keys: Sequence[BlockHash], tier: str):
        """Records and KV of the keys found below ``tier`` but not in it, in key order."""
        m = self.manager
        records: list[BlockRecord] = []
        parts = []
        for key in keys:
            if key in (m.pool.cached if tier == "device" else m.host.pool.cached):
                continue
            if tier == "device" and m.host is not None and key in m.host.pool.cached:
                slot = m.host.pool.cached[key]
                records.append(m.host.pool.record(slot))
                parts.append(m.host.read([slot]))
            elif m.disk is not None:
                entry = m.disk.record(key)
                payload = m.disk.read(key, entry.parent, entry.tokens) if entry is not None else None
                if payload is not None:
                    records.append(entry)
                    parts.append(payload)
        return records, (torch.cat(parts, dim=2) if parts else None)

    # -- pins ---------------------------------------------------------------------------------

    def pin(self, keys: Sequence[BlockHash]) -> int:
        """Keeps the keys' blocks on the device until unpinned, fetching them up first."""
        m = self.manager
        new = [k for k in keys if k not in m.pool.pinned]
        room = self._capacity("device") - len(m.pool.pinned) - self.min_device_blocks
        if len(new) > room:
            raise ValueError(
                f"pinning {len(new)} more blocks would leave fewer than the {self.min_device_blocks} device blocks "
                f"one max_model_len sequence needs ({len(m.pool.pinned)} already pinned, {self._capacity('device')} usable)"
            )
        self.prefetch(new, "device")
        return sum(m.pool.pin(k) for k in new)

    def unpin(self, keys: Sequence[BlockHash]) -> None:
        for key in keys:
            self.manager.pool.unpin(key)

    # -- budgets and policies -----------------------------------------------------------------

    def set_budget(self, tier: str, num_bytes: int) -> int:
        """Caps the bytes ``tier`` may use (up to what it was built with); returns its blocks.

        Shrinking the device or host tier sets blocks aside (demoting what they held), growing
        gives them back; the disk tier evicts files down to the new size.
        """
        m = self.manager
        if tier == "disk":
            if m.disk is None:
                raise ValueError("set_budget('disk'), but this engine has no disk tier")
            m.disk.set_max_bytes(num_bytes)
            return len(m.disk)
        pool = self._pool(tier)
        wanted = min(num_bytes // pool.bytes_per_block, pool.num_blocks)
        floor = self.min_device_blocks + len(pool.pinned) if tier == "device" else 0
        if wanted < floor:
            raise ValueError(
                f"a {tier} budget of {num_bytes} bytes holds {wanted} blocks; at least {floor} are needed "
                f"(one max_model_len sequence plus {len(pool.pinned)} pinned)"
            )
        reserved = m.reserved[tier]
        if len(reserved) < pool.num_blocks - wanted:
            short = pool.num_blocks - wanted - len(reserved)
            if short > pool.num_free_blocks:
                raise ValueError(f"the {tier} tier has only {pool.num_free_blocks} free blocks now; cannot set {short} aside")
            reserved.extend(m._allocate(short) if tier == "device" else self._allocate_host(short))
        while len(reserved) > pool.num_blocks - wanted:
            pool.free([reserved.pop()])
        return wanted

    def _allocate_host(self, count: int) -> list[int]:
        evicted: list[BlockRecord] = []
        m = self.manager
        slots = m.host.pool.allocate(count, evicted)
        if evicted and m.disk is not None:
            m.disk.store(evicted, m.host.gather([r.block for r in evicted]))
        return slots

    def set_eviction_policy(self, policy: str | EvictionPolicy) -> None:
        """Replaces every tier's policy (an instance serves the device; the others get copies)."""
        m = self.manager
        fresh = lambda: make_policy(policy) if isinstance(policy, str) else copy.deepcopy(policy)  # noqa: E731
        m.pool.set_policy(make_policy(policy))
        if m.host is not None:
            m.host.pool.set_policy(fresh())
        if m.disk is not None:
            m.disk.set_policy(fresh())

    def _capacity(self, tier: str) -> int:
        return self._pool(tier).num_blocks - len(self.manager.reserved[tier])

    def _pool(self, tier: str) -> BlockPool:
        m = self.manager
        if tier == "device":
            return m.pool
        if tier == "host" and m.host is not None:
            return m.host.pool
        raise ValueError(f"tier must be one of {TIER_NAMES} and present in this engine, got {tier!r}")

    # -- snapshots ----------------------------------------------------------------------------

    def save_cache(self, path: str | Path) -> int:
        """Writes every cached block of every tier to ``path`` in the disk tier's file format."""
        m = self.manager
        self._settle()
        snapshot = DiskTier(path, m.kv_cache.layout, m.hasher.fingerprint, 1 << 62, make_policy("lru"))
        sources = [(m.pool, m.kv_cache)] + ([(m.host.pool, m.host)] if m.host is not None else [])
        for pool, kv in sources:
            records = [pool.record(b) for b in pool.cached.values()]
            if records:
                snapshot.store(records, kv.gather([r.block for r in records]))
        if m.disk is not None:
            for key in m.disk.keys():
                entry = m.disk.record(key)
                payload = m.disk.read(key, entry.parent, entry.tokens) if entry is not None else None
                if payload is not None:
                    snapshot.store([entry], payload)
        snapshot.close()
        return len(snapshot)

    def load_cache(self, path: str | Path) -> int:
        """Loads a ``save_cache`` snapshot: into the host tier if there is one, else the disk
        tier, else the device's free blocks. Files for another model or layout are refused."""
        m = self.manager
        if not Path(path).is_dir():
            raise ValueError(f"cache snapshot {str(path)!r} is not a directory")
        snapshot = DiskTier(path, m.kv_cache.layout, m.hasher.fingerprint, 1 << 62, make_policy("lru"))
        loaded = 0
        try:
            for key in sorted(snapshot.keys(), key=lambda k: snapshot.record(k).depth):
                entry = snapshot.record(key)
                payload = snapshot.read(key, entry.parent, entry.tokens)
                if payload is None:
                    continue
                if m.host is not None:
                    m.host.store([entry], payload)
                elif m.disk is not None:
                    m.disk.store([entry], payload)
                elif m.pool.num_free_blocks and key not in m.pool.cached:
                    [block] = m._allocate(1)
                    m.kv_cache.scatter([block], payload)
                    m.pool.cache_block(block, entry.key, entry.parent, entry.tokens, entry.depth)
                    m.pool.free([block])
                else:
                    continue
                loaded += 1
        finally:
            snapshot.close()
        self._settle()
        return loaded
