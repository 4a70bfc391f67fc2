"""Manual memory control over one worker's tiers: evict, pin, offload, prefetch, budgets,
snapshots.

Blocks are named by their keys (a prompt is resolved to its chain of keys above this layer;
duplicate keys count once). Every operation acts on the blocks it can and returns how many it
placed; blocks that a running request holds are never moved or evicted from under it. A pinned
block stays on the device, never evicted, until unpinned. Pins and budgets that would leave the
device fewer than ``min_device_blocks`` usable blocks are refused with an error that names the
numbers.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch

from rayk.cache.block_pool import BlockPool, BlockRecord
from rayk.cache.disk_tier import DiskTier
from rayk.cache.kv_cache_manager import KVCacheManager
from rayk.cache.policies import EvictionPolicy, copy_policy, make_policy
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
            evicted["disk"] = m.disk.evict(keys)
        return evicted

    def clear(self, tiers: Sequence[str] = TIER_NAMES) -> dict[str, int]:
        """Drops every cached block of ``tiers`` (device blocks in use or pinned stay); returns
        how many each tier dropped. A tier left empty announces one ``AllBlocksCleared``."""
        m = self.manager
        unknown = sorted(set(tiers) - set(TIER_NAMES))
        if isinstance(tiers, str) or unknown:
            raise ValueError(f"tiers must be a list drawn from {TIER_NAMES}, got {tiers!r}")
        self._settle()
        dropped = dict.fromkeys(TIER_NAMES, 0)
        if "device" in tiers:
            dropped["device"] = len(m.pool.clear())
        if "host" in tiers and m.host is not None:
            dropped["host"] = len(m.host.pool.clear())
        if "disk" in tiers and m.disk is not None:
            dropped["disk"] = m.disk.clear()
        return dropped

    def offload(self, keys: Sequence[BlockHash], tier: str = "host") -> int:
        """Moves the keys' free, unpinned blocks down to ``tier`` ("host" or "disk"), out of the
        tiers above it; returns how many of the keys that tier (or, for the host, the disk below
        it) now holds."""
        m = self.manager
        if tier not in ("host", "disk"):
            raise ValueError(f"offload tier must be 'host' or 'disk', got {tier!r}")
        target = m.host if tier == "host" else m.disk
        if target is None:
            raise ValueError(f"offload to {tier!r}, but this engine has no {tier} tier")
        keys = list(dict.fromkeys(keys))
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
        if tier == "disk":
            return self.locate(keys)["disk"]  # locate waits for the writes
        self._settle()
        return sum(1 for k in keys if k in m.host.pool.cached or (m.disk is not None and m.disk.contains(k)))

    def prefetch(self, keys: Sequence[BlockHash], tier: str = "device") -> int:
        """Copies the keys' blocks up into ``tier`` ("device" or "host") from the tiers below, as
        many as it has room for; returns how many blocks were copied."""
        m = self.manager
        if tier not in ("device", "host"):
            raise ValueError(f"prefetch tier must be 'device' or 'host', got {tier!r}")
        if tier == "host" and m.host is None:
            raise ValueError("prefetch to 'host', but this engine has no host tier")
        self._settle()
        start = time.perf_counter()
        room = m.pool.num_free_blocks if tier == "device" else m.host.pool.num_free_blocks
        records, blocks, sources = self._read_below(list(dict.fromkeys(keys)), tier, room)
        if not records:
            return 0
        if tier == "host":
            m.host.store(records, blocks)
            m.host.drain()
        else:
            self._place_on_device(records, blocks)
        m.record_transfer("prefetch", "+".join(sorted(sources)), tier, len(records), start)
        return len(records)

    def _place_on_device(self, records: list[BlockRecord], blocks: torch.Tensor) -> None:
        """Copies blocks into free device blocks and publishes them as cached (unreferenced)."""
        m = self.manager
        device_blocks = m.allocate_blocks(len(records))
        m.kv_cache.scatter(device_blocks, blocks)
        for block, record in zip(device_blocks, records):
            m.pool.cache_block(block, record.key, record.parent, record.tokens, record.depth)
        m.pool.free(device_blocks)

    def _settle(self) -> None:
        """Waits for pending host copies and disk writes, so every tier shows what it holds."""
        m = self.manager
        if m.host is not None:
            m.host.drain()
        if m.disk is not None:
            m.disk.flush()

    def _read_below(self, keys: list[BlockHash], tier: str, limit: int):
        """Up to ``limit`` records and KV of the keys found below ``tier`` but not in it, in key
        order, and the tiers they came from."""
        m = self.manager
        here = m.pool.cached if tier == "device" else m.host.pool.cached
        records: list[BlockRecord] = []
        parts, sources = [], set()
        for key in keys:
            if len(records) == limit:
                break
            if key in here:
                continue
            if tier == "device" and m.host is not None and key in m.host.pool.cached:
                slot = m.host.pool.cached[key]
                records.append(m.host.pool.record(slot))
                parts.append(m.host.read([slot]))
                sources.add("host")
            elif m.disk is not None and (entry := m.disk.record(key)) is not None:
                payload = m.disk.read(key, entry.parent, entry.tokens)
                if payload is not None:
                    records.append(entry)
                    parts.append(payload)
                    sources.add("disk")
        return records, (torch.cat(parts, dim=2) if parts else None), sources

    # -- pins ---------------------------------------------------------------------------------

    def pin(self, keys: Sequence[BlockHash]) -> int:
        """Keeps the keys' blocks on the device until unpinned, fetching them up first; returns
        how many of the keys are pinned now (a key cached nowhere cannot be)."""
        m = self.manager
        keys = list(dict.fromkeys(keys))
        new = [k for k in keys if k not in m.pool.pinned]
        room = self._capacity("device") - len(m.pool.pinned) - self.min_device_blocks
        if len(new) > room:
            raise ValueError(
                f"pinning {len(new)} more blocks would leave fewer than the {self.min_device_blocks} device blocks "
                f"one max_model_len sequence needs ({len(m.pool.pinned)} already pinned, {self._capacity('device')} usable)"
            )
        # Pin what is on the device first, so fetching the rest cannot evict it.
        for key in new:
            m.pool.pin(key)
        self.prefetch([k for k in new if k not in m.pool.pinned], "device")
        for key in new:
            m.pool.pin(key)
        return sum(1 for k in keys if k in m.pool.pinned)

    def unpin(self, keys: Sequence[BlockHash]) -> None:
        for key in keys:
            self.manager.pool.unpin(key)

    # -- budgets and policies -----------------------------------------------------------------

    def set_budget(self, tier: str, num_bytes: int) -> int:
        """Caps the bytes ``tier`` may use (up to what it was built with); returns its blocks.

        Shrinking the device or host tier sets blocks aside (demoting what they held), growing
        gives them back; the disk tier evicts files down to the new size.
        """
        check_num_bytes(num_bytes)
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
            reserved.extend(m.allocate_blocks(short) if tier == "device" else m.host.reserve(short))
        while len(reserved) > pool.num_blocks - wanted:
            pool.free([reserved.pop()])
        return wanted

    def set_eviction_policy(self, policy: str | EvictionPolicy) -> None:
        """Replaces every tier's policy (an instance serves the device; the others get copies)."""
        m = self.manager
        m.pool.set_policy(make_policy(policy))
        if m.host is not None:
            m.host.pool.set_policy(copy_policy(policy))
        if m.disk is not None:
            m.disk.set_policy(copy_policy(policy))

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
        """Writes every cached block of every tier to the directory ``path`` (created if need
        be) in the disk tier's file format; returns how many blocks the snapshot holds."""
        m = self.manager
        self._settle()
        self._open_snapshot(path, must_exist=False).close()
        snapshot = DiskTier(path, m.kv_cache.layout, m.hasher.fingerprint, 1 << 62, make_policy("lru"))
        for records, blocks in m.cached_blocks():
            snapshot.store(records, blocks)
        if m.disk is not None:
            for key in m.disk.keys():
                entry = m.disk.record(key)
                payload = m.disk.read(key, entry.parent, entry.tokens) if entry is not None else None
                if payload is not None:
                    snapshot.store([entry], payload)
        snapshot.close()
        return len(snapshot)

    def load_cache(self, path: str | Path) -> int:
        """Loads a ``save_cache`` snapshot into the host tier if there is one, else the disk
        tier, else the device's free blocks; returns how many of its blocks that tier now holds.

        Blocks go deepest first, so a tier too small for the snapshot keeps the prefixes.
        A snapshot of another model, block size or layout is refused and left untouched.
        """
        m = self.manager
        snapshot = self._open_snapshot(path, must_exist=True)
        keys = sorted(snapshot.keys(), key=lambda k: snapshot.record(k).depth, reverse=True)
        try:
            for key in keys:
                entry = snapshot.record(key)
                payload = snapshot.read(key, entry.parent, entry.tokens)
                if payload is None:
                    continue
                if m.host is not None:
                    m.host.store([entry], payload)
                elif m.disk is not None:
                    m.disk.store([entry], payload)
                elif key not in m.pool.cached and m.pool.num_free_blocks:
                    self._place_on_device([entry], payload)
        finally:
            snapshot.close()
        self._settle()
        held = self.locate(keys)
        return held["host"] if m.host is not None else held["disk"] if m.disk is not None else held["device"]

    def _open_snapshot(self, path: str | Path, must_exist: bool) -> DiskTier:
        """The snapshot at ``path``, read-only; a ValueError if it holds files of another kind."""
        m = self.manager
        if must_exist and not Path(path).is_dir():
            raise ValueError(f"cache snapshot {str(path)!r} is not a directory")
        if Path(path).exists() and not Path(path).is_dir():
            raise ValueError(f"cache snapshot path {str(path)!r} exists and is not a directory")
        snapshot = DiskTier(path, m.kv_cache.layout, m.hasher.fingerprint, 1 << 62, make_policy("lru"), read_only=True)
        if snapshot.num_foreign:
            raise ValueError(
                f"cache snapshot {str(path)!r} holds {snapshot.num_foreign} files written for another model, "
                "block size or KV layout; nothing was loaded or changed"
            )
        return snapshot


def check_num_bytes(num_bytes) -> None:
    """A tier budget must be a whole number of bytes, 0 or more: a ValueError naming it otherwise."""
    if isinstance(num_bytes, bool) or not isinstance(num_bytes, int) or num_bytes < 0:
        raise ValueError(f"num_bytes must be an int >= 0, got {num_bytes!r}")
