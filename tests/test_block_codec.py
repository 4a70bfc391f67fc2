"""The block-batch codec: what one cache writes, another of the same model reads back exactly;
anything foreign or damaged is refused by name, or left out, never served."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import torch

from rayk.cache import block_codec
from rayk.cache.block_codec import MAGIC, PREFIX_BYTES, BlockBatchError, decode, encode, read_header
from rayk.cache.block_pool import BlockRecord
from rayk.cache.paged_kv import KVLayout
from rayk.hashing import token_bytes

LAYOUT = KVLayout(num_layers=2, block_size=4, num_kv_heads=2, head_dim=8, dtype=torch.float32)
FINGERPRINT = b"f" * 32


def _batch(n: int, layout: KVLayout = LAYOUT, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    shape = (2, layout.num_layers, n, layout.block_size, layout.num_kv_heads, layout.head_dim)
    blocks = torch.randn(shape, generator=generator).to(layout.dtype)
    records, parent = [], bytes(16)
    for i in range(n):
        key = bytes([i + 1]) * 16
        records.append(BlockRecord(i, key, parent, i, token_bytes(range(i * 4, i * 4 + 4))))
        parent = key
    return records, blocks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_batch_round_trips_exactly(dtype):
    layout = KVLayout(2, 4, 2, 8, dtype)
    records, blocks = _batch(5, layout)
    buffer = encode(records, blocks, FINGERPRINT, layout)
    assert buffer.dtype == np.uint8 and bytes(buffer[: len(MAGIC)]) == MAGIC
    decoded = decode(buffer, FINGERPRINT, layout)
    assert decoded.num_rejected == 0
    assert [(r.key, r.parent, r.depth, r.tokens) for r in decoded.records] == [(r.key, r.parent, r.depth, r.tokens) for r in records]
    assert torch.equal(decoded.blocks, blocks)
    assert decode(bytes(buffer), FINGERPRINT, layout).blocks.equal(blocks)  # from bytes too


def test_int8_batches_hold_a_quarter_and_decode_within_the_quantization_bound():
    records, blocks = _batch(3)
    plain = encode(records, blocks, FINGERPRINT, LAYOUT)
    small = encode(records, blocks, FINGERPRINT, LAYOUT, compression="int8")
    assert read_header(small, FINGERPRINT, LAYOUT).compression == "int8"
    assert len(small) < 0.4 * len(plain)
    decoded = decode(small, FINGERPRINT, LAYOUT)
    bound = blocks.abs().amax(dim=(3, 5), keepdim=True) / 254 + 1e-6
    assert ((decoded.blocks - blocks).abs() <= bound).all()


def test_one_block_reads_alone_from_its_range():
    records, blocks = _batch(4)
    buffer = encode(records, blocks, FINGERPRINT, LAYOUT)
    header = read_header(buffer[: header_end(buffer)], FINGERPRINT, LAYOUT, total_size=len(buffer))
    start, end = header.block_range(2)
    assert block_codec.verified(buffer[start:end], header.checksums[2])
    one = block_codec.decode_payloads([buffer[start:end]], None, LAYOUT)
    assert torch.equal(one, blocks[:, :, 2:3])


SECRET = b"a per-deployment secret"


def _rewrite(buffer, edit) -> bytes:
    """``buffer`` with ``edit`` applied to its parsed header, repacked (any MAC left as it was)."""
    length = block_codec.header_length(buffer)
    header = msgpack.unpackb(bytes(buffer[PREFIX_BYTES : PREFIX_BYTES + length]))
    edit(header)
    packed = msgpack.packb(header, use_bin_type=True)
    return MAGIC + len(packed).to_bytes(4, "little") + packed + bytes(buffer[PREFIX_BYTES + length :])


def test_a_sealed_batch_reads_back_under_its_key_and_is_refused_under_another():
    records, blocks = _batch(3)
    sealed = encode(records, blocks, FINGERPRINT, LAYOUT, integrity_key=SECRET)
    assert torch.equal(decode(sealed, FINGERPRINT, LAYOUT, SECRET).blocks, blocks)
    assert torch.equal(decode(sealed, FINGERPRINT, LAYOUT).blocks, blocks)  # a reader without a key checks the SHA-256 sums
    with pytest.raises(BlockBatchError, match="not sealed with this cache's integrity key"):
        read_header(sealed, FINGERPRINT, LAYOUT, integrity_key=b"another deployment's key")
    with pytest.raises(BlockBatchError, match="not sealed with this cache's integrity key"):
        read_header(encode(records, blocks, FINGERPRINT, LAYOUT), FINGERPRINT, LAYOUT, integrity_key=SECRET)


def _forge_tokens(header):
    header["blocks"][1][3] = [9, 9, 9, 9]


def _forge_payload_sum(header):  # a forger's payload, with the SHA-256 it has
    header["blocks"][0][4] = bytes(32)


def _unseal(header):
    del header["mac"], header["checksum"]
    for entry in header["blocks"]:
        entry[4] = entry[4][:8]


@pytest.mark.parametrize("forge", [_forge_tokens, _forge_payload_sum, _unseal], ids=["tokens", "payload-checksum", "unsealed"])
def test_a_sealed_header_changed_by_anyone_without_the_key_is_refused(forge):
    records, blocks = _batch(3)
    forged = _rewrite(encode(records, blocks, FINGERPRINT, LAYOUT, integrity_key=SECRET), forge)
    with pytest.raises(BlockBatchError, match="integrity key|blocks\\[0\\]"):
        decode(forged, FINGERPRINT, LAYOUT, SECRET)


def test_a_sealed_blocks_changed_payload_fails_its_sha256():
    records, blocks = _batch(3)
    sealed = encode(records, blocks, FINGERPRINT, LAYOUT, integrity_key=SECRET)
    start, end = read_header(sealed, FINGERPRINT, LAYOUT, integrity_key=SECRET).block_range(1)
    sealed[(start + end) // 2] ^= 0x01
    decoded = decode(sealed, FINGERPRINT, LAYOUT, SECRET)
    assert [r.key for r in decoded.records] == [records[0].key, records[2].key] and decoded.num_rejected == 1


def header_end(buffer) -> int:
    return PREFIX_BYTES + block_codec.header_length(buffer)


def _with_header(buffer, **changes) -> np.ndarray:
    length = block_codec.header_length(buffer)
    header = msgpack.unpackb(bytes(buffer[PREFIX_BYTES : PREFIX_BYTES + length]))
    header.update(changes)
    packed = msgpack.packb(header, use_bin_type=True)
    return np.frombuffer(MAGIC + len(packed).to_bytes(4, "little") + packed + bytes(buffer[PREFIX_BYTES + length :]), dtype=np.uint8)


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"fingerprint": b"g" * 32}, "fingerprint"),
        ({"layout": {"layout": "x", "block_size": 32}}, "layout"),
        ({"version": 99}, "version"),
        ({"compression": "zstd"}, "compression"),
        ({"block_bytes": 7}, "block_bytes"),
        ({"blocks": "many"}, "blocks"),
        ({"blocks": [[b"k" * 16, b"p" * 16, 0, [1, 2], b"c" * 8]]}, "blocks[0]"),
    ],
)
def test_a_foreign_header_is_refused_by_name(changes, named):
    records, blocks = _batch(1)
    with pytest.raises(BlockBatchError, match=named.replace("[", r"\[")):
        decode(_with_header(encode(records, blocks, FINGERPRINT, LAYOUT), **changes), FINGERPRINT, LAYOUT)


def test_damage_outside_the_payload_is_refused_and_inside_it_leaves_the_block_out():
    records, blocks = _batch(3)
    buffer = encode(records, blocks, FINGERPRINT, LAYOUT)
    with pytest.raises(BlockBatchError, match="does not start with"):
        decode(b"NOTABATCH" + bytes(buffer[9:]), FINGERPRINT, LAYOUT)
    with pytest.raises(BlockBatchError, match="payload bytes"):
        decode(buffer[:-10], FINGERPRINT, LAYOUT)
    with pytest.raises(BlockBatchError, match="msgpack"):
        decode(np.concatenate([buffer[:PREFIX_BYTES], np.full(len(buffer) - PREFIX_BYTES, 0xC1, dtype=np.uint8)]), FINGERPRINT, LAYOUT)
    flipped = buffer.copy()
    start, _ = read_header(buffer, FINGERPRINT, LAYOUT).block_range(1)
    flipped[start + 5] ^= 0xFF
    decoded = decode(flipped, FINGERPRINT, LAYOUT)
    assert decoded.num_rejected == 1 and [r.key for r in decoded.records] == [records[0].key, records[2].key]
    assert torch.equal(decoded.blocks, blocks[:, :, [0, 2]])


def test_a_huge_claimed_header_length_is_refused_before_anything_is_read():
    fake = MAGIC + (2**32 - 1).to_bytes(4, "little")
    with pytest.raises(BlockBatchError, match="header length"):
        read_header(fake, FINGERPRINT, LAYOUT, total_size=2**40)


def test_an_empty_batch_round_trips():
    records, blocks = _batch(0)
    decoded = decode(encode(records, blocks, FINGERPRINT, LAYOUT), FINGERPRINT, LAYOUT)
    assert decoded.records == [] and decoded.blocks is None and decoded.num_rejected == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_finite_blocks_finds_every_nan_and_inf_and_nothing_else(dtype):
    generator = torch.Generator().manual_seed(3)
    blocks = (torch.randn((2, 2, 6, 4, 2, 8), generator=generator) * 1e3).to(dtype)
    blocks[:, :, 1] = torch.finfo(dtype).max  # the largest finite values are finite
    blocks[:, :, 2] = -torch.finfo(dtype).max
    blocks[:, :, 5] = 0.0
    blocks[:, :, 5, 0, 0, 0] = -0.0
    blocks[1, 1, 0, 3, 1, 7] = float("nan")
    blocks[0, 1, 3, 0, 0, 0] = float("inf")
    blocks[1, 0, 4, 2, 1, 3] = float("-inf")
    expected = [False, True, True, False, False, True]
    assert block_codec.finite_blocks(blocks).tolist() == expected
    strided = blocks.permute(2, 0, 1, 3, 4, 5).contiguous().permute(1, 2, 0, 3, 4, 5)  # a batch read in place
    assert block_codec.finite_blocks(strided).tolist() == expected


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_finite_blocks_agrees_with_isfinite_on_every_bit_pattern(dtype):
    """Every 16-bit pattern, and for float32 the edges of each class plus random patterns, as
    one-value blocks: negative NaNs and the NaNs of every payload included."""
    if dtype == torch.float32:
        edges = [0, 0x7F7FFFFF, 0x7F800000, 0x7F800001, 0x7FFFFFFF, 0x80000000, 0xFF7FFFFF, 0xFF800000, 0xFF800001, 0xFFFFFFFF, 1, 0x80000001]
        generator = torch.Generator().manual_seed(5)
        random = torch.randint(0, 1 << 32, (1 << 16,), generator=generator, dtype=torch.int64).tolist()
        patterns = torch.tensor([p - (1 << 32) if p >= 1 << 31 else p for p in edges + random], dtype=torch.int32)
    else:
        patterns = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    values = patterns.view(dtype)
    blocks = values.view(1, 1, -1, 1, 1, 1)
    assert torch.equal(block_codec.finite_blocks(blocks), torch.isfinite(values))


@pytest.mark.parametrize("compression", [None, "int8"])
def test_a_batch_is_the_same_bytes_from_a_tensor_a_list_or_a_pool_and_its_block_ids(compression):
    records, blocks = _batch(4)
    pool = torch.zeros((2, LAYOUT.num_layers, 9, LAYOUT.block_size, LAYOUT.num_kv_heads, LAYOUT.head_dim), dtype=LAYOUT.dtype)
    ids = [7, 2, 5, 0]
    pool[:, :, ids] = blocks
    from_tensor = encode(records, blocks, FINGERPRINT, LAYOUT, compression)
    assert np.array_equal(encode(records, list(blocks.unbind(2)), FINGERPRINT, LAYOUT, compression), from_tensor)
    assert np.array_equal(encode(records, pool, FINGERPRINT, LAYOUT, compression, source_blocks=ids), from_tensor)
    with pytest.raises(ValueError, match="4 records for 3 source blocks"):
        encode(records, pool, FINGERPRINT, LAYOUT, compression, source_blocks=ids[:3])


@pytest.mark.parametrize("compression", [None, "int8"])
@pytest.mark.parametrize("integrity_key", [None, SECRET])
def test_the_pieces_of_a_batch_are_the_batch(compression, integrity_key):
    records, blocks = _batch(5)
    pieces = block_codec.encode_pieces(records, blocks, FINGERPRINT, LAYOUT, compression, integrity_key)
    assert len(pieces.head) == pieces.head_bytes  # known before any checksum, so the payload can go first
    joined = b"".join([pieces.head, *(bytes(piece) for piece in pieces.payload)])
    assert joined == bytes(encode(records, blocks, FINGERPRINT, LAYOUT, compression, integrity_key))
    strided = blocks.permute(2, 0, 1, 3, 4, 5).contiguous().permute(1, 2, 0, 3, 4, 5)  # block-major underneath
    pieces = block_codec.encode_pieces(records, strided, FINGERPRINT, LAYOUT, compression, integrity_key)
    assert b"".join([pieces.head, *(bytes(p) for p in pieces.payload)]) == joined


def test_a_segment_written_in_short_writes_is_whole(tmp_path, monkeypatch):
    """``pwritev`` may write less than it is given; the disk tier goes on from where it stopped."""
    from rayk.cache import disk_tier
    from rayk.cache.policies import make_policy

    pwritev = disk_tier.os.pwritev
    monkeypatch.setattr(disk_tier.os, "pwritev", lambda fd, buffers, offset: pwritev(fd, [memoryview(buffers[0])[:1000]], offset))
    records, blocks = _batch(3)
    tier = disk_tier.DiskTier(tmp_path, LAYOUT, FINGERPRINT, 1 << 20, make_policy("lru"))
    tier.store(records, blocks)
    assert tier.flush() and len(tier) == 3
    assert torch.equal(tier.read(records[2].key, records[2].parent, records[2].tokens), blocks[:, :, 2:3])
    tier.close()
