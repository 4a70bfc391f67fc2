"""Recycled memory for blocks read from disk.

A prefix found on disk is read whole, held until its blocks are copied into the device pool, and
dropped; the next such prefix wants as much memory again. Memory the process has just freed may
have gone back to the system, and then every new page costs a fault: measured here, reading 64
blocks (96 MiB) into fresh memory took 24,000 faults and about as long again as the reads
themselves, in some processes and not others, as the allocator's thresholds happened to stand.

``ReadBuffers`` hands out byte arrays of one size and takes each back when the last array or
tensor that sees its memory is collected (a ``weakref`` finalizer on the array handed out, which
every view and ``torch.from_numpy`` tensor keeps alive). At most ``max_idle_bytes`` wait idle;
past that a dropped buffer is let go (its chunk is freed with the last buffer cut from it).
Memory in use is never handed out twice.

New buffers are cut from chunks of at least ``CHUNK_BYTES``: numpy asks the kernel for huge pages
for an array that large, and a huge page is one fault where small pages are 512. Touching 96 MiB
of fresh memory took 9 ms in huge pages and 30 ms in small ones, measured here.
"""

from __future__ import annotations

import threading
import weakref

import numpy as np

CHUNK_BYTES = 8 << 20


class ReadBuffers:
    def __init__(self, num_bytes: int, max_idle_bytes: int):
        for name, value, low in (("num_bytes", num_bytes, 1), ("max_idle_bytes", max_idle_bytes, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"ReadBuffers.{name} must be an int >= {low}, got {value!r}")
        self.num_bytes = num_bytes
        self.max_idle = max_idle_bytes // num_bytes
        self._idle: list[np.ndarray] = []
        self._uncut: list[np.ndarray] = []  # buffers of the last chunk not handed out yet
        self._lock = threading.Lock()

    @property
    def num_idle(self) -> int:
        return len(self._idle)

    @property
    def idle_bytes(self) -> int:
        return len(self._idle) * self.num_bytes

    def take(self) -> np.ndarray:
        """A writable uint8 array of ``num_bytes``, its contents undefined; its memory comes back
        here once it and everything over it are gone."""
        with self._lock:
            if not self._idle and not self._uncut:
                chunk = np.empty(max(CHUNK_BYTES // self.num_bytes, 1) * self.num_bytes, dtype=np.uint8)
                self._uncut = list(chunk.reshape(-1, self.num_bytes))
            memory = self._idle.pop() if self._idle else self._uncut.pop()
        handed_out = memory[:]  # a view: it dies with its last user, while `memory` lives on
        finalizer = weakref.finalize(handed_out, self._give_back, memory)
        finalizer.atexit = False
        return handed_out

    def _give_back(self, memory: np.ndarray) -> None:
        with self._lock:
            if len(self._idle) < self.max_idle:
                self._idle.append(memory)
