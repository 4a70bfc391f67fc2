"""The host tier: KV blocks in (pinned, on CUDA) host memory, below a device pool.

Its bookkeeping is a ``BlockPool`` of its own (tier "host", its own eviction policy) and its
storage a CPU ``PagedKVCache`` of the same layout, so moving blocks either way is one gather and
one scatter of many blocks. With ``compress`` it stores blocks as int8 with per-head scales
(``rayk.cache.quantization``) and hands them out dequantized. A host block is referenced while a copy reads or writes it, so the
pool never hands it out, nor evicts it, mid-copy; when the tier needs room, its victims are
passed to the tier below (disk) before they are overwritten.

With a ``CopyEngine``, ``store`` returns before the copy is done: the target slots stay
referenced and unpublished (lookups miss them) until ``poll`` sees the copy finished, in order.
The source tensor is the caller's own gathered copy, so the device blocks it came from may be
overwritten at once.
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


@dataclass
class _PendingCopy:
    ticket: Ticket
    slots: list[int]
    records: list[BlockRecord]
    finish: Callable[[], None] | None  # host-side work once the copy is done (CUDA: unstage)
    source: torch.Tensor  # kept alive until the copy has read it


class HostTier:
    name = "host"

    def __init__(
        self, layout: KVLayout, num_blocks: int, policy: EvictionPolicy, lower=None, compress: bool = False, copy_engine: CopyEngine | None = None
    ):
        self.layout = layout
        self.compress = compress
        self.copy_engine = copy_engine
        self._pending: deque[_PendingCopy] = deque()
        self._pending_keys: set[BlockHash] = set()
        pinned = torch.cuda.is_available()
        if compress:
            stored = KVLayout(layout.num_layers, layout.block_size, layout.num_kv_heads, layout.head_dim, torch.int8)
            self.kv = PagedKVCache(stored, num_blocks, "cpu", pin_memory=pinned)
            self.scales = torch.zeros((2, layout.num_layers, num_blocks, layout.num_kv_heads), dtype=torch.float32, pin_memory=pinned)
            bytes_per_block = compressed_block_bytes(layout.num_layers, layout.block_size, layout.num_kv_heads, layout.head_dim)
        else:
            self.kv = PagedKVCache(layout, num_blocks, "cpu", pin_memory=pinned)
            bytes_per_block = layout.bytes_per_block
        self.pool = BlockPool(num_blocks, layout.block_size, tier=self.name, policy=policy, bytes_per_block=bytes_per_block)
        self.lower = lower
        self.num_stored = 0
        self.num_loaded = 0

    def lookup(self, key: BlockHash, parent: BlockHash, tokens: bytes) -> int | None:
        return self.pool.lookup(key, parent, tokens)

    def store(self, records: Sequence[BlockRecord], blocks: torch.Tensor) -> None:
        """Keeps copies of ``blocks`` (``[2, layers, n, ...]``, ``records[i]`` describing block i).

        Keys already here are skipped. What does not fit goes to the tier below, as do the
        victims evicted to make room.
        """
        self.poll()
        fresh = [i for i, r in enumerate(records) if r.key not in self.pool.cached and r.key not in self._pending_keys]
        kept = fresh[: self.pool.num_free_blocks]
        overflow = fresh[len(kept) :]
        if overflow and self.lower is not None:
            self.lower.store([records[i] for i in overflow], blocks[:, :, overflow])
        if not kept:
            return
        evicted: list[BlockRecord] = []
        slots = self.pool.allocate(len(kept), evicted)
        if evicted and self.lower is not None:
            self.lower.store(evicted, self.gather([r.block for r in evicted]))
        data, kept_records = blocks[:, :, kept], [records[i] for i in kept]
        if self.copy_engine is None:
            self._write(slots, data)
            self._publish(slots, kept_records)
            return
        if data.is_cuda:
            staging = torch.empty(data.shape, dtype=data.dtype, pin_memory=True)
            ticket = self.copy_engine.submit(lambda: staging.copy_(data, non_blocking=True))
            pending = _PendingCopy(ticket, slots, kept_records, lambda: self._write(slots, staging), data)
        else:
            pending = _PendingCopy(self.copy_engine.submit(lambda: self._write(slots, data)), slots, kept_records, None, data)
        self._pending.append(pending)
        self._pending_keys.update(r.key for r in kept_records)

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
        if pending.finish is not None:
            pending.finish()
        self._pending_keys.difference_update(r.key for r in pending.records)
        self._publish(pending.slots, pending.records)

    def _publish(self, slots: list[int], records: list[BlockRecord]) -> None:
        for slot, r in zip(slots, records):
            self.pool.cache_block(slot, r.key, r.parent, r.tokens, r.depth)
        self.pool.free(slots)
        self.num_stored += len(slots)

    def hold(self, slots: Sequence[int]) -> None:
        """Protects slots a prefix hit will read from eviction until ``release``."""
        self.pool.touch(slots)

    def release(self, slots: Sequence[int]) -> None:
        self.pool.free(slots)

    def read(self, slots: Sequence[int]) -> torch.Tensor:
        """The blocks in the model's dtype, counted as loaded (a hit being served)."""
        self.num_loaded += len(slots)
        return self.gather(slots)

    def gather(self, slots: Sequence[int]) -> torch.Tensor:
        """The blocks in the model's dtype (``[2, layers, n, ...]``)."""
        if not self.compress:
            return self.kv.gather(slots)
        index = torch.as_tensor(slots, dtype=torch.long)
        return dequantize_int8(self.kv.gather(slots), self.scales.index_select(2, index), self.layout.dtype)

    def _write(self, slots: list[int], blocks: torch.Tensor) -> None:
        if not self.compress:
            self.kv.scatter(slots, blocks)
            return
        q, scales = quantize_int8(blocks.cpu())
        self.kv.scatter(slots, q)
        self.scales.index_copy_(2, torch.as_tensor(slots, dtype=torch.long), scales)

    def evict(self, keys) -> int:
        evicted = self.pool.evict(keys)
        return len(evicted)
