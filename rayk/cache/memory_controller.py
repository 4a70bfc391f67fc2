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

from collections.abc import Sequence
from pathlib import Path

import torch

from rayk.cache.block_pool import BlockPool
from rayk.cache.disk_tier import DiskTier
from rayk.cache.kv_cache_manager import KVCacheManager
from rayk.cache.policies import EvictionPolicy, copy_policy, make_policy
from rayk.cache.events import STORED_TIERS as TIER_NAMES
from rayk.hashing import BlockHash


class MemoryController:
    def __init__(self, manager: KVCacheManager, min_device_blocks: int):
        """``min_device_blocks``: the device blocks one ``max_model_len`` sequence needs."""
        self.manager = manager
        self.min_device_blocks = min_device_blocks
        self.replicated: set[BlockHash] = set()  # keys another worker also holds, per the coordinator

    # -- where blocks are ---------------------------------------------------------------------

    def locate(self, keys: Sequence[BlockHash]) -> dict[str, int]:
        """How many of ``keys`` each tier holds."""
        return self.manager.chain.count(keys)

    # -- evict, offload, prefetch -------------------------------------------------------------

    def evict(self, keys: Sequence[BlockHash]) -> dict[str, int]:
        """Drops the keys from every tier (blocks in use or pinned on the device stay there)."""
        return self.manager.chain.evict(keys)

    def clear(self, tiers: Sequence[str] = TIER_NAMES) -> dict[str, int]:
        """Drops every cached block of ``tiers`` (device blocks in use or pinned stay); returns
        how many each tier dropped. A tier left empty announces one ``AllBlocksCleared``."""
        unknown = sorted(set(tiers) - set(TIER_NAMES))
        if isinstance(tiers, str) or unknown:
            raise ValueError(f"tiers must be a list drawn from {TIER_NAMES}, got {tiers!r}")
        return self.manager.chain.clear(tiers)

    def offload(self, keys: Sequence[BlockHash], tier: str = "host") -> int:
        """Moves the keys' free, unpinned blocks down to ``tier`` ("host" or "disk"), out of the
        tiers above it; returns how many of the keys that tier (or, for the host, the disk below
        it) now holds."""
        m = self.manager
        if tier not in ("host", "disk"):
            raise ValueError(f"offload tier must be 'host' or 'disk', got {tier!r}")
        if (m.host if tier == "host" else m.disk) is None:
            raise ValueError(f"offload to {tier!r}, but this engine has no {tier} tier")
        return m.chain.offload(list(dict.fromkeys(keys)), tier)

    def prefetch(self, keys: Sequence[BlockHash], tier: str = "device") -> int:
        """Copies the keys' blocks up into ``tier`` ("device" or "host") from the tiers below, as
        many as it has room for; returns how many blocks were copied."""
        m = self.manager
        if tier not in ("device", "host"):
            raise ValueError(f"prefetch tier must be 'device' or 'host', got {tier!r}")
        if tier == "host" and m.host is None:
            raise ValueError("prefetch to 'host', but this engine has no host tier")
        return m.chain.prefetch(list(dict.fromkeys(keys)), tier)

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
        device = make_policy(policy)
        host = copy_policy(policy) if m.host is not None else None
        for pool_policy in (device, host):
            if hasattr(pool_policy, "set_replicated"):
                pool_policy.set_replicated(self.replicated, True)
        m.pool.set_policy(device)
        if m.host is not None:
            m.host.pool.set_policy(host)
        if m.disk is not None:
            m.disk.set_policy(copy_policy(policy))

    def mark_replicated(self, gained: Sequence[BlockHash], lost: Sequence[BlockHash], reset: bool = False) -> None:
        """What the coordinator says changed: keys of this worker's blocks that another worker now
        holds too (``gained``) or no longer (``lost``). The device and host pools' policies with
        ``set_replicated`` (such as ``cluster_aware``) evict replicas before last copies; other
        policies, and the disk tier (whose policy its writer thread shares), ignore it. With
        ``reset``, ``gained`` is the whole set: every other key is lost."""
        if reset:
            lost = list(self.replicated.difference(gained))
            gained = [k for k in gained if k not in self.replicated]
        self.replicated.difference_update(lost)
        self.replicated.update(gained)
        m = self.manager
        for policy in (m.pool.policy, m.host.pool.policy if m.host is not None else None):
            if hasattr(policy, "set_replicated"):
                policy.set_replicated(lost, False)
                policy.set_replicated(gained, True)

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
        m.chain.settle()
        self._open_snapshot(path, must_exist=False).close()
        snapshot = DiskTier(path, m.kv_cache.layout, m.hasher.fingerprint, 1 << 62, make_policy("lru"), integrity_key=m.chain.integrity_key)
        for records, blocks in m.chain.cached_blocks():
            snapshot.store(records, blocks)
        if m.disk is not None:
            for records, blocks in _read_batches(m.disk, m.disk.keys()):
                snapshot.store(records, blocks)
        snapshot.close()
        return len(snapshot)

    def load_cache(self, path: str | Path) -> int:
        """Loads a ``save_cache`` snapshot into the host tier if there is one, else the disk
        tier, else the device's free blocks; returns how many of its blocks that tier now holds.

        A tier too small for the snapshot keeps the shallowest blocks: the prefixes.
        A snapshot of another model, block size or layout is refused and left untouched.
        """
        m = self.manager
        snapshot = self._open_snapshot(path, must_exist=True)
        keys = sorted(snapshot.keys(), key=lambda k: snapshot.record(k).depth)
        # The deepest batch goes first, so later (shallower) ones evict it when the tier fills;
        # within a batch, shallower blocks come first, so they are the ones that fit.
        chunks = [keys[i : i + _SNAPSHOT_BATCH] for i in range(0, len(keys), _SNAPSHOT_BATCH)]
        try:
            for records, blocks in (batch for chunk in reversed(chunks) for batch in _read_batches(snapshot, chunk)):
                if m.host is not None:
                    m.host.store(records, blocks)
                elif m.disk is not None:
                    m.disk.store(records, blocks)
                else:
                    fresh = [i for i, r in enumerate(records) if r.key not in m.pool.cached][: m.pool.num_free_blocks]
                    if fresh:
                        m.chain.place_on_device([records[i] for i in fresh], blocks[:, :, fresh])
        finally:
            snapshot.close()
        m.chain.settle()
        held = self.locate(keys)
        return held["host"] if m.host is not None else held["disk"] if m.disk is not None else held["device"]

    def _open_snapshot(self, path: str | Path, must_exist: bool) -> DiskTier:
        """The snapshot at ``path``, read-only; a ValueError if it holds files of another kind."""
        m = self.manager
        if must_exist and not Path(path).is_dir():
            raise ValueError(f"cache snapshot {str(path)!r} is not a directory")
        if Path(path).exists() and not Path(path).is_dir():
            raise ValueError(f"cache snapshot path {str(path)!r} exists and is not a directory")
        snapshot = DiskTier(
            path, m.kv_cache.layout, m.hasher.fingerprint, 1 << 62, make_policy("lru"), read_only=True, hasher=m.hasher, integrity_key=m.chain.integrity_key
        )
        if snapshot.num_foreign:
            raise ValueError(
                f"cache snapshot {str(path)!r} holds {snapshot.num_foreign} files written for another model, "
                "block size or KV layout, not sealed with this engine's integrity key, or damaged (a key its tokens do not hash to); "
                "nothing was loaded or changed"
            )
        return snapshot


_SNAPSHOT_BATCH = 256


def _read_batches(tier: DiskTier, keys: Sequence[BlockHash], size: int = _SNAPSHOT_BATCH):
    """Yields (records, ``[2, layers, n, ...]`` KV) of the keys ``tier`` holds intact, in key
    order, ``size`` blocks at a time: a reader of a whole tier or snapshot writes few segments."""
    records, parts = [], []
    for key in keys:
        found = tier.read_block(key)
        if found is None:
            continue
        records.append(found[0])
        parts.append(found[1])
        if len(records) == size:
            yield records, torch.cat(parts, dim=2)
            records, parts = [], []
    if records:
        yield records, torch.cat(parts, dim=2)


def check_num_bytes(num_bytes) -> None:
    """A tier budget must be a whole number of bytes, 0 or more: a ValueError naming it otherwise."""
    if isinstance(num_bytes, bool) or not isinstance(num_bytes, int) or num_bytes < 0:
        raise ValueError(f"num_bytes must be an int >= 0, got {num_bytes!r}")
