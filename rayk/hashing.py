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
from collections.abc import Mapping, Sequence
from typing import Literal

import msgpack
import numpy as np
import xxhash

HashAlgorithm = Literal["xxh3_128", "sha256"]
HASH_ALGORITHMS: tuple[str, ...] = ("xxh3_128", "sha256")
BlockHash = bytes

_TOKEN_DTYPE = np.dtype("<u4")


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
        self.algorithm = algorithm
        if algorithm == "xxh3_128":
            seed = int.from_bytes(fingerprint[:8], "little")
            self.hash_size = 16
            self._digest = lambda data: xxhash.xxh3_128_digest(data, seed)
        else:
            self.hash_size = 32
            self._digest = lambda data: hashlib.sha256(fingerprint + data).digest()
        self.empty_root: BlockHash = bytes(self.hash_size)

    def root(self, cache_salt: str | bytes | None = None) -> BlockHash:
        """The parent key of a request's first block; salted requests never share keys with others."""
        if cache_salt is None:
            return self.empty_root
        if isinstance(cache_salt, str):
            cache_salt = cache_salt.encode()
        return self._digest(b"salt:" + cache_salt)

    def extend(self, block_hashes: list[BlockHash], token_ids: Sequence[int], root: BlockHash) -> None:
        """Appends the keys of the full blocks of ``token_ids`` that ``block_hashes`` lacks.

        ``block_hashes`` holds the keys of the first blocks already; it grows in place, so a
        request hashes each of its blocks once as it grows.
        """
        bs = self.block_size
        start = len(block_hashes)
        num_full = len(token_ids) // bs
        if num_full <= start:
            return
        data = np.asarray(token_ids[start * bs : num_full * bs], dtype=_TOKEN_DTYPE).tobytes()
        parent = block_hashes[-1] if block_hashes else root
        digest = self._digest
        step = bs * _TOKEN_DTYPE.itemsize
        append = block_hashes.append
        for offset in range(0, len(data), step):
            parent = digest(parent + data[offset : offset + step])
            append(parent)

    def hash_blocks(self, token_ids: Sequence[int], cache_salt: str | bytes | None = None) -> list[BlockHash]:
        """The keys of every full block of ``token_ids``."""
        block_hashes: list[BlockHash] = []
        self.extend(block_hashes, token_ids, self.root(cache_salt))
        return block_hashes
