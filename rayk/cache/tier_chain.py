"""The tier chain: one worker's tiers, best first, and every move of a block between them.

    device pool  →  host tier  →  disk tier        (and, for one request, blocks from a peer)

Who owns what:

* the chain owns *placement*: finding a block in the best tier that holds it (``locate``),
  bringing found blocks up into device blocks (``promote``), sending the device blocks an
  allocation evicted down (``allocate`` → ``demote``: device → host → disk, each tier passing on
  what it evicts to make room), moving blocks by hand (``offload``, ``prefetch``), reading
  everything for a snapshot or a spill (``cached_blocks``), and blocks leaving for and arriving
  from peers in the block-batch format (``export``, ``stage_remote``);
* each tier owns its own storage and bookkeeping: the device ``BlockPool`` its ref counts and
  key map, ``HostTier`` its slots and in-flight copies, ``DiskTier`` its segments and index;
* the ``KVCacheManager`` above owns requests: their block tables, the references they hold, what
  they publish. It asks the chain where blocks are and for device blocks, nothing else.

Blocks from a peer are *staged* for the request that pulled them, in host memory, as a remote
tier that only that request sees: its prefix lookup finds them after disk, and its admission
copies them into device blocks like a host hit and publishes them there, so later requests hit
them on the device. A staged block is confirmed against its parent key and token ids like any
other hit; what the request does not use is dropped when it is admitted or freed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from rayk.cache import block_codec
from rayk.cache.block_pool import BlockPool, BlockRecord
from rayk.cache.disk_tier import DiskTier
from rayk.cache.events import STORED_TIERS, KVEvent
from rayk.cache.host_tier import HostTier
from rayk.cache.paged_kv import PagedKVCache
from rayk.cache.recycled_memory import RecycledMemory
from rayk.hashing import BlockHash

# (kind, source tier, target tier, blocks, bytes, start seconds, end seconds), perf_counter clock
TransferObserver = Callable[[str, str, str, int, int, float, float], None]

_PER_BLOCK_COPY_BYTES = 1 << 20
EXPORT_MEMORY_BYTES = 256 << 20
"""The memory of exported batches, once Ray has copied them, that waits at most to be exported
into again (``rayk.cache.recycled_memory``)."""

Source = tuple[str, object]
"""Where a found block is: ("device", block id), ("host", slot), ("disk", KV tensor read and
verified) or ("remote", KV tensor staged from a peer)."""


class TierChain:
    def __init__(
        self,
        pool: BlockPool,
        kv_cache: PagedKVCache | None = None,
        fingerprint: bytes = b"",
        host: HostTier | None = None,
        disk: DiskTier | None = None,
        integrity_key: bytes | None = None,
    ):
        """``kv_cache`` may be left out for bookkeeping alone (no tiers below, no peers); with
        ``integrity_key`` the batches it exports to peers are sealed with it."""
        if (host or disk) and kv_cache is None:
            raise ValueError("host and disk tiers need the device kv_cache to copy blocks from and to")
        self.kv_cache = kv_cache
        self.pool = pool
        self.fingerprint = fingerprint
        self.host = host
        self.disk = disk
        self.integrity_key = integrity_key
        self.remote: dict[str, dict[BlockHash, tuple[BlockRecord, torch.Tensor]]] = {}  # request id -> staged blocks
        self.export_memory = RecycledMemory(EXPORT_MEMORY_BYTES)
        self.transfer_observers: list[TransferObserver] = []

    # -- finding blocks -----------------------------------------------------------------------

    def begin_lookup(self) -> None:
        """Publishes finished host copies, so a lookup sees them."""
        if self.host is not None:
            self.host.poll()

    def locate(self, key: BlockHash, parent: BlockHash, tokens: bytes, request_id: str | None = None) -> Source | None:
        """The best tier holding the block, confirmed against its parent key and tokens."""
        block = self.pool.lookup(key, parent, tokens)
        if block is not None:
            return ("device", block)
        if self.host is not None:
            slot = self.host.lookup(key, parent, tokens)
            if slot is not None:
                return ("host", slot)
        if self.disk is not None:
            payload = self.disk.read(key, parent, tokens)
            if payload is not None:
                return ("disk", payload)
        staged = self.remote.get(request_id)
        if staged:
            found = staged.get(key)
            if found is not None and found[0].parent == parent and found[0].tokens == tokens:
                return ("remote", found[1])
        return None

    def count(self, keys: Sequence[BlockHash]) -> dict[str, int]:
        """How many of ``keys`` each stored tier holds (after pending copies and writes land)."""
        self.settle()
        counts = dict.fromkeys(STORED_TIERS, 0)
        for key in keys:
            counts["device"] += key in self.pool.cached
            counts["host"] += self.host is not None and key in self.host.pool.cached
            counts["disk"] += self.disk is not None and self.disk.contains(key)
        return counts

    # -- device blocks: in and out ------------------------------------------------------------

    def allocate(self, count: int) -> list[int]:
        """Takes ``count`` free device blocks, demoting the cached blocks evicted to make room
        before anything overwrites them (the one allocation path of every tier operation)."""
        if count <= 0:
            return []
        if self.host is None and self.disk is None:
            return self.pool.allocate(count)
        evicted: list[BlockRecord] = []
        blocks = self.pool.allocate(count, evicted)
        if evicted:
            self.demote(evicted, "demote")
        return blocks

    def demote(self, records: list[BlockRecord], kind: str, tier: str | None = None) -> None:
        """Copies device blocks (``records[i].block``) to ``tier`` ("host" or "disk"), by
        default the best tier below, if any."""
        tier = tier or ("host" if self.host is not None else "disk" if self.disk is not None else None)
        if tier is None:
            return
        start = time.perf_counter()
        if tier == "host":
            self.host.demote(records, self.kv_cache)
        else:
            on_cpu = self.kv_cache.device.type == "cpu"  # a CUDA pool gathers on the device first
            buffer = self.disk.write_buffer(len(records)) if on_cpu else None
            self.disk.store(records, self.kv_cache.gather([r.block for r in records], out=buffer))
        self.record_transfer(kind, "device", tier, len(records), start)

    def hold(self, sources: Sequence[Source]) -> None:
        """Protects a hit's device blocks and host slots until it is promoted."""
        self.pool.touch([ref for tier, ref in sources if tier == "device"])
        host_slots = [ref for tier, ref in sources if tier == "host"]
        if host_slots:
            self.host.hold(host_slots)

    def promote(self, sources: Sequence[Source], targets: Sequence[int]) -> None:
        """Copies each held non-device source into its target device block (``targets[i]``
        for the i-th non-device source): per tier, one batched copy, except for large blocks
        from disk or a peer on the CPU, copied into place one by one (half the bytes moved; for
        small blocks the per-call cost outweighs that)."""
        by_tier: dict[str, tuple[list, list[int]]] = {}
        for (tier, ref), target in zip([s for s in sources if s[0] != "device"], targets):
            refs, blocks = by_tier.setdefault(tier, ([], []))
            refs.append(ref)
            blocks.append(target)
        for tier, (refs, blocks) in by_tier.items():
            start = time.perf_counter()
            if tier == "host":
                self.host.onload(refs, self.kv_cache, blocks)
                self.host.release(refs)
            elif self.kv_cache.device.type == "cpu" and self.kv_cache.layout.bytes_per_block >= _PER_BLOCK_COPY_BYTES:
                kv = self.kv_cache.kv  # large CPU blocks: one copy each, straight into place
                for ref, block in zip(refs, blocks):
                    kv[:, :, block].copy_(ref[:, :, 0])
            else:  # one batched copy (on CUDA, one host-to-device transfer for them all)
                self.kv_cache.scatter(blocks, torch.cat(refs, dim=2))
            self.record_transfer("onload", tier, "device", len(refs), start)

    def place_on_device(self, records: Sequence[BlockRecord], blocks: torch.Tensor) -> None:
        """Copies blocks into free device blocks and publishes them as cached (unreferenced)."""
        device_blocks = self.allocate(len(records))
        self.kv_cache.scatter(device_blocks, blocks)
        for block, record in zip(device_blocks, records):
            self.pool.cache_block(block, record.key, record.parent, record.tokens, record.depth)
        self.pool.free(device_blocks)

    # -- moving blocks by hand ----------------------------------------------------------------

    def evict(self, keys: Sequence[BlockHash]) -> dict[str, int]:
        """Drops the keys from every tier (blocks in use or pinned on the device stay there)."""
        self.settle()
        evicted = {"device": len(self.pool.evict(keys)), "host": 0, "disk": 0}
        if self.host is not None:
            evicted["host"] = self.host.evict(keys)
        if self.disk is not None:
            evicted["disk"] = self.disk.evict(keys)
        return evicted

    def clear(self, tiers: Sequence[str]) -> dict[str, int]:
        """Drops every cached block of ``tiers``; returns how many each dropped."""
        self.settle()
        dropped = dict.fromkeys(STORED_TIERS, 0)
        if "device" in tiers:
            dropped["device"] = len(self.pool.clear())
        if "host" in tiers and self.host is not None:
            dropped["host"] = len(self.host.pool.clear())
        if "disk" in tiers and self.disk is not None:
            dropped["disk"] = self.disk.clear()
        return dropped

    def offload(self, keys: list[BlockHash], tier: str) -> int:
        """Moves the keys' free, unpinned blocks down to ``tier`` ("host" or "disk"), out of the
        tiers above it; returns how many of the keys that tier (or, for the host, the disk
        below it) now holds."""
        self.settle()
        moved = self.pool.evict(keys)
        if moved:
            self.demote(moved, "offload", tier)
        if tier == "disk" and self.host is not None:
            start = time.perf_counter()
            from_host = self.host.pool.evict(keys)
            if from_host:
                self.host.store_below(from_host)
                self.record_transfer("offload", "host", "disk", len(from_host), start)
        if tier == "disk":
            return self.count(keys)["disk"]
        self.settle()
        return sum(1 for k in keys if k in self.host.pool.cached or (self.disk is not None and self.disk.contains(k)))

    def prefetch(self, keys: list[BlockHash], tier: str) -> int:
        """Copies the keys' blocks up into ``tier`` ("device" or "host") from the tiers below, as
        many as it has room for; returns how many blocks were copied."""
        self.settle()
        start = time.perf_counter()
        room = self.pool.num_free_blocks if tier == "device" else self.host.pool.num_free_blocks
        records, blocks, sources = self._read_below(keys, tier, room)
        if not records:
            return 0
        if tier == "host":
            self.host.store(records, blocks)
            self.host.drain()
        else:
            self.place_on_device(records, blocks)
        self.record_transfer("prefetch", "+".join(sorted(sources)), tier, len(records), start)
        return len(records)

    def _read_below(self, keys: list[BlockHash], tier: str, limit: int):
        """Up to ``limit`` records and KV of the keys found below ``tier`` but not in it, in key
        order, and the tiers they came from."""
        here = self.pool.cached if tier == "device" else self.host.pool.cached
        records: list[BlockRecord] = []
        parts, sources = [], set()
        for key in keys:
            if len(records) == limit:
                break
            if key in here:
                continue
            found = self.read(key, skip_host=tier != "device")
            if found is not None:
                records.append(found[0])
                parts.append(found[1])
                sources.add(found[2])
        return records, (torch.cat(parts, dim=2) if parts else None), sources

    def read(self, key: BlockHash, skip_host: bool = False) -> tuple[BlockRecord, torch.Tensor, str] | None:
        """A copy of a block stored below the device (its record, ``[2, layers, 1, ...]`` KV and
        tier), checked like any hit; None if no tier holds it intact."""
        if not skip_host and self.host is not None and key in self.host.pool.cached:
            slot = self.host.pool.cached[key]
            return self.host.pool.record(slot), self.host.read([slot]), "host"
        found = self.disk.read_block(key) if self.disk is not None else None
        return None if found is None else (*found, "disk")

    def settle(self) -> None:
        """Waits for pending host copies and disk writes, so every tier shows what it holds."""
        if self.host is not None:
            self.host.drain()
        if self.disk is not None:
            self.disk.flush()

    # -- everything at once -------------------------------------------------------------------

    def cached_blocks(self, skip: Callable[[BlockHash], bool] = lambda key: False):
        """Yields (records, their KV) for the cached blocks of the device, then of the host."""
        tiers = [(self.pool, self.kv_cache)] + ([(self.host.pool, self.host)] if self.host is not None else [])
        for pool, storage in tiers:
            records = [r for r in (pool.record(b) for b in pool.cached.values()) if not skip(r.key)]
            if records:
                yield records, storage.gather([r.block for r in records])

    def spill_to_disk(self) -> None:
        """Queues every cached device and host block for the disk tier (keys it has are skipped),
        so that an engine started later on the same directory finds the whole cache."""
        if self.disk is None:
            return
        if self.host is not None:
            self.host.drain()
        for records, blocks in self.cached_blocks(skip=self.disk.contains):
            self.disk.store(records, blocks)

    def drain_events(self) -> list[KVEvent]:
        """Every tier's events since the last drain: device, then host, then disk."""
        events = self.pool.events.drain()
        if self.host is not None:
            events += self.host.pool.events.drain()
        if self.disk is not None:
            events += self.disk.drain_events()
        return events

    def inventory(self) -> dict[str, list[BlockHash]]:
        """Every key each tier holds now (host copies still in flight are not held yet)."""
        inventory = {"device": list(self.pool.cached)}
        if self.host is not None:
            inventory["host"] = list(self.host.pool.cached)
        if self.disk is not None:
            inventory["disk"] = self.disk.keys()
        return inventory

    # -- peers --------------------------------------------------------------------------------

    def export(self, keys: Sequence[BlockHash]) -> tuple[np.ndarray, int]:
        """The leading run of ``keys`` this worker holds, from any tier, as one block batch, and
        how many blocks it holds (it stops at the first key it holds nowhere: later blocks of a
        chain are of no use without it). An empty batch when it holds none. Device and host blocks
        are copied once, straight into the batch; a run held on the device alone, the common case,
        in one gather (``block_codec.encode``)."""
        self.begin_lookup()  # host copies that finished count as held
        records, blocks, tiers = [], [], set()
        start = time.perf_counter()
        host = self.host
        for key in keys:
            if key in self.pool.cached:
                block = self.pool.cached[key]
                records.append(self.pool.record(block))
                blocks.append(self.kv_cache.kv[:, :, block])
                tiers.add("device")
                continue
            if host is not None and key in host.pool.cached:
                slot = host.pool.cached[key]
                records.append(host.pool.record(slot))
                blocks.append(host.gather([slot])[:, :, 0] if host.compress else host.blocks[slot])
                tiers.add("host")
                continue
            found = self.read(key, skip_host=True)
            if found is None:
                break
            records.append(found[0])
            blocks.append(found[1][:, :, 0])
            tiers.add("disk")
        layout = self.kv_cache.layout
        if tiers == {"device"}:
            device_blocks = [record.block for record in records]
            batch = block_codec.encode(
                records, self.kv_cache.kv, self.fingerprint, layout, integrity_key=self.integrity_key, source_blocks=device_blocks, memory=self.export_memory
            )
        else:
            batch = block_codec.encode(records, blocks, self.fingerprint, layout, integrity_key=self.integrity_key, memory=self.export_memory)
        if records:
            self.record_transfer("export", "+".join(sorted(tiers)), "remote", len(records), start)
        return batch, len(records)

    def stage_remote(self, request_id: str, records: Sequence[BlockRecord], blocks: torch.Tensor) -> None:
        """Holds blocks pulled from a peer for ``request_id`` (see the module doc)."""
        staged = self.remote.setdefault(request_id, {})
        for i, record in enumerate(records):
            staged[record.key] = (record, blocks[:, :, i : i + 1])

    def drop_remote(self, request_id: str) -> None:
        self.remote.pop(request_id, None)

    # -- observers ----------------------------------------------------------------------------

    def record_transfer(self, kind: str, source: str, target: str, num_blocks: int, start: float) -> None:
        """Tells observers (a profiler) about a finished batched copy of blocks."""
        if self.transfer_observers:
            end = time.perf_counter()
            num_bytes = num_blocks * self.kv_cache.layout.bytes_per_block
            for observer in self.transfer_observers:
                observer(kind, source, target, num_blocks, num_bytes, start, end)
