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

``cache_salt`` is a str (its UTF-8 bytes count) or bytes of at most ``MAX_CACHE_SALT_BYTES``;
anything else is refused (``check_cache_salt``) before a key is computed.

Fault injection, for tests only: when ``RAYK_TEST_WEAK_KEYS=1`` is in a process's environment
as a hasher is built, that hasher clears the lowest bit of every token id before hashing, so two
prompts that differ only in those bits collide on every key. The collision tests set it in the
driver and in the Ray nodes they start, to show that a colliding key is refused (its tokens are
compared), never served. A deployment never sets it.
"""

from __future__ import annotations

import hashlib
import os
import sys
from array import array
from collections.abc import Mapping, Sequence
from typing import Literal

import msgpack
import numpy as np
import xxhash

HashAlgorithm = Literal["xxh3_128", "sha256"]
HASH_ALGORITHMS: tuple[str, ...] = ("xxh3_128", "sha256")
BlockHash = bytes

TOKEN_BYTES = 4
MAX_CACHE_SALT_BYTES = 256
"""The longest ``cache_salt`` accepted, in bytes (a str counts its UTF-8 encoding)."""
WEAK_KEYS_ENV = "RAYK_TEST_WEAK_KEYS"
"""Fault injection for the collision tests (see the module docstring); never set in a deployment."""
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


def check_cache_salt(cache_salt: str | bytes | None) -> bytes | None:
    """``cache_salt`` as bytes (a str UTF-8 encoded), or None; a TypeError for any other type
    and a ValueError for a salt over ``MAX_CACHE_SALT_BYTES``."""
    if cache_salt is None:
        return None
    if isinstance(cache_salt, str):
        encoded = cache_salt.encode("utf-8")
    elif isinstance(cache_salt, bytes):
        encoded = cache_salt
    else:
        raise TypeError(f"cache_salt must be a str, bytes or None, got {type(cache_salt).__name__}")
    if len(encoded) > MAX_CACHE_SALT_BYTES:
        raise ValueError(f"cache_salt is {len(encoded)} bytes; the limit is {MAX_CACHE_SALT_BYTES} bytes (a str counts its UTF-8 encoding)")
    return encoded


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
        self.weak_keys = os.environ.get(WEAK_KEYS_ENV) == "1"

    def digest(self, data: bytes) -> BlockHash:
        if self.algorithm == "xxh3_128":
            return xxhash.xxh3_128_digest(data, self.seed)
        return hashlib.sha256(self.fingerprint + data).digest()

    def root(self, cache_salt: str | bytes | None = None) -> BlockHash:
        """The parent key of a request's first block; salted requests never share keys with others."""
        salt = check_cache_salt(cache_salt)
        if salt is None:
            return self.empty_root
        return self.digest(b"salt:" + salt)

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
        if self.weak_keys:
            data = _clear_low_bits(data[:end])
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

    def key_of(self, parent: BlockHash, tokens: bytes) -> BlockHash | None:
        """The key of the block of ``tokens`` (``token_bytes`` of one full block) under ``parent``;
        None if ``tokens`` is not one full block. A block from outside is what it claims to be
        only if its key is this."""
        keys: list[BlockHash] = []
        if len(tokens) == self.block_bytes:
            self.extend(keys, tokens, parent)
        return keys[0] if keys else None

    def hash_blocks(self, token_ids: Sequence[int], cache_salt: str | bytes | None = None) -> list[BlockHash]:
        """The keys of every full block of ``token_ids``."""
        block_hashes: list[BlockHash] = []
        self.extend(block_hashes, token_bytes(token_ids), self.root(cache_salt))
        return block_hashes


def _clear_low_bits(data: bytes | bytearray) -> bytes:
    """``data`` (little-endian uint32 token ids) with every id's lowest bit cleared: the weak-keys fault injection."""
    return (np.frombuffer(bytes(data), dtype="<u4") & np.uint32(0xFFFFFFFE)).tobytes()
