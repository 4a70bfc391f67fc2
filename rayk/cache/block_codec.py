"""The one format KV blocks take outside a pool: a batch of blocks in one buffer.

Disk segment files, cache snapshots and peer transfers (Ray objects) all hold exactly this::

    b"RAYKBB01" | header length (uint32, little-endian) | msgpack header | payload

The header is a map of plain values (nothing is ever pickled):

* ``version`` (``FORMAT_VERSION``), ``fingerprint`` (the model's, 32 bytes), ``layout``
  (``KVLayout.to_metadata()``), ``compression`` (None or "int8"), ``block_bytes`` (payload bytes
  of one block);
* ``blocks``: per block ``[key, parent key, depth, token ids, checksum]``, in payload order; the
  checksum is the xxh3-64 of the block's payload bytes, as 8 little-endian bytes;
* with an *integrity key* (a per-deployment secret, for directories that others can write to):
  ``checksum`` "sha256" (each block's checksum is then the 32-byte SHA-256 of its payload) and
  ``mac``, HMAC-SHA256 under the key over the model fingerprint, the layout, the compression, the
  block size in bytes and every block's entry. The MAC makes the header authentic; each entry's
  SHA-256 then binds the payload to it, since no one can make other bytes with the same digest
  (an xxh3 checksum catches damage, not forgery). A batch without these fields has none.

The payload holds the blocks back to back, ``block_bytes`` each, block-major: block i is
``[2, layers, block_size, kv_heads, head_dim]`` in the model's dtype, or with int8 compression
those values as int8 followed by float32 scales ``[2, layers, kv_heads]``
(``rayk.cache.quantization``). So one block is one contiguous range, readable alone.

``read_header`` checks everything a header claims against the caller's model and layout and the
buffer's size (and, given an integrity key, the MAC: a batch not sealed under that key is
refused), and raises ``BlockBatchError`` naming the first field that does not match; a block
whose payload fails its checksum, or whose KV holds a non-finite value (a block from outside with
a recomputed checksum), is left out of what ``decode`` returns. A reader therefore either gets
blocks that are exactly what was written for this model, or a miss.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import msgpack
import numpy as np
import torch
import xxhash

from rayk.cache.block_pool import BlockRecord
from rayk.cache.paged_kv import KVLayout
from rayk.cache.quantization import compressed_block_bytes, dequantize_int8, quantize_int8
from rayk.cache.recycled_memory import RecycledMemory
from rayk.hashing import TOKEN_BYTES, token_bytes, token_ids_from_bytes

MAGIC = b"RAYKBB01"
FORMAT_VERSION = 1
PREFIX_BYTES = len(MAGIC) + 4
COMPRESSIONS = (None, "int8")
MAX_BATCH_BLOCKS = 1 << 16
"""The most blocks one batch may hold."""
_CHECKSUM_BYTES = {"xxh3-64": 8, "sha256": 32}
_MAC_DOMAIN = b"rayk-block-batch-mac-v1\0"
_TO_PAGED = (1, 2, 0, 3, 4, 5)  # a block-major [n, 2, layers, ...] view as [2, layers, n, ...]
_HASH_RUN_BYTES = 256 << 10


class BlockBatchError(ValueError):
    """A buffer that is not a block batch for this model and layout; the message names why."""


@dataclass(frozen=True)
class BatchHeader:
    """A checked header: the blocks' records (``block`` is their index in the batch) and checksums."""

    records: tuple[BlockRecord, ...]
    checksums: tuple[bytes, ...]
    compression: str | None
    block_bytes: int
    payload_offset: int

    def block_range(self, index: int) -> tuple[int, int]:
        """Where block ``index``'s payload lies in the buffer (start, end)."""
        start = self.payload_offset + index * self.block_bytes
        return start, start + self.block_bytes


def block_bytes(layout: KVLayout, compression: str | None) -> int:
    """Payload bytes of one block."""
    if compression is None:
        return layout.bytes_per_block
    if compression == "int8":
        return compressed_block_bytes(layout.num_layers, layout.block_size, layout.num_kv_heads, layout.head_dim)
    raise BlockBatchError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")


def encode(
    records: Sequence[BlockRecord],
    blocks: torch.Tensor | Sequence[torch.Tensor],
    fingerprint: bytes,
    layout: KVLayout,
    compression: str | None = None,
    integrity_key: bytes | None = None,
    source_blocks: Sequence[int] | None = None,
    memory: RecycledMemory | None = None,
) -> np.ndarray:
    """One uint8 buffer holding the blocks, ``records[i]`` describing block i. ``blocks`` is a
    ``[2, layers, n, ...]`` tensor, copied into the buffer in one operation; or with
    ``source_blocks`` a whole pool ``[2, layers, pool_blocks, ...]``, of which those blocks are
    gathered straight into the buffer in one operation; or a list of ``[2, layers, block_size,
    kv_heads, head_dim]`` tensors (views into a pool are fine), copied once each. With
    ``integrity_key`` the batch is sealed (see the module doc). The buffer is taken from
    ``memory`` when given, else newly allocated.

    Why one operation: each torch call releases the GIL and must win it back, and while another
    thread of the process runs Python that costs up to the 5 ms switch interval per call. Copying
    128 blocks one by one took 743 ms instead of 4 beside a busy thread (measured)."""
    size = block_bytes(layout, compression)
    checksum = _checksum_algorithm(integrity_key)
    n = len(records)
    if n > MAX_BATCH_BLOCKS:
        raise ValueError(f"a batch holds at most {MAX_BATCH_BLOCKS} blocks, got {n}")
    gather_index = None  # set when the blocks are gathered from a CPU pool straight into the batch
    if source_blocks is not None:
        if len(source_blocks) != n:
            raise ValueError(f"{n} records for {len(source_blocks)} source blocks")
        index = torch.as_tensor(source_blocks, dtype=torch.long, device=blocks.device)
        if compression is None and blocks.device.type == "cpu":
            gather_index = index
        else:
            blocks = blocks.index_select(2, index)  # one gather on the pool's own device
    count = n if gather_index is not None else blocks.shape[2] if isinstance(blocks, torch.Tensor) else len(blocks)
    if count != n:
        raise ValueError(f"{n} records for {count} blocks")
    offset = _head_bytes(records, fingerprint, layout, compression, integrity_key)
    buffer = memory.take(offset + n * size) if memory is not None else np.empty(offset + n * size, dtype=np.uint8)
    payload = torch.from_numpy(buffer[offset:]).view(n, size)
    block_shape = _block_shape(layout)
    if compression is None:
        values = payload.view(layout.dtype).view(n, *block_shape)
        if gather_index is not None:
            torch.index_select(blocks, 2, gather_index, out=values.permute(_TO_PAGED))
        elif isinstance(blocks, torch.Tensor):
            values.permute(_TO_PAGED).copy_(blocks)
        else:
            for i, block in enumerate(blocks):
                values[i].copy_(block)
    elif n:
        gathered = blocks.detach().cpu() if isinstance(blocks, torch.Tensor) else torch.stack([b.detach().cpu() for b in blocks], dim=2)
        q, scales = quantize_int8(gathered)
        count = q.numel() // n
        payload[:, :count].view(torch.int8).view(n, *block_shape).copy_(q.permute(2, 0, 1, 3, 4, 5))
        payload[:, count:].view(torch.float32).view(n, 2, layout.num_layers, layout.num_kv_heads).copy_(scales.permute(2, 0, 1, 3))
    rows = buffer[offset:].reshape(n, size)
    entries = [_entry(record, _checksum([row], checksum)) for record, row in zip(records, rows)]
    head = _head(fingerprint, layout, compression, size, entries, integrity_key)
    assert len(head) == offset, "checksums and the MAC are fixed-width: the header keeps its length"
    buffer[:offset] = np.frombuffer(head, dtype=np.uint8)
    return buffer


@dataclass
class BatchPieces:
    """The same batch as ``encode``, as buffers to write instead of one buffer: ``payload``,
    each block's payload as the contiguous runs it already is in the source tensor (1-D uint8
    arrays over its memory, which keep it alive), goes at byte ``head_bytes`` of the file, and
    ``head`` (the prefix and the header, exactly ``head_bytes`` long) before it. Nothing in the
    payload depends on the checksums, so it may be written while ``head`` computes them."""

    records: tuple[BlockRecord, ...]
    per_block: tuple[tuple[np.ndarray, ...], ...]
    fingerprint: bytes
    layout: KVLayout
    compression: str | None
    integrity_key: bytes | None

    @property
    def payload(self) -> list[np.ndarray]:
        return [piece for pieces in self.per_block for piece in pieces]

    @functools.cached_property
    def head_bytes(self) -> int:
        return _head_bytes(self.records, self.fingerprint, self.layout, self.compression, self.integrity_key)

    @functools.cached_property
    def head(self) -> bytes:
        """The prefix and header, with every block's checksum (run by run: the runs, 12 to 32
        KiB, are below the size at which xxhash lets go of the GIL, so hashing beside a busy
        engine thread does not wait to win it back thousands of times; see ``encode``)."""
        algorithm = _checksum_algorithm(self.integrity_key)
        entries = [_entry(record, _checksum(pieces, algorithm)) for record, pieces in zip(self.records, self.per_block)]
        size = block_bytes(self.layout, self.compression)
        return _head(self.fingerprint, self.layout, self.compression, size, entries, self.integrity_key)


def encode_pieces(
    records: Sequence[BlockRecord],
    blocks: torch.Tensor,
    fingerprint: bytes,
    layout: KVLayout,
    compression: str | None = None,
    integrity_key: bytes | None = None,
) -> BatchPieces:
    """``blocks`` (``[2, layers, n, ...]``) as ``BatchPieces``: nothing is copied but what int8
    compression makes (and a CUDA tensor's move to the CPU), and nothing is hashed yet.

    For the disk tier: a file is written from the pieces in one pass, where ``encode`` would first
    copy every block into the batch."""
    n = len(records)
    if n > MAX_BATCH_BLOCKS or blocks.shape[2] != n:
        raise ValueError(f"{n} records for {blocks.shape[2]} blocks (at most {MAX_BATCH_BLOCKS})")
    blocks = blocks.detach().cpu()
    if compression is None:
        runs = _byte_runs(blocks)  # [2, layers, n, run bytes]
        per_block = tuple(tuple(runs[k, layer, i] for k in range(2) for layer in range(layout.num_layers)) for i in range(n))
    else:
        q, scales = quantize_int8(blocks)
        runs = _byte_runs(q)
        block_scales = scales.permute(2, 0, 1, 3).contiguous().view(torch.uint8).numpy().reshape(n, -1)
        per_block = tuple((*(runs[k, layer, i] for k in range(2) for layer in range(layout.num_layers)), block_scales[i]) for i in range(n))
    return BatchPieces(tuple(records), per_block, fingerprint, layout, compression, integrity_key)


def _byte_runs(blocks: torch.Tensor) -> np.ndarray:
    """``[2, layers, n, block_size, kv_heads, head_dim]`` as uint8 ``[2, layers, n, run bytes]``,
    a view (a copy only if a block's layer is not one contiguous run)."""
    if not blocks[0, 0, 0].is_contiguous():
        blocks = blocks.contiguous()
    return blocks.view(torch.uint8).numpy().reshape(*blocks.shape[:3], -1)


def _checksum_algorithm(integrity_key: bytes | None) -> str:
    return "xxh3-64" if integrity_key is None else "sha256"


def _entry(record: BlockRecord, checksum: bytes) -> list:
    return [record.key, record.parent, record.depth, token_ids_from_bytes(record.tokens), checksum]


def _head_bytes(records: Sequence[BlockRecord], fingerprint: bytes, layout: KVLayout, compression: str | None, integrity_key: bytes | None) -> int:
    """The length of the head (prefix and header) of a batch of ``records``: checksums and the
    MAC are fixed-width, so a header with placeholders for them is as long."""
    placeholder = bytes(_CHECKSUM_BYTES[_checksum_algorithm(integrity_key)])
    entries = [_entry(record, placeholder) for record in records]
    mac = None if integrity_key is None else bytes(32)
    return PREFIX_BYTES + len(_pack_header(fingerprint, layout, compression, block_bytes(layout, compression), entries, mac))


def _head(fingerprint: bytes, layout: KVLayout, compression: str | None, size: int, entries: list, integrity_key: bytes | None) -> bytes:
    """The magic, the header's length and the header, sealed with ``integrity_key`` if given."""
    mac = None if integrity_key is None else _mac(integrity_key, fingerprint, layout, compression, size, entries)
    header = _pack_header(fingerprint, layout, compression, size, entries, mac)
    return MAGIC + len(header).to_bytes(4, "little") + header


def _pack_header(fingerprint: bytes, layout: KVLayout, compression: str | None, size: int, entries: list, mac: bytes | None) -> bytes:
    header = {
        "version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "layout": layout.to_metadata(),
        "compression": compression,
        "block_bytes": size,
        "blocks": entries,
    }
    if mac is not None:
        header["checksum"] = "sha256"
        header["mac"] = mac
    return msgpack.packb(header, use_bin_type=True)


def _checksum(pieces: Sequence[np.ndarray], algorithm: str) -> bytes:
    """The checksum of one block's payload, given as the buffers it is made of, in order. An
    xxh3 digest is fed ``_HASH_RUN_BYTES`` at a time: xxhash keeps the GIL for runs that short,
    where for a whole block it lets go and must win it back (see ``encode``); the digest is the
    same. Measured with xxhash 4.1 beside a thread running Python: runs up to 1 MiB kept the GIL,
    a 1.5 MiB block waited 5 ms for it; and 96 MiB took 8.3 ms in 32 KiB runs, 6.6 in 256 KiB."""
    if algorithm == "xxh3-64":
        digest = xxhash.xxh3_64()
        for piece in pieces:
            for start in range(0, len(piece), _HASH_RUN_BYTES):
                digest.update(piece[start : start + _HASH_RUN_BYTES])
        return digest.intdigest().to_bytes(8, "little")
    digest = hashlib.sha256()
    for piece in pieces:
        digest.update(piece)
    return digest.digest()


def _mac(integrity_key: bytes, fingerprint: bytes, layout: KVLayout, compression: str | None, size: int, entries: list) -> bytes:
    """HMAC-SHA256 over everything a sealed header claims but its own MAC."""
    message = msgpack.packb([fingerprint, layout.to_metadata(), compression, size, entries], use_bin_type=True)
    return hmac.digest(integrity_key, _MAC_DOMAIN + message, "sha256")


def max_header_bytes(layout: KVLayout) -> int:
    """The longest header a batch of this layout can have: ``MAX_BATCH_BLOCKS`` entries of two
    32-byte keys, a depth, ``block_size`` token ids and a 32-byte checksum, each at msgpack's widest. A
    longer claimed length is refused before anything is read, so it cannot make a reader
    allocate."""
    return 1024 + MAX_BATCH_BLOCKS * (128 + 5 * layout.block_size)


def header_length(prefix: bytes | np.ndarray) -> int:
    """The header's length from a buffer's first ``PREFIX_BYTES`` bytes (BlockBatchError if they
    are not a block batch's)."""
    prefix = bytes(prefix[:PREFIX_BYTES])
    if len(prefix) < PREFIX_BYTES or prefix[: len(MAGIC)] != MAGIC:
        raise BlockBatchError(f"not a rayk block batch: it does not start with {MAGIC!r}")
    return int.from_bytes(prefix[len(MAGIC) :], "little")


def read_header(
    buffer: bytes | np.ndarray,
    fingerprint: bytes,
    layout: KVLayout,
    total_size: int | None = None,
    integrity_key: bytes | None = None,
) -> BatchHeader:
    """The checked header of a batch. ``buffer`` holds at least the prefix and header;
    ``total_size`` is the whole batch's size (default ``len(buffer)``), which the header's claims
    must fit exactly. With ``integrity_key``, only a batch sealed under it is accepted."""
    total_size = len(buffer) if total_size is None else total_size
    length = header_length(buffer)
    if length > min(total_size - PREFIX_BYTES, max_header_bytes(layout)):
        raise BlockBatchError(f"header length {length} does not fit a batch of {total_size} bytes of this layout")
    if len(buffer) < PREFIX_BYTES + length:
        raise BlockBatchError(f"the batch is cut short: {len(buffer)} bytes, its header alone needs {PREFIX_BYTES + length}")
    try:
        header = msgpack.unpackb(bytes(buffer[PREFIX_BYTES : PREFIX_BYTES + length]), raw=False)
    except (ValueError, msgpack.UnpackException) as error:
        raise BlockBatchError(f"the header is not valid msgpack: {error}") from None
    if not isinstance(header, dict):
        raise BlockBatchError(f"the header is a {type(header).__name__}, not a map")
    _expect(header, "version", FORMAT_VERSION)
    _expect(header, "fingerprint", fingerprint, "written for another model")
    _expect(header, "layout", layout.to_metadata(), "another block size, dtype or KV layout")
    compression = header.get("compression")
    if compression not in COMPRESSIONS:
        raise BlockBatchError(f"header field 'compression' must be one of {COMPRESSIONS}, got {compression!r}")
    size = block_bytes(layout, compression)
    _expect(header, "block_bytes", size)
    entries = header.get("blocks")
    if not isinstance(entries, list) or len(entries) > MAX_BATCH_BLOCKS:
        raise BlockBatchError(f"header field 'blocks' must be a list of at most {MAX_BATCH_BLOCKS} blocks")
    offset = PREFIX_BYTES + length
    if total_size != offset + len(entries) * size:
        raise BlockBatchError(f"the batch holds {total_size - offset} payload bytes; its header's {len(entries)} blocks need {len(entries) * size}")
    checksum = header.get("checksum", "xxh3-64")
    if checksum not in _CHECKSUM_BYTES:
        raise BlockBatchError(f"header field 'checksum' must be one of {tuple(_CHECKSUM_BYTES)}, got {checksum!r:.40}")
    if integrity_key is not None:
        mac = header.get("mac")
        sealed = checksum == "sha256" and isinstance(mac, bytes)
        if not sealed or not hmac.compare_digest(mac, _mac(integrity_key, fingerprint, layout, compression, size, entries)):
            raise BlockBatchError("header field 'mac' does not match: the batch was not sealed with this cache's integrity key")
    records = tuple(_record(i, entry, layout.block_size, _CHECKSUM_BYTES[checksum]) for i, entry in enumerate(entries))
    return BatchHeader(records, tuple(entry[4] for entry in entries), compression, size, offset)


def _expect(header: dict, field: str, value, meaning: str = "") -> None:
    if header.get(field) != value:
        why = f" ({meaning})" if meaning else ""
        raise BlockBatchError(f"header field {field!r} does not match this cache{why}: got {header.get(field)!r:.120}")


def _record(index: int, entry, block_size: int, checksum_bytes: int) -> BlockRecord:
    try:
        key, parent, depth, token_ids, checksum = entry
        ok = (
            isinstance(key, bytes)
            and isinstance(parent, bytes)
            and len(key) in (16, 32)
            and len(parent) == len(key)
            and type(depth) is int  # not a bool, nor a float or string
            and depth >= 0
            and isinstance(checksum, bytes)
            and len(checksum) == checksum_bytes
            and isinstance(token_ids, list)
            and len(token_ids) == block_size
        )
        tokens = token_bytes(token_ids) if ok else b""
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok or len(tokens) != block_size * TOKEN_BYTES:
        raise BlockBatchError(f"header entry blocks[{index}] is not [key, parent, depth, {block_size} token ids, {checksum_bytes}-byte checksum]")
    return BlockRecord(index, key, parent, depth, tokens)


def verified(payload: np.ndarray, checksum: bytes) -> bool:
    """Whether one block's payload bytes match their checksum (xxh3-64 or SHA-256, told apart by
    its length)."""
    return _checksum([payload], "xxh3-64" if len(checksum) == 8 else "sha256") == checksum


def decode_payloads(payloads: Sequence[np.ndarray], compression: str | None, layout: KVLayout) -> torch.Tensor:
    """``[2, layers, n, ...]`` in the model's dtype from blocks' payload bytes: a new tensor,
    each payload copied once (payloads may be read-only views, such as a Ray object's)."""
    n = len(payloads)
    block_shape = _block_shape(layout)
    raws = [_read_only_tensor(p) for p in payloads]
    if compression is None:
        out = torch.empty((2, layout.num_layers, n, *block_shape[2:]), dtype=layout.dtype)
        for i, raw in enumerate(raws):
            out[:, :, i].copy_(raw.view(layout.dtype).view(block_shape))
        return out
    raw = torch.stack(raws)
    values = 2 * layout.num_layers * layout.block_size * layout.num_kv_heads * layout.head_dim
    q = raw[:, :values].contiguous().view(torch.int8).view(n, *block_shape).permute(1, 2, 0, 3, 4, 5)
    scales = raw[:, values:].contiguous().view(torch.float32).view(n, 2, layout.num_layers, layout.num_kv_heads).permute(1, 2, 0, 3)
    return dequantize_int8(q, scales, layout.dtype)


@dataclass(frozen=True)
class DecodedBatch:
    """The blocks of a batch that passed their checksums, in batch order, and the count of those
    that did not (left out)."""

    records: list[BlockRecord]
    blocks: torch.Tensor | None  # [2, layers, len(records), ...], None when no block passed
    num_rejected: int

    def keep(self, kept: Sequence[bool]) -> DecodedBatch:
        """The batch without the blocks whose ``kept`` is False (counted as rejected)."""
        records = [record for record, ok in zip(self.records, kept) if ok]
        if len(records) == len(self.records):
            return self
        blocks = self.blocks[:, :, torch.tensor(kept, dtype=torch.bool)] if records else None
        return DecodedBatch(records, blocks, self.num_rejected + len(self.records) - len(records))


def decode(buffer: np.ndarray | bytes, fingerprint: bytes, layout: KVLayout, integrity_key: bytes | None = None) -> DecodedBatch:
    """Every block of a whole batch that matches its checksum (BlockBatchError for a bad header,
    or one not sealed under ``integrity_key`` when given).

    When every block passes and the batch is not compressed, ``blocks`` is a read-only view of
    ``buffer`` itself (no copy: a Ray object's bytes stay in the object store until the view is
    dropped); otherwise the verified blocks are copied out."""
    if isinstance(buffer, (bytes, bytearray, memoryview)):
        buffer = np.frombuffer(buffer, dtype=np.uint8)
    header = read_header(buffer, fingerprint, layout, integrity_key=integrity_key)
    records, payloads = [], []
    for record, checksum in zip(header.records, header.checksums):
        start, end = header.block_range(record.block)
        payload = buffer[start:end]
        if verified(payload, checksum):
            records.append(record)
            payloads.append(payload)
    if not payloads:
        return DecodedBatch(records, None, len(header.records))
    if len(records) < len(header.records) or header.compression is not None:
        blocks = decode_payloads(payloads, header.compression, layout)
    else:
        raw = _read_only_tensor(buffer[header.payload_offset :])
        blocks = raw.view(layout.dtype).view(len(records), *_block_shape(layout)).permute(1, 2, 0, 3, 4, 5)
    decoded = DecodedBatch(records, blocks, len(header.records) - len(records))
    return decoded.keep(finite_blocks(blocks).tolist())


# dtype -> the signed and unsigned numpy integer types of its bits, its exponent bits, its sign bit
_BIT_PATTERNS = {
    torch.float32: (np.int32, np.uint32, 0x7F800000, 0x80000000),
    torch.bfloat16: (np.int16, np.uint16, 0x7F80, 0x8000),
    torch.float16: (np.int16, np.uint16, 0x7C00, 0x8000),
}


def finite_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """Per block of a ``[2, layers, n, ...]`` tensor, whether every value in it is finite.

    A NaN or an infinity makes a sum non-finite, so for float32 one sum per block clears every
    block at once, with no scratch memory: over 192 MiB of blocks just read from disk, 7.4 ms
    where the bit test below takes 10.2. A sum also overflows when finite values add up past
    float32's range, so a block whose sum is not finite is tested value by value before it is
    called non-finite. Summing bfloat16 or float16 converts every value to float32 on the way,
    which makes it slower than the bit test (8.7 ms against 6.1 for 96 MiB of bfloat16), and
    float16's range would often overflow: those are tested value by value."""
    if blocks.dtype == torch.float32:
        finite = torch.isfinite(blocks.sum(dim=(0, 1, 3, 4, 5)))
        if not finite.all():
            suspects = (~finite).nonzero().flatten()
            finite[suspects] = _finite_values(blocks[:, :, suspects])
        return finite
    return _finite_values(blocks)


def _finite_values(blocks: torch.Tensor) -> torch.Tensor:
    """``finite_blocks`` value by value.

    NaN and ±Inf are exactly the values whose exponent bits are all ones. Read as unsigned
    integers, the negative ones are the largest bit patterns there are (sign and exponent set);
    read as signed integers, the positive ones are (exponent set, sign clear). So on the CPU two
    max reductions over the bits find them, with no scratch memory: 8 to 9 GB/s here, where
    ``torch.isfinite`` on bfloat16 runs at 0.8. Each is one call over the whole tensor, so the
    GIL is handed off twice, however many blocks (see ``encode``)."""
    if blocks.device.type != "cpu" or blocks.dtype not in _BIT_PATTERNS:
        return torch.isfinite(blocks).transpose(0, 2).reshape(blocks.shape[2], -1).all(dim=1)
    signed, unsigned, exponent, sign = _BIT_PATTERNS[blocks.dtype]
    bits = blocks.view({np.int16: torch.int16, np.int32: torch.int32}[signed]).numpy()  # strided and read-only views included
    axes = (0, 1, 3, 4, 5)
    negative_ok = bits.view(unsigned).max(axis=axes) < sign | exponent
    positive_ok = bits.max(axis=axes) < exponent
    return torch.from_numpy(negative_ok & positive_ok)


def blocks_view(payload: np.ndarray, layout: KVLayout) -> torch.Tensor:
    """The uncompressed blocks ``[2, layers, n, ...]`` whose memory is ``payload``, their bytes
    in payload order (block-major): a payload read into ``payload`` is the blocks, and blocks
    gathered into the view are a payload, with no copy after."""
    return torch.from_numpy(payload).view(layout.dtype).view(-1, *_block_shape(layout)).permute(_TO_PAGED)


def _block_shape(layout: KVLayout) -> tuple[int, ...]:
    """One block, block-major: ``[2, layers, block_size, kv_heads, head_dim]``."""
    return (2, layout.num_layers, layout.block_size, layout.num_kv_heads, layout.head_dim)


def _read_only_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor over ``array``'s bytes, which may be read-only (a Ray object's): only ever read."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)
