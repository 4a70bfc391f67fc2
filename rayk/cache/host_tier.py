"""The host tier: KV blocks in (pinned, on CUDA) host memory, below a device pool.

Its bookkeeping is a ``BlockPool`` of its own (tier "host", its own eviction policy). Its storage
is block-major, ``[slots, 2, layers, block_size, kv_heads, head_dim]``, so each slot is one
contiguous buffer: a block moves between the device's paged layout and a slot in one strided
copy of all its layers (one pass over the bytes, no gather buffer), and on CUDA one DMA per block.
With ``compress`` slots hold int8 with per-head scales (``rayk.cache.quantization``) and blocks
come out dequantized.

A slot is referenced while a copy reads or writes it, so the pool never hands it out, nor evicts
it, mid-copy; victims evicted to make room go to the tier below (disk) first. With an
asynchronous ``CopyEngine`` (a CUDA stream), ``demote`` snapshots the device blocks (a gather on
the device, cheap there) so they may be overwritten at once, returns before the copy is done, and
keeps the target slots referenced and unpublished (lookups miss them) until ``poll`` sees the
copy finished, in order.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from rayk.cache.block_pool import BlockPool, BlockRecord
from rayk.cache.paged_kv import KVLayout, PagedKVCache
from rayk.cache.policies import EvictionPolicy
from rayk.cache.quantization import compressed_block_bytes, dequantize_int8, quantize_int8
from rayk.cache.transfer import CopyEngine, Ticket
from rayk.hashing import BlockHash

# [2, layers, n, ...] (paged order) <-> [n, 2, layers, ...] (block-major order)
_TO_BLOCK_MAJOR = (2, 0, 1, 3, 4, 5)
_TO_PAGED = (1, 2, 0, 3, 4, 5)


@dataclass
class _PendingCopy:
    ticket: Ticket
    slots: list[int]
    records: list[BlockRecord]
    finish: Callable[[], None] | None  # host-side work once the copy is done
    source: torch.Tensor  # kept alive until the copy has read it


class HostTier:
    name = "host"

    def __init__(
        self, layout: KVLayout, num_blocks: int, policy: EvictionPolicy, lower=None, compress: bool = False, copy_engine: CopyEngine | None = None
    ):
        self.layout = layout
        self.compress = compress
        self.copy_engine = copy_engine or CopyEngine(torch.device("cpu"))
        # Pinned memory only helps, and only exists, for copies to and from a CUDA device.
        pinned = self.copy_engine.device.type == "cuda"
        shape = (num_blocks, 2, layout.num_layers, layout.block_size, layout.num_kv_heads, layout.head_dim)
        self.blocks = torch.zeros(shape, dtype=torch.int8 if compress else layout.dtype, pin_memory=pinned)
        if compress:
            self.scales = torch.zeros((num_blocks, 2, layout.num_layers, layout.num_kv_heads), dtype=torch.float32, pin_memory=pinned)
        self.pool = BlockPool(num_blocks, layout.block_size, tier=self.name, policy=policy, bytes_per_block=self.block_bytes(layout, compress))
        self.lower = lower
        self._pending: deque[_PendingCopy] = deque()
        self._pending_keys: set[BlockHash] = set()
        self.num_stored = 0
        self.num_loaded = 0

    @staticmethod
    def block_bytes(layout: KVLayout, compress: bool) -> int:
        """Bytes one block takes in this tier (int8 values and their scales when compressed)."""
        if compress:
            return compressed_block_bytes(layout.num_layers, layout.block_size, layout.num_kv_heads, layout.head_dim)
        return layout.bytes_per_block

    def lookup(self, key: BlockHash, parent: BlockHash, tokens: bytes) -> int | None:
        return self.pool.lookup(key, parent, tokens)

    # -- into the tier ------------------------------------------------------------------------

    def store(self, records: Sequence[BlockRecord], blocks: torch.Tensor) -> None:
        """Keeps copies of ``blocks`` (``[2, layers, n, ...]``, ``records[i]`` describing block i,
        a tensor the caller will not change). Keys already here are skipped; what does not fit
        goes to the tier below."""
        placed = self._place(records, lambda idx: blocks[:, :, idx])
        if placed is not None:
            slots, kept, idx = placed
            self._copy_in(slots, kept, blocks[:, :, idx])

    def demote(self, records: Sequence[BlockRecord], kv_cache: PagedKVCache) -> None:
        """Keeps copies of the device blocks ``records[i].block`` of ``kv_cache``."""
        ids = [r.block for r in records]
        placed = self._place(records, lambda idx: kv_cache.gather([ids[i] for i in idx]))
        if placed is None:
            return
        slots, kept, idx = placed
        device_ids = [ids[i] for i in idx]
        if self.copy_engine.asynchronous or self.compress:
            self._copy_in(slots, kept, kv_cache.gather(device_ids))
            return
        for slot, block in zip(slots, device_ids):
            self.blocks[slot].copy_(kv_cache.kv[:, :, block])
        self._publish(slots, kept)

    def _place(self, records: Sequence[BlockRecord], data_for: Callable[[list[int]], torch.Tensor]):
        """Allocates slots for the records not here yet, sending overflow and the victims evicted
        for room to the tier below; returns (slots, their records, their indices) or None."""
        self.poll()
        fresh = [i for i, r in enumerate(records) if r.key not in self.pool.cached and r.key not in self._pending_keys]
        kept = fresh[: self.pool.num_free_blocks]
        overflow = fresh[len(kept) :]
        if overflow and self.lower is not None:
            self.lower.store([records[i] for i in overflow], data_for(overflow))
        if not kept:
            return None
        evicted: list[BlockRecord] = []
        slots = self.pool.allocate(len(kept), evicted)
        if evicted and self.lower is not None:
            self.store_below(evicted)
        return slots, [records[i] for i in kept], kept

    def _copy_in(self, slots: list[int], records: list[BlockRecord], data: torch.Tensor) -> None:
        if not self.copy_engine.asynchronous:
            self._write(slots, data)
            self._publish(slots, records)
            return
        if data.is_cuda and not self.compress:
            # One contiguous block per slot: one DMA each, straight into pinned memory.
            ordered = data.permute(_TO_BLOCK_MAJOR).contiguous()

            def copy():
                for i, slot in enumerate(slots):
                    self.blocks[slot].copy_(ordered[i], non_blocking=True)

            pending = _PendingCopy(self.copy_engine.submit(copy), slots, records, None, ordered)
        elif data.is_cuda:
            staging = torch.empty(data.shape, dtype=data.dtype, pin_memory=True)
            ticket = self.copy_engine.submit(lambda: staging.copy_(data, non_blocking=True))
            pending = _PendingCopy(ticket, slots, records, lambda: self._write(slots, staging), data)
        else:
            pending = _PendingCopy(self.copy_engine.submit(lambda: self._write(slots, data)), slots, records, None, data)
        self._pending.append(pending)
        self._pending_keys.update(r.key for r in records)

    def _write(self, slots: list[int], data: torch.Tensor) -> None:
        """Writes ``[2, layers, n, ...]`` host-side data into the slots, one pass."""
        if self.compress:
            q, scales = quantize_int8(data.cpu())
            index = torch.as_tensor(slots, dtype=torch.long)
            self.blocks.index_copy_(0, index, q.permute(_TO_BLOCK_MAJOR))
            self.scales.index_copy_(0, index, scales.permute(2, 0, 1, 3))
            return
        for i, slot in enumerate(slots):
            self.blocks[slot].copy_(data[:, :, i])

    # -- pending copies -----------------------------------------------------------------------

    def poll(self) -> None:
        """Publishes the copies that have finished, oldest first."""
        while self._pending and self._pending[0].ticket.done():
            self._finish(self._pending.popleft())

    def drain(self) -> None:
        """Waits for every pending copy and publishes it."""
        while self._pending:
            pending = self._pending.popleft()
            pending.ticket.wait()
            self._finish(pending)

    @property
    def pending_slots(self) -> list[int]:
        return [slot for p in self._pending for slot in p.slots]

    def _finish(self, pending: _PendingCopy) -> None:
        pending.ticket.wait()  # done already; raises if the copy failed, so nothing wrong is published
        if pending.finish is not None:
            pending.finish()
        self._pending_keys.difference_update(r.key for r in pending.records)
        self._publish(pending.slots, pending.records)

    def _publish(self, slots: list[int], records: list[BlockRecord]) -> None:
        for slot, r in zip(slots, records):
            self.pool.cache_block(slot, r.key, r.parent, r.tokens, r.depth)
        self.pool.free(slots)
        self.num_stored += len(slots)

    # -- out of the tier ----------------------------------------------------------------------

    def reserve(self, count: int) -> list[int]:
        """Takes ``count`` free slots out of use (a budget); what they held goes to the tier below."""
        evicted: list[BlockRecord] = []
        slots = self.pool.allocate(count, evicted)
        if evicted and self.lower is not None:
            self.store_below(evicted)
        return slots

    def hold(self, slots: Sequence[int]) -> None:
        """Protects slots a prefix hit will read from eviction until ``release``."""
        self.pool.touch(slots)

    def release(self, slots: Sequence[int]) -> None:
        self.pool.free(slots)

    def onload(self, slots: Sequence[int], kv_cache: PagedKVCache, device_blocks: Sequence[int]) -> None:
        """Copies held slots into device blocks, one pass (a DMA per block on CUDA); the copy is
        complete when this returns, so the slots may be released."""
        self.num_loaded += len(slots)
        if self.compress:
            kv_cache.scatter(device_blocks, self.gather(slots))
            return
        if kv_cache.device.type == "cuda":
            staging = torch.empty((len(slots),) + self.blocks.shape[1:], dtype=self.blocks.dtype, device=kv_cache.device)
            for i, slot in enumerate(slots):
                staging[i].copy_(self.blocks[slot], non_blocking=True)
            kv_cache.scatter(device_blocks, staging.permute(_TO_PAGED))
            torch.cuda.current_stream(kv_cache.device).synchronize()
            return
        for slot, block in zip(slots, device_blocks):
            kv_cache.kv[:, :, block].copy_(self.blocks[slot])

    def read(self, slots: Sequence[int]) -> torch.Tensor:
        """The blocks in the model's dtype, counted as loaded (a hit being served)."""
        self.num_loaded += len(slots)
        return self.gather(slots)

    def store_below(self, records: list[BlockRecord]) -> None:
        """Hands the slots' blocks (``records[i].block``) to the tier below (a ``DiskTier``),
        gathered into memory that tier recycles."""
        slots = [record.block for record in records]
        self.lower.store(records, self.gather(slots, out=None if self.compress else self.lower.write_buffer(len(slots))))

    def gather(self, slots: Sequence[int], out: torch.Tensor | None = None) -> torch.Tensor:
        """A ``[2, layers, n, ...]`` tensor of the slots' blocks in the model's dtype: ``out``
        (a block-major view, as ``DiskTier.write_buffer`` gives; uncompressed tiers only) filled,
        or a new one."""
        index = torch.as_tensor(slots, dtype=torch.long)
        if out is not None:
            assert not self.compress, "a compressed tier's blocks are dequantized into new memory"
            torch.index_select(self.blocks, 0, index, out=out.permute(_TO_BLOCK_MAJOR))
            return out
        blocks = self.blocks.index_select(0, index).permute(_TO_PAGED)
        if not self.compress:
            return blocks
        return dequantize_int8(blocks, self.scales.index_select(0, index).permute(1, 2, 0, 3), self.layout.dtype)

    def evict(self, keys) -> int:
        return len(self.pool.evict(keys))
