"""The disk tier: KV blocks in files that outlive the process.

One segment file per block, named by its key, in ``directory``:

    b"RAYKKV01" | header length (uint32, little-endian) | msgpack header | payload

The header holds the block's key, parent key, depth, token ids, the model fingerprint, the KV
layout (dtype, shape), the payload's compression, length and xxh3-64 checksum. Nothing is ever
unpickled. With ``compress`` new files hold int8 blocks with per-head float32 scales
(``rayk.cache.quantization``); files of either kind are read, so switching it loses nothing.

On start the tier rebuilds its index from the headers, so a new engine on the same directory
gets hits at once. A file whose header does not parse, was written for another model or layout,
or is shorter than its header says, is deleted and counted in ``num_rejected``. The payload's
checksum is verified each time a block is read; a block that fails it is deleted and counted
too, and reads as a miss, so its tokens are recomputed, never served wrong.

Files are written by a background thread (off the request's critical path) to a temporary name
and renamed into place, so a crash never leaves a half-written file under a block's name. A
block joins the index once its file is complete; a write that fails (disk full, directory gone)
is logged, counted in ``num_write_errors`` and dropped, and the writer goes on. The files' total
size stays within ``max_bytes``; the tier's eviction policy picks the files to delete. The index,
the byte count and the event buffer are shared with the writer and guarded by one lock.

``read_only`` opens a directory (a snapshot) without writing or deleting anything in it: files
that do not belong are counted in ``num_foreign`` and left alone.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import msgpack
import torch
import xxhash

from rayk.cache.block_pool import BlockRecord
from rayk.cache.events import EventBuffer
from rayk.cache.paged_kv import KVLayout
from rayk.cache.policies import BlockInfo, EvictionPolicy
from rayk.cache.quantization import compressed_block_bytes, dequantize_int8, quantize_int8
from rayk.hashing import BlockHash, token_bytes, token_ids_from_bytes

MAGIC = b"RAYKKV01"
SUFFIX = ".kvb"
_STALE_TEMPORARY_S = 3600.0  # a temporary file this old was left by a crash, not a live writer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Entry:
    path: Path
    parent: BlockHash
    depth: int
    tokens: bytes
    num_bytes: int
    checksum: int
    payload_offset: int
    compression: str | None


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
    ):
        self.directory = Path(directory)
        self.read_only = read_only
        if not read_only:
            self.directory.mkdir(parents=True, exist_ok=True)
        self.layout = layout
        self.compression = "int8" if compress else None
        self._payload_bytes = {
            None: layout.bytes_per_block,
            "int8": compressed_block_bytes(layout.num_layers, layout.block_size, layout.num_kv_heads, layout.head_dim),
        }
        self.fingerprint = fingerprint
        self.max_bytes = max_bytes
        self.policy = policy
        self.events = EventBuffer(self.name)
        self._index: dict[BlockHash, _Entry] = {}
        self._lock = threading.Lock()
        self.num_bytes = 0
        self.num_rejected = 0
        self.num_foreign = 0
        self.num_stored = 0
        self.num_loaded = 0
        self.num_evictions = 0
        self.num_write_errors = 0
        self._temporary_names = itertools.count()
        self._rebuild_index()
        self._queue: queue.Queue = queue.Queue()
        self._closed = read_only
        self._writer = None
        if not read_only:
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
        """What the file of ``key`` holds (``block`` is -1: a disk block has no slot)."""
        entry = self._index.get(key)
        return None if entry is None else BlockRecord(-1, key, entry.parent, entry.depth, entry.tokens)

    def read(self, key: BlockHash, parent: BlockHash, tokens: bytes) -> torch.Tensor | None:
        """The block's ``[2, layers, 1, ...]`` KV, or None if absent, not this block, or corrupt."""
        with self._lock:
            entry = self._index.get(key)
        if entry is None or entry.parent != parent or entry.tokens != tokens:
            return None
        size = self._payload_bytes[entry.compression]
        payload = torch.empty(size, dtype=torch.uint8)  # read into once: no bytes object, no copy
        try:
            with entry.path.open("rb") as f:
                f.seek(entry.payload_offset)
                num_read = f.readinto(payload.numpy())
        except OSError:
            num_read = -1
        if num_read != size or xxhash.xxh3_64_intdigest(payload.numpy()) != entry.checksum:
            self._reject(key, entry)
            return None
        with self._lock:
            self.policy.on_access(BlockInfo(key, entry.depth, entry.num_bytes))
        self.num_loaded += 1
        return self._decode(payload, entry.compression)

    def _encode(self, block: torch.Tensor) -> list:
        """One block (``[2, layers, 1, ...]``) as this tier writes it: buffers, not copies."""
        if self.compression is None:
            return [block.contiguous().view(torch.uint8).numpy()]
        q, scales = quantize_int8(block)
        return [q.numpy(), scales.numpy()]

    def _decode(self, raw: torch.Tensor, compression: str | None) -> torch.Tensor:
        """A block from its payload (a uint8 tensor the block may keep)."""
        layout = self.layout
        shape = (2, layout.num_layers, 1, layout.block_size, layout.num_kv_heads, layout.head_dim)
        if compression is None:
            return raw.view(layout.dtype).view(shape)
        num_values = raw.numel() - 2 * layout.num_layers * layout.num_kv_heads * 4
        q = raw[:num_values].view(torch.int8).view(shape)
        scales = raw[num_values:].view(torch.float32).view(2, layout.num_layers, 1, layout.num_kv_heads)
        return dequantize_int8(q, scales, layout.dtype)

    # -- writes -------------------------------------------------------------------------------

    def store(self, records: Sequence[BlockRecord], blocks: torch.Tensor) -> None:
        """Queues ``blocks`` (``[2, layers, n, ...]``) to be encoded and written; returns at once.

        The tier takes ownership of ``blocks``: every caller passes a tensor it has just gathered
        and will not touch again, so nothing is copied here, on the caller's path.
        """
        if self._closed:
            raise RuntimeError(f"disk tier {str(self.directory)!r} is closed{' (read-only)' if self.read_only else ''}")
        data = blocks.cpu()
        for i, record in enumerate(records):
            if record.key not in self._index:
                self._queue.put((record, data[:, :, i : i + 1]))

    def flush(self) -> None:
        """Waits until every queued block is on disk (or dropped for lack of room)."""
        self._queue.join()

    def evict(self, keys: Sequence[BlockHash]) -> int:
        with self._lock:
            present = [k for k in keys if k in self._index]
            for key in present:
                self._delete(key)
        return len(present)

    def clear(self) -> int:
        """Deletes every block file (after the queued writes land), announced as one
        ``AllBlocksCleared``; returns how many blocks it dropped."""
        self.flush()
        with self._lock:
            count = len(self._index)
            for key in list(self._index):
                self._delete(key)
            self.events.cleared()
        return count

    def set_max_bytes(self, max_bytes: int) -> None:
        """Changes the byte budget, deleting files (by policy) until the tier fits it."""
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
                policy.on_insert(BlockInfo(key, entry.depth, entry.num_bytes))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.flush()
        self._queue.put(None)
        self._writer.join()

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._write(*item)
            except Exception:
                self.num_write_errors += 1
                logger.exception("rayk disk tier: could not write a block to %s; it is dropped", self.directory)
            finally:
                self._queue.task_done()

    def _write(self, record: BlockRecord, block: torch.Tensor) -> None:
        parts = self._encode(block)
        payload_bytes = sum(part.nbytes for part in parts)
        digest = xxhash.xxh3_64()
        for part in parts:
            digest.update(part)
        checksum = digest.intdigest()
        header = msgpack.packb(
            {
                "key": record.key,
                "parent": record.parent,
                "depth": record.depth,
                "token_ids": token_ids_from_bytes(record.tokens),
                "fingerprint": self.fingerprint,
                "layout": self.layout.to_metadata(),
                "compression": self.compression,
                "payload_bytes": payload_bytes,
                "checksum": checksum,
            },
            use_bin_type=True,
        )
        size = len(MAGIC) + 4 + len(header) + payload_bytes
        if size > self.max_bytes:
            return
        with self._lock:
            if record.key in self._index:
                return
            self._make_room(size)
        path = self.directory / (record.key.hex() + SUFFIX)
        temporary = self.directory / f"{record.key.hex()}.{os.getpid()}-{next(self._temporary_names)}.tmp"
        try:
            with temporary.open("wb") as f:
                f.write(MAGIC + len(header).to_bytes(4, "little") + header)
                for part in parts:
                    f.write(part)
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
        entry = _Entry(path, record.parent, record.depth, record.tokens, size, checksum, size - payload_bytes, self.compression)
        with self._lock:
            self._add(record.key, entry)
        self.num_stored += 1

    def _make_room(self, size: int) -> None:
        """Deletes policy-chosen files until ``size`` more bytes fit (caller holds the lock)."""
        while self.num_bytes + size > self.max_bytes and self._index:
            victims = self.policy.select_victims(self._index, 1)
            if not victims:
                return
            self._delete(victims[0])
            self.num_evictions += 1

    # -- the index ----------------------------------------------------------------------------

    def _add(self, key: BlockHash, entry: _Entry) -> None:
        self._index[key] = entry
        self.num_bytes += entry.num_bytes
        self.policy.on_insert(BlockInfo(key, entry.depth, entry.num_bytes))
        self.events.stored(key, entry.parent)

    def _delete(self, key: BlockHash) -> None:
        """Forgets a block and deletes its file (caller holds the lock)."""
        entry = self._index.pop(key)
        self.num_bytes -= entry.num_bytes
        self.policy.on_remove(key, dropped=True)
        self.events.removed(key)
        if not self.read_only:
            entry.path.unlink(missing_ok=True)

    def _reject(self, key: BlockHash, entry: _Entry) -> None:
        """Drops a block whose file failed its check, unless the file was replaced or evicted
        while it was being read (then the read just missed)."""
        with self._lock:
            if self._index.get(key) is entry:
                self._delete(key)
                self.num_rejected += 1

    def _rebuild_index(self) -> None:
        if not self.directory.is_dir():
            return
        now = time.time()
        for temporary in self.directory.glob("*.tmp"):
            if not self.read_only and now - temporary.stat().st_mtime > _STALE_TEMPORARY_S:
                temporary.unlink(missing_ok=True)
        for path in sorted(self.directory.glob("*" + SUFFIX), key=lambda p: p.stat().st_mtime):
            entry_and_key = self._read_header(path)
            if entry_and_key is not None:
                self._add(entry_and_key[1], entry_and_key[0])
            elif self.read_only:
                self.num_foreign += 1
            else:
                path.unlink(missing_ok=True)
                self.num_rejected += 1
        self.events.drain()

    def _read_header(self, path: Path) -> tuple[_Entry, BlockHash] | None:
        """The entry a file describes, or None if it is not a complete block file for this model."""
        try:
            size = path.stat().st_size
            with path.open("rb") as f:
                if f.read(len(MAGIC)) != MAGIC:
                    return None
                header_len = int.from_bytes(f.read(4), "little")
                header = msgpack.unpackb(f.read(header_len), raw=False)
        except (OSError, ValueError, msgpack.UnpackException):
            return None
        if not isinstance(header, dict):
            return None
        try:
            key, payload_bytes, compression = header["key"], header["payload_bytes"], header.get("compression")
            ok = (
                header["fingerprint"] == self.fingerprint
                and header["layout"] == self.layout.to_metadata()
                and compression in self._payload_bytes
                and payload_bytes == self._payload_bytes[compression]
                and size == len(MAGIC) + 4 + header_len + payload_bytes
                and path.name == key.hex() + SUFFIX
            )
            if not ok:
                return None
            tokens = token_bytes(header["token_ids"])
            entry = _Entry(path, header["parent"], int(header["depth"]), tokens, size, int(header["checksum"]), size - payload_bytes, compression)
        except (KeyError, TypeError, AttributeError, OverflowError, ValueError):
            return None
        return entry, key
