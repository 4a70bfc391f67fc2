"""The disk tier: KV blocks in segment files that outlive the process.

Each ``store`` call writes its blocks as *segments* (at most ``SEGMENT_BYTES`` and a quarter of
the budget each): a file in the tier's own subdirectory of ``directory``, ``segment_dir``
(``rayk-kv-<16 hex>``, named by the model's fingerprint and KV layout), holding one
block batch (``rayk.cache.block_codec``: a msgpack header with every block's key, parent key,
depth, token ids and checksum, the model fingerprint and layout, then the blocks' payloads back
to back). Writing many blocks per file is one sequential write instead of a file per block.
Nothing is ever unpickled. With ``compress`` new segments hold int8 blocks with per-head scales;
segments of either kind are read, so switching it loses nothing.

On start the tier rebuilds its index (key → segment and byte range) from the headers, so a new
engine on the same directory gets hits at once. A segment whose header is refused by the codec
(another model or layout, a damaged or cut-short file) is deleted and counted in
``num_rejected``. A block's checksum is verified each time it is read; a block that fails it
reads as a miss (its tokens are recomputed, never served wrong) and its whole segment, now
suspect, is deleted and counted too. Blocks are read into recycled memory
(``rayk.cache.recycled_memory``), and checked while their bytes are still in the CPU's cache;
callers gather the blocks they store into recycled memory too (``write_buffer``).

Files are written by a background thread (off the request's critical path) to a temporary file
created exclusively under an unpredictable name, never following a link, and renamed into place,
so a crash never leaves a half-written segment under a segment's name. Blocks join the index
once their segment is complete; a write that fails (disk full, directory gone) is logged,
counted in ``num_write_errors`` (``num_no_space`` for a full disk) and dropped, and the writer
goes on.

Faults are bounded in time. A write still running after ``write_timeout_s`` (10 s by default) is
*hung*: it is counted once in ``num_hung_writes``, ``flush`` stops waiting for it (so a memory
control or a shutdown never blocks on the disk for longer than that), and ``store`` drops new
blocks (counted in ``num_dropped_blocks``) instead of queueing them behind it. Whatever a hung
write finally lands after a ``clear`` is deleted, not indexed. ``health()`` reports ``degraded``
from the first fault — a failed or hung write, a damaged segment found at start or on a read —
until a write succeeds again (a hung write must have ended first): the disk takes blocks again,
and what it lost was only ever cache, recomputed on a miss.

Space. ``num_bytes`` counts the segment files on disk and stays within ``max_bytes``. To make
room the tier's eviction policy picks a victim block and its whole segment goes (blocks stored
together were demoted together, so they are of an age); an explicit ``evict`` of some keys
forgets just those, and a segment's file is deleted with its last live block. The index, the
byte count and the event buffer are shared with the writer and guarded by one lock.

``read_only`` opens a directory (a snapshot) without writing or deleting anything in it: files
that do not belong are counted in ``num_foreign`` and left alone, and so is the subdirectory of
another model or layout found where this one's is missing.

Hostile directories. Others may write to the directory, so the tier never trusts what it finds:

* it touches nothing at the top of ``directory`` (a user's ``notes.tmp`` or ``backup.kvb`` there
  is not rayk's), only ``segment_dir``: created with mode 0700, then opened without following a
  link and held open, so every file is created, renamed, read and deleted relative to that
  descriptor and a link or rename swapped in later leads nowhere else. A ``segment_dir`` that
  is a link, not a directory, another user's, or writable by others is not rayk's: the tier
  holds nothing and drops what it is given, ``degraded`` saying why, until someone removes it
  (a read-only tier only needs it to be a directory, not a link: a snapshot may be another's);

* it opens only regular files, and checks that after opening (``O_NONBLOCK | O_NOFOLLOW``, then
  ``fstat``), so a FIFO, device, directory or link under a segment's name (even one swapped in
  during a run) is a miss, never a hang or a read elsewhere;
* an odd entry named like a segment or a temporary file (a link, a directory, a FIFO, a file
  that vanishes while it is read, a file that is not a block batch at all) is skipped, counted
  in ``num_skipped`` and left alone, never fatal;
* in ``segment_dir``, which only its user can write to, a regular ``*.kvb`` file that is not a
  segment of this model is deleted, as said above; of temporary files it deletes only what it
  wrote: a stale file named as rayk names them (``.<24 hex>.tmp``) that starts with rayk's magic;
* a block whose KV holds a non-finite value is refused like one that fails its checksum;
* given the model's ``hasher``, a segment in which any block's key is not the one its parent key
  and token ids hash to is refused whole (deleted, or in a read-only directory counted in
  ``num_foreign``): a planted file cannot file KV under another prefix's key;
* given an ``integrity_key``, segments are sealed with it (``block_codec``), and a segment not
  sealed under it is refused like one of another model: only a holder of the key can write KV
  that this tier serves, which checksums alone cannot promise (a forger recomputes them).
"""

from __future__ import annotations

import errno
import logging
import msgpack
import os
import queue
import re
import secrets
import stat
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import xxhash

from rayk.cache import block_codec
from rayk.cache.block_codec import BlockBatchError
from rayk.cache.block_pool import BlockRecord
from rayk.cache.events import EventBuffer
from rayk.cache.paged_kv import KVLayout
from rayk.cache.policies import BlockInfo, EvictionPolicy
from rayk.cache.recycled_memory import RecycledMemory
from rayk.hashing import BlockHash, BlockHasher

SUFFIX = ".kvb"
SEGMENT_DIR_PREFIX = "rayk-kv-"
SEGMENT_BYTES = 64 << 20
"""A store() of more blocks than this holds is written as several segments."""
WRITE_TIMEOUT_S = 10.0
"""A segment write running longer than this is hung (see the module doc)."""
READ_MEMORY_BYTES = 128 << 20
"""The memory of blocks read and then dropped that waits, at most, to be read into again."""
WRITE_MEMORY_BYTES = 128 << 20
"""The memory of blocks written that waits, at most, to be gathered into again (``write_buffer``)."""
_STALE_TEMPORARY_S = 3600.0  # a temporary file this old was left by a crash, not a live writer
_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_TEMPORARY_NAME = re.compile(r"\.[0-9a-f]{24}\.tmp")
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_MAX_WRITE_BUFFERS = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024)
_DIRECTORY_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)

logger = logging.getLogger(__name__)


def segment_dir_name(fingerprint: bytes, layout: KVLayout) -> str:
    """The name of the subdirectory that holds the segments of this model and KV layout."""
    identity = msgpack.packb([fingerprint, sorted(layout.to_metadata().items())], use_bin_type=True)
    return SEGMENT_DIR_PREFIX + xxhash.xxh3_64_hexdigest(identity)


def open_regular(path: str | os.PathLike, dir_fd: int | None = None):
    """``path`` (relative to the directory ``dir_fd`` when given) opened for binary reading, if it
    is a regular file; OSError otherwise (see ``regular_descriptor``)."""
    return os.fdopen(regular_descriptor(path, dir_fd), "rb")


def regular_descriptor(path: str | os.PathLike, dir_fd: int | None = None) -> int:
    """A descriptor of ``path`` (relative to the directory ``dir_fd`` when given) open for
    reading, if it is a regular file; OSError otherwise.

    The check is on the open descriptor (``fstat``), so nothing swapped in between a check and the
    open slips through; ``O_NONBLOCK`` makes opening a FIFO return at once instead of waiting for
    a writer, and ``O_NOFOLLOW`` refuses a link."""
    descriptor = os.open(path, _READ_FLAGS, dir_fd=dir_fd)
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        return descriptor
    except BaseException:
        os.close(descriptor)
        raise


class _SegmentDirRefused(OSError):
    """``segment_dir`` is not rayk's (a link, not a directory, another user's, writable by
    others) or could not be made; the message names it and why."""

    def __init__(self, segment_dir: Path, why: str):
        super().__init__(f"the segment directory {str(segment_dir)!r} {why}")


def _write_all(descriptor: int, views: list[memoryview], offset: int) -> None:
    """Writes every byte of ``views``, in order, from byte ``offset`` of the file, with as few
    ``pwritev`` calls as the system's limit on buffers per call allows (a short write goes on
    from where it stopped)."""
    at = 0
    while at < len(views):
        batch = views[at : at + _MAX_WRITE_BUFFERS]
        written = os.pwritev(descriptor, batch, offset)
        offset += written
        for view in batch:
            if written < view.nbytes:
                views[at] = view[written:]
                break
            written -= view.nbytes
            at += 1


class _DaemonCall:
    """``fn(*args)`` on a daemon thread of its own: a write hung in the kernel (a dead network
    disk) must not keep the interpreter from exiting, as a pool's worker thread would.
    ``result()`` waits for it and raises what it raised."""

    def __init__(self, fn, *args):
        self._error: BaseException | None = None

        def run() -> None:
            try:
                fn(*args)
            except BaseException as error:
                self._error = error

        self._thread = threading.Thread(target=run, name="rayk-disk-payload", daemon=True)
        self._thread.start()

    def result(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error


@dataclass(eq=False)
class _Segment:
    name: str  # in segment_dir
    num_bytes: int
    compression: str | None
    live: set = field(default_factory=set)  # keys of the index that point into it


@dataclass(frozen=True)
class _Entry:
    segment: _Segment
    parent: BlockHash
    depth: int
    tokens: bytes
    start: int
    end: int
    checksum: int


class DiskTier:
    name = "disk"

    def __init__(
        self,
        directory: str | os.PathLike,
        layout: KVLayout,
        fingerprint: bytes,
        max_bytes: int,
        policy: EvictionPolicy,
        compress: bool = False,
        read_only: bool = False,
        write_timeout_s: float = WRITE_TIMEOUT_S,
        hasher: BlockHasher | None = None,
        integrity_key: bytes | None = None,
    ):
        if isinstance(write_timeout_s, bool) or not isinstance(write_timeout_s, (int, float)) or not write_timeout_s > 0:
            raise ValueError(f"DiskTier.write_timeout_s must be a number of seconds > 0, got {write_timeout_s!r}")
        self.directory = Path(directory)
        self.segment_dir = self.directory / segment_dir_name(fingerprint, layout)
        self.write_timeout_s = float(write_timeout_s)
        self.read_only = read_only
        self.hasher = hasher
        self.integrity_key = integrity_key
        self.layout = layout
        self.compression = "int8" if compress else None
        self.fingerprint = fingerprint
        self.max_bytes = max_bytes
        self.policy = policy
        self.events = EventBuffer(self.name)
        self._index: dict[BlockHash, _Entry] = {}
        self.read_memory = RecycledMemory(READ_MEMORY_BYTES)  # what uncompressed blocks are read into
        self.write_memory = RecycledMemory(WRITE_MEMORY_BYTES)  # what blocks to store are gathered into
        self._lock = threading.Lock()
        self.num_bytes = 0
        self.num_rejected = 0
        self.num_foreign = 0
        self.num_skipped = 0
        self._write_failing = False  # the last write failed: the next failure is not logged in full
        self.num_stored = 0
        self.num_loaded = 0
        self.num_evictions = 0
        self.num_write_errors = 0
        self.num_no_space = 0
        self.num_hung_writes = 0
        self.num_dropped_blocks = 0
        self.num_segments = 0
        self._fault: str | None = None  # the last fault since the last successful write
        # The writer's progress: segments queued or being written, and since when (monotonic
        # seconds) the current one is; guarded by _progress.
        self._progress = threading.Condition()
        self._pending = 0
        self._write_started: float | None = None
        self._hung_counted = False  # the current write has been counted as hung
        self._generation = 0  # bumped by clear(): a write queued before it is not indexed
        # segment_dir, held open; None when absent or not rayk's. The descriptors of earlier
        # segment_dirs, removed under a running tier, stay open until close(): a reader may hold one.
        self._dir_fd: int | None = None
        self._removed_dir_fds: list[int] = []
        try:
            self._dir_fd = self._open_segment_dir()
        except _SegmentDirRefused as error:
            self._fault = f"{error}: the disk tier holds nothing until it is removed"
            logger.error("rayk disk tier: %s", self._fault)
        self._rebuild_index()
        if self.num_rejected:
            self._fault = f"{self.num_rejected} damaged segment(s) deleted at start"
        self._queue: queue.Queue = queue.Queue()
        self._closed = read_only
        self._writer = None
        if self._dir_fd is not None and not read_only:
            self._writer = threading.Thread(target=self._write_loop, name="rayk-disk-writer", daemon=True)
            self._writer.start()

    # -- reads --------------------------------------------------------------------------------

    def contains(self, key: BlockHash) -> bool:
        return key in self._index

    def keys(self) -> list[BlockHash]:
        with self._lock:
            return list(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def drain_events(self) -> list:
        with self._lock:
            return self.events.drain()

    def record(self, key: BlockHash) -> BlockRecord | None:
        """What the tier holds under ``key`` (``block`` is -1: a disk block has no slot)."""
        entry = self._index.get(key)
        return None if entry is None else BlockRecord(-1, key, entry.parent, entry.depth, entry.tokens)

    def read_block(self, key: BlockHash) -> tuple[BlockRecord, torch.Tensor] | None:
        """What the tier holds under ``key`` and its KV, checked; None if absent or corrupt."""
        record = self.record(key)
        payload = self.read(key, record.parent, record.tokens) if record is not None else None
        return None if payload is None else (record, payload)

    def read(self, key: BlockHash, parent: BlockHash, tokens: bytes) -> torch.Tensor | None:
        """The block's ``[2, layers, 1, ...]`` KV, or None if absent, not this block, or corrupt."""
        with self._lock:
            entry = self._index.get(key)
        if entry is None or self._dir_fd is None:  # absent, or the tier is closed
            return None
        if entry.parent != parent or entry.tokens != tokens:  # the header lies, or keys collided
            self._reject(key, entry, "a segment holds a block under another block's key")
            return None
        blocks, payload, num_read = self._load(entry)
        if num_read != len(payload) or not block_codec.verified(payload, entry.checksum):
            self._reject(key, entry, "a block failed its checksum (flipped or cut short)")
            return None
        if blocks is None:
            blocks = block_codec.decode_payloads([payload], entry.segment.compression, self.layout)
        if not block_codec.finite_blocks(blocks).all():  # a planted block with a recomputed checksum
            self._reject(key, entry, "a block holds non-finite values")
            return None
        with self._lock:
            self.policy.on_access(BlockInfo(key, entry.depth, entry.end - entry.start))
        self.num_loaded += 1
        return blocks

    def _load(self, entry: _Entry) -> tuple[torch.Tensor | None, np.ndarray, int]:
        """A block's payload as read from its segment, unchecked: the block it was read into when
        uncompressed (else None), the bytes, and how many were read (-1: the read failed)."""
        blocks = None
        if entry.segment.compression is None and entry.end - entry.start == self.layout.bytes_per_block:
            payload = self.read_memory.take(self.layout.bytes_per_block)
            blocks = block_codec.blocks_view(payload, self.layout)  # read into the block itself
        else:
            payload = np.empty(entry.end - entry.start, dtype=np.uint8)  # read into once: no bytes object
        try:
            descriptor = regular_descriptor(entry.segment.name, self._directory_fd())
        except OSError:
            return blocks, payload, -1
        try:  # one system call, where a file object would seek and stat as well
            num_read = os.preadv(descriptor, [payload], entry.start)
        except OSError:
            num_read = -1
        finally:
            os.close(descriptor)
        return blocks, payload, num_read

    # -- writes -------------------------------------------------------------------------------

    def write_buffer(self, num_blocks: int) -> torch.Tensor:
        """Unfilled memory for ``num_blocks`` uncompressed blocks, ``[2, layers, num_blocks,
        ...]``, that this tier recycles: the caller gathers the blocks it will ``store`` into it,
        and the memory comes back once their segment is written and nothing else holds it. A
        gather of 96 MiB into fresh memory took three times as long (page faults, measured)."""
        return block_codec.blocks_view(self.write_memory.take(num_blocks * self.layout.bytes_per_block), self.layout)

    def store(self, records: Sequence[BlockRecord], blocks: torch.Tensor) -> None:
        """Queues ``blocks`` (``[2, layers, n, ...]``) to be written as one segment; returns at once.

        The tier takes ownership of ``blocks``: every caller passes a tensor it has just gathered
        and will not touch again, so nothing is copied here, on the caller's path.
        """
        if self._closed:
            raise RuntimeError(f"disk tier {str(self.directory)!r} is closed{' (read-only)' if self.read_only else ''}")
        fresh = [i for i, record in enumerate(records) if record.key not in self._index]
        if not fresh:
            return
        if self._writer is None or self._hung():  # no directory to write to, or queued behind a write that may never end
            self.num_dropped_blocks += len(fresh)
            return
        data = blocks.cpu()
        if len(fresh) < len(records):
            data, records = data[:, :, fresh], [records[i] for i in fresh]
        per_segment = self.blocks_per_segment
        for start in range(0, len(records), per_segment):  # slices: views, no copy here
            with self._progress:
                self._pending += 1
            self._queue.put((records[start : start + per_segment], data[:, :, start : start + per_segment], self._generation))

    @property
    def blocks_per_segment(self) -> int:
        """Blocks one segment holds at most: ``SEGMENT_BYTES``, a quarter of the budget, and the
        codec's limit, whichever is least (at least one)."""
        limit = min(SEGMENT_BYTES, self.max_bytes // 4) // block_codec.block_bytes(self.layout, self.compression)
        return max(1, min(limit, block_codec.MAX_BATCH_BLOCKS))

    def flush(self) -> bool:
        """Waits until every queued segment is on disk (or dropped for lack of room, or failed);
        False, at once, when a write is hung (running for ``write_timeout_s`` already): the
        caller goes on without it."""
        with self._progress:
            while self._pending:
                if self._hung():
                    return False
                started = self._write_started
                # Wake when the current write would become hung, if nothing lands before.
                wait = self.write_timeout_s if started is None else started + self.write_timeout_s - time.monotonic()
                self._progress.wait(max(wait, 0.0) + 0.01)
        return True

    def health(self) -> dict:
        """``degraded`` (a fault since the last successful write, or a write hung now), the
        reason, and the fault counts."""
        hung = self._hung()
        reason = f"a segment write has not finished for more than {self.write_timeout_s} s" if hung else self._fault
        return {
            "degraded": reason is not None,
            "degraded_reason": reason,
            "write_errors": self.num_write_errors,
            "no_space_errors": self.num_no_space,
            "hung_writes": self.num_hung_writes,
            "dropped_blocks": self.num_dropped_blocks,
            "skipped_entries": self.num_skipped,
            "foreign_files": self.num_foreign,
        }

    def _hung(self) -> bool:
        """Whether the write in progress has run for longer than ``write_timeout_s`` (counted
        once per write)."""
        started = self._write_started
        if started is None or time.monotonic() - started <= self.write_timeout_s:
            return False
        with self._progress:
            if not self._hung_counted and self._write_started == started:
                self._hung_counted = True
                self.num_hung_writes += 1
                logger.error("rayk disk tier: a segment write to %s has not finished for %s s; new blocks are dropped until it does", self.directory, self.write_timeout_s)
        return True

    def evict(self, keys: Sequence[BlockHash]) -> int:
        with self._lock:
            present = [k for k in keys if k in self._index]
            for key in present:
                self._delete(key)
        return len(present)

    def clear(self) -> int:
        """Deletes every segment (after the queued writes land), announced as one
        ``AllBlocksCleared``; returns how many blocks it dropped."""
        self.flush()
        with self._lock:
            self._generation += 1
            count = len(self._index)
            for key in list(self._index):
                self._delete(key)
            self.events.cleared()
        return count

    def set_max_bytes(self, max_bytes: int) -> None:
        """Changes the byte budget, deleting segments (by policy) until the tier fits it."""
        if max_bytes < 1:
            raise ValueError(f"disk budget must be >= 1 byte, got {max_bytes}")
        self.flush()
        with self._lock:
            self.max_bytes = max_bytes
            self._make_room(0)

    def set_policy(self, policy: EvictionPolicy) -> None:
        with self._lock:
            self.policy = policy
            for key, entry in self._index.items():
                policy.on_insert(BlockInfo(key, entry.depth, entry.end - entry.start))

    def close(self) -> None:
        """Waits for the queued writes and closes ``segment_dir``, unless a write is hung: then the
        writer (a daemon thread) is left to it, with the directory it writes into still open, and
        whatever it lands later is never indexed."""
        self._closed = True
        if self._writer is not None:
            if not self.flush():
                return
            self._queue.put(None)
            self._writer.join()
            self._writer = None
        for descriptor in [self._dir_fd, *self._removed_dir_fds]:
            if descriptor is not None:
                os.close(descriptor)
        self._dir_fd, self._removed_dir_fds = None, []

    def _directory_fd(self) -> int:
        """The open ``segment_dir``; OSError once the tier is closed (never a path relative to
        the working directory)."""
        if self._dir_fd is None:
            raise OSError(errno.EBADF, "the disk tier is closed", str(self.segment_dir))
        return self._dir_fd

    def _unlink(self, name: str) -> None:
        """Removes ``name`` from ``segment_dir`` (the name itself, never what a link points at)."""
        try:
            os.unlink(name, dir_fd=self._directory_fd())
        except FileNotFoundError:
            pass

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            with self._progress:
                self._write_started, self._hung_counted = time.monotonic(), False
            try:
                if self._write(*item):
                    self._fault = None  # the disk takes blocks again
                    self._write_failing = False
            except Exception as error:
                self.num_write_errors += 1
                if isinstance(error, OSError) and error.errno == errno.ENOSPC:
                    self.num_no_space += 1
                self._fault = f"a segment write failed: {error!r}"
                # One full report per run of failures (a read-only directory fails every write);
                # the rest are counted, and health() says degraded until a write lands.
                log = logger.debug if self._write_failing else logger.exception
                self._write_failing = True
                log("rayk disk tier: could not write a segment to %s; its blocks are dropped (further failures are counted, not logged)", self.directory)
            finally:
                item = None  # the blocks are written: their memory may go back (write_buffer)
                with self._progress:
                    self._pending -= 1
                    self._write_started = None
                    self._progress.notify_all()

    def _write(self, records: list[BlockRecord], blocks: torch.Tensor, generation: int) -> bool:
        """Writes one segment; True when a file landed."""
        fresh = [i for i, record in enumerate(records) if record.key not in self._index]
        if not fresh:
            return False
        if len(fresh) < len(records):
            records, blocks = [records[i] for i in fresh], blocks[:, :, fresh]
        pieces = block_codec.encode_pieces(records, blocks, self.fingerprint, self.layout, self.compression, self.integrity_key)
        size = pieces.head_bytes + len(records) * block_codec.block_bytes(self.layout, self.compression)
        if size > self.max_bytes:
            return False
        with self._lock:
            self._make_room(size)
        token = secrets.token_hex(12)
        name, temporary = f"seg-{token}{SUFFIX}", f".{token}.tmp"
        directory = self._directory_fd()
        if os.fstat(directory).st_nlink == 0:  # segment_dir was removed: write to a new one
            fresh = self._open_segment_dir()
            if fresh is not None:
                self._removed_dir_fds.append(directory)
                self._dir_fd = directory = fresh
        self._write_file(directory, temporary, pieces)  # a name already taken is left alone: not ours
        try:
            # replaces a link at ``name`` itself, never its target
            os.replace(temporary, name, src_dir_fd=directory, dst_dir_fd=directory)
        except BaseException:
            self._unlink(temporary)
            raise
        header = block_codec.read_header(pieces.head, self.fingerprint, self.layout, total_size=size, integrity_key=self.integrity_key)
        with self._lock:
            if generation != self._generation:  # cleared while it was written (a hung write)
                self._unlink(name)
                return True
            self._add_segment(name, header, size)
        self.num_stored += len(records)
        return True

    @staticmethod
    def _write_file(directory: int, temporary: str, pieces: block_codec.BatchPieces) -> None:
        """Writes the segment to a file created exclusively in the open ``directory``, never
        through a link; a file it created and could not fill is removed. The payload goes from a
        second thread while this one computes the head's checksums: the write waits in the kernel
        without the GIL, so the two overlap (hashing 96 MiB takes 7 ms here, writing it 25 to 40)."""
        descriptor = os.open(temporary, _WRITE_FLAGS, 0o600, dir_fd=directory)
        try:
            payload = _DaemonCall(_write_all, descriptor, [memoryview(piece) for piece in pieces.payload], pieces.head_bytes)
            try:
                head = pieces.head
            finally:
                payload.result()  # done before the descriptor closes, whatever happened here
            _write_all(descriptor, [memoryview(head)], 0)
        except BaseException:
            os.unlink(temporary, dir_fd=directory)
            raise
        finally:
            os.close(descriptor)

    def _make_room(self, size: int) -> None:
        """Deletes the segments of policy-chosen blocks until ``size`` more bytes fit (caller
        holds the lock)."""
        while self.num_bytes + size > self.max_bytes and self._index:
            victims = self.policy.select_victims(self._index, 1)
            if not victims:
                return
            segment = self._index[victims[0]].segment
            self.num_evictions += len(segment.live)
            for key in list(segment.live):
                self._delete(key)

    # -- the index ----------------------------------------------------------------------------

    def _add_segment(self, name: str, header: block_codec.BatchHeader, size: int) -> None:
        """Indexes a complete segment's blocks (keys already held elsewhere stay there); a
        segment with no new block is deleted (caller holds the lock)."""
        segment = _Segment(name, size, header.compression)
        for record, checksum in zip(header.records, header.checksums):
            if record.key in self._index:
                continue
            start, end = header.block_range(record.block)
            self._index[record.key] = _Entry(segment, record.parent, record.depth, record.tokens, start, end, checksum)
            segment.live.add(record.key)
            self.policy.on_insert(BlockInfo(record.key, record.depth, end - start))
            self.events.stored(record.key, record.parent)
        if segment.live:
            self.num_bytes += size
            self.num_segments += 1
        elif not self.read_only:
            self._unlink(name)

    def _delete(self, key: BlockHash) -> None:
        """Forgets a block, and deletes its segment's file with the last of its blocks (caller
        holds the lock)."""
        entry = self._index.pop(key)
        self.policy.on_remove(key, dropped=True)
        self.events.removed(key)
        segment = entry.segment
        segment.live.discard(key)
        if not segment.live:
            self.num_bytes -= segment.num_bytes
            self.num_segments -= 1
            if not self.read_only:
                self._unlink(segment.name)

    def _reject(self, key: BlockHash, entry: _Entry, reason: str) -> None:
        """Drops the segment of a block that failed its check, unless the block was replaced or
        evicted while it was being read (then the read just missed)."""
        with self._lock:
            if self._index.get(key) is entry:
                for live in list(entry.segment.live):
                    self._delete(live)
                self.num_rejected += 1
                self._fault = reason
                logger.warning("rayk disk tier: %s; segment %s deleted", reason, entry.segment.name)

    def _open_segment_dir(self) -> int | None:
        """``segment_dir`` opened (unless read-only, created first); None if a read-only tier
        finds none (it counts another model's or layout's subdirectories beside it as foreign);
        ``_SegmentDirRefused`` if it is not rayk's or cannot be made."""
        if not self.read_only:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                os.mkdir(self.segment_dir, 0o700)  # never through a link: a link there is EEXIST
            except FileExistsError:
                pass
            except OSError as error:
                raise _SegmentDirRefused(self.segment_dir, f"could not be created ({error.strerror})") from None
        try:
            descriptor = os.open(self.segment_dir, _DIRECTORY_FLAGS)
        except FileNotFoundError:
            if self.read_only:
                self.num_foreign += self._count_other_segment_dirs()
            return None
        except OSError as error:  # a link (ELOOP) or not a directory (ENOTDIR)
            raise _SegmentDirRefused(self.segment_dir, f"is a link or not a directory ({error.strerror})") from None
        info = os.fstat(descriptor)
        if not self.read_only and (info.st_uid != os.getuid() or info.st_mode & 0o022):
            os.close(descriptor)
            raise _SegmentDirRefused(self.segment_dir, f"belongs to uid {info.st_uid} with mode {stat.filemode(info.st_mode)}, not to this user alone")
        return descriptor

    def _count_other_segment_dirs(self) -> int:
        """Segment files in the subdirectories of other models or layouts beside ``segment_dir``."""
        try:
            names = [n for n in os.listdir(self.directory) if n.startswith(SEGMENT_DIR_PREFIX)]
        except OSError:
            return 0
        count = 0
        for name in names:
            try:
                descriptor = os.open(self.directory / name, _DIRECTORY_FLAGS)
            except OSError:
                continue
            try:
                count += sum(entry.endswith(SUFFIX) for entry in os.listdir(descriptor))
            finally:
                os.close(descriptor)
        return count

    def _rebuild_index(self) -> None:
        """Indexes the segments in ``segment_dir``; skips and counts odd entries; unless
        read-only, deletes refused regular ``*.kvb`` files and the stale temporaries rayk wrote."""
        if self._dir_fd is None:
            return
        now = time.time()
        found = []  # (mtime, name, header, size)
        for name in os.listdir(self._dir_fd):
            if _TEMPORARY_NAME.fullmatch(name):
                if not self.read_only:
                    self._remove_stale_temporary(name, now)
            elif name.endswith(SUFFIX):
                found.extend(self._open_segment(name))
        for _, name, header, size in sorted(found, key=lambda item: item[0]):
            self._add_segment(name, header, size)
        self.events.drain()

    def _open_segment(self, name: str) -> list:
        """``[(mtime, name, header, size)]`` for a segment of this model; ``[]`` otherwise, after
        counting it (and, unless read-only, deleting a regular file that is not one)."""
        try:
            with open_regular(name, dir_fd=self._dir_fd) as f:
                info = os.fstat(f.fileno())
                prefix = f.read(block_codec.PREFIX_BYTES)
                header = self._read_header(f, prefix, info.st_size)
            if header is not None and not self._keys_recompute(header):
                header = None
        except OSError:  # a link, a directory, a FIFO, a file gone since it was listed
            self.num_skipped += 1
            return []
        if header is not None:
            return [(info.st_mtime, name, header, info.st_size)]
        if not self.read_only:
            self._unlink(name)
            self.num_rejected += 1
        elif prefix.startswith(block_codec.MAGIC):
            self.num_foreign += 1
        else:  # not a block batch at all: skipped, not taken for another model's
            self.num_skipped += 1
        return []

    def _keys_recompute(self, header: block_codec.BatchHeader) -> bool:
        """Whether every block's key is what its parent key and token ids hash to (always true
        without a hasher)."""
        return self.hasher is None or all(self.hasher.key_of(r.parent, r.tokens) == r.key for r in header.records)

    def _remove_stale_temporary(self, name: str, now: float) -> None:
        """Deletes a temporary file a crashed writer left (old, and starting with rayk's magic)."""
        try:
            with open_regular(name, dir_fd=self._dir_fd) as f:
                stale = now - os.fstat(f.fileno()).st_mtime > _STALE_TEMPORARY_S
                ours = f.read(len(block_codec.MAGIC)) == block_codec.MAGIC
        except OSError:
            self.num_skipped += 1
            return
        if stale and ours:
            self._unlink(name)

    def _read_header(self, f, prefix: bytes, size: int) -> block_codec.BatchHeader | None:
        """The checked header of an open segment file whose first bytes are ``prefix``, or None
        if it is not one for this model. The claimed header length is bounded by the layout and
        the file's size before anything more is read."""
        try:
            length = block_codec.header_length(prefix)
            if length > min(size, block_codec.max_header_bytes(self.layout)):
                return None
            return block_codec.read_header(prefix + f.read(length), self.fingerprint, self.layout, total_size=size, integrity_key=self.integrity_key)
        except (OSError, BlockBatchError):
            return None
