"""Chained block hashes: the keys of the prefix cache.

A block's key is ``h_i = H(h_{i-1} || tokens_i)`` over full blocks only, where ``tokens_i`` is the
block's token ids as little-endian uint32 and ``h_{-1}`` is the *root*: zero bytes, or
``H(b"salt:" || cache_salt)`` when the request carries a cache salt (tenant isolation). Because
every key depends on its parent, two requests share a block's key only when they share the whole
prefix up to and including that block.

``H`` is xxh3_128 seeded with 64 bits of the model fingerprint, or sha256 over the fingerprint and
the same input for deployments that want a cryptographic key. The fingerprint covers everything
that decides what a KV block holds (architecture, weights identity, dtype, block size, KV layout),
so different models never share keys.

Keys are ``bytes`` (16 for xxh3_128, 32 for sha256), never Python's ``hash()``: they are the same in
every process, on every machine, under every PYTHONHASHSEED (tests/data/hash_vectors.json pins
them). A key is only a lookup: the cache confirms a hit against the block's stored token ids and
parent key before it serves it.
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections.abc import Mapping, Sequence
from typing import Literal

import msgpack
import xxhash

HashAlgorithm = Literal["xxh3_128", "sha256"]
HASH_ALGORITHMS: tuple[str, ...] = ("xxh3_128", "sha256")
BlockHash = bytes

TOKEN_BYTES = 4
assert array("I").itemsize == TOKEN_BYTES, "rayk needs a 4-byte unsigned int array type"


def token_bytes(token_ids: Sequence[int]) -> bytes:
    """Token ids as little-endian uint32 bytes: the encoding that keys and stored blocks use."""
    data = array("I", token_ids)
    if sys.byteorder != "little":
        data.byteswap()
    return data.tobytes()


def token_ids_from_bytes(data: bytes | bytearray) -> list[int]:
    """The inverse of ``token_bytes``."""
    ids = array("I", bytes(data))
    if sys.byteorder != "little":
        ids.byteswap()
    return ids.tolist()


def model_fingerprint(fields: Mapping[str, object]) -> bytes:
    """A 32-byte identity of everything that decides the bytes of a KV block.

    ``fields`` holds plain values (str, int, float, bool, bytes, lists, dicts); their order does
    not matter. Two engines get the same fingerprint exactly when the fields are equal.
    """
    packed = msgpack.packb(dict(sorted(fields.items())), use_bin_type=True)
    return hashlib.sha256(b"rayk-fingerprint-v1\0" + packed).digest()


class BlockHasher:
    """Computes chained keys for one model fingerprint, one block size and one algorithm."""

    def __init__(self, fingerprint: bytes, block_size: int, algorithm: HashAlgorithm = "xxh3_128"):
        if algorithm not in HASH_ALGORITHMS:
            raise ValueError(f"hash_algorithm must be one of {HASH_ALGORITHMS}, got {algorithm!r}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.fingerprint = fingerprint
        self.block_size = block_size
        self.block_bytes = block_size * TOKEN_BYTES
        self.algorithm = algorithm
        self.seed = int.from_bytes(fingerprint[:8], "little")
        self.hash_size = 16 if algorithm == "xxh3_128" else 32
        self.empty_root: BlockHash = bytes(self.hash_size)

    def digest(self, data: bytes) -> BlockHash:
        if self.algorithm == "xxh3_128":
            return xxhash.xxh3_128_digest(data, self.seed)
        return hashlib.sha256(self.fingerprint + data).digest()

    def root(self, cache_salt: str | bytes | None = None) -> BlockHash:
        """The parent key of a request's first block; salted requests never share keys with others."""
        if cache_salt is None:
            return self.empty_root
        if isinstance(cache_salt, str):
            cache_salt = cache_salt.encode()
        return self.digest(b"salt:" + cache_salt)

    def extend(self, block_hashes: list[BlockHash], data: bytes | bytearray, root: BlockHash) -> None:
        """Appends the keys of the full blocks of ``data`` (``token_bytes``) that ``block_hashes`` lacks.

        ``block_hashes`` holds the keys of the first blocks already; it grows in place, so a
        request hashes each of its blocks once as it grows.
        """
        step = self.block_bytes
        start = len(block_hashes) * step
        end = len(data) // step * step
        if end <= start:
            return
        parent = block_hashes[-1] if block_hashes else root
        append = block_hashes.append
        if self.algorithm == "xxh3_128":
            # The hot loop: one concatenation and one C call per block, nothing looked up.
            digest, seed = xxhash.xxh3_128_digest, self.seed
            for offset in range(start, end, step):
                parent = digest(parent + data[offset : offset + step], seed)
                append(parent)
        else:
            for offset in range(start, end, step):
                parent = self.digest(parent + data[offset : offset + step])
                append(parent)

    def hash_blocks(self, token_ids: Sequence[int], cache_salt: str | bytes | None = None) -> list[BlockHash]:
        """The keys of every full block of ``token_ids``."""
        block_hashes: list[BlockHash] = []
        self.extend(block_hashes, token_bytes(token_ids), self.root(cache_salt))
        return block_hashes
