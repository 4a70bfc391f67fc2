"""Recycled memory for the large buffers a cache fills and hands away: blocks read from disk,
blocks gathered to be written to disk, and the block batches exported to peers.

A prefix found on disk is read whole, held until its blocks are copied into the device pool, and
dropped; blocks demoted to disk are gathered and held until their segment is written; a batch
exported to a peer lives until Ray has copied it into the object store. The next read, write or
export wants as much memory again. Fresh memory costs a fault per page, and more: in a
Ray worker, a fresh 94 MB buffer for an export took 70 to 120 ms of CPU to fill, where filling
one used before took 15 (the kernel assembling huge pages for it, measured here). Reading 64
blocks into fresh memory took 24,000 faults, as long again as the reads, in some processes and
not others, as the allocator's thresholds happened to stand.

``RecycledMemory`` hands out byte arrays and takes each back when the last array or tensor that
sees it is collected (a ``weakref`` finalizer on the array handed out, which every view, every
``torch.from_numpy`` tensor and Ray's serializer keep alive while they use it). ``take(n)``
reuses the smallest idle buffer of at least ``n`` bytes. At most ``max_idle_bytes`` wait idle;
past that a dropped buffer is let go. Memory in use is never handed out twice.
"""

from __future__ import annotations

import threading
import weakref

import numpy as np


class RecycledMemory:
    def __init__(self, max_idle_bytes: int):
        if isinstance(max_idle_bytes, bool) or not isinstance(max_idle_bytes, int) or max_idle_bytes < 0:
            raise ValueError(f"RecycledMemory.max_idle_bytes must be an int >= 0, got {max_idle_bytes!r}")
        self.max_idle_bytes = max_idle_bytes
        self._idle: list[np.ndarray] = []
        self._lock = threading.RLock()  # a collection inside take() may give a buffer back on this thread

    @property
    def num_idle(self) -> int:
        return len(self._idle)

    @property
    def idle_bytes(self) -> int:
        return sum(memory.nbytes for memory in self._idle)

    def take(self, num_bytes: int) -> np.ndarray:
        """A writable uint8 array of ``num_bytes``, its contents undefined; its memory comes back
        here once it and everything over it are gone."""
        if isinstance(num_bytes, bool) or not isinstance(num_bytes, int) or num_bytes < 1:
            raise ValueError(f"RecycledMemory.take needs a number of bytes >= 1, got {num_bytes!r}")
        memory = None
        with self._lock:
            fits = [i for i, idle in enumerate(self._idle) if idle.nbytes >= num_bytes]
            if fits:
                memory = self._idle.pop(min(fits, key=lambda i: self._idle[i].nbytes))
        if memory is None:
            memory = np.empty(num_bytes, dtype=np.uint8)
        handed_out = memory[:num_bytes]  # a view: it dies with its last user, while `memory` lives on
        finalizer = weakref.finalize(handed_out, self._give_back, memory)
        finalizer.atexit = False
        return handed_out

    def _give_back(self, memory: np.ndarray) -> None:
        with self._lock:
            if self.idle_bytes + memory.nbytes <= self.max_idle_bytes:
                self._idle.append(memory)
