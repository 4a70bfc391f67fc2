"""Block keys are a pure function of fingerprint, salt and tokens, the same in every process."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import xxhash

from rayk.hashing import BlockHasher, model_fingerprint, token_bytes

VECTORS = json.loads((Path(__file__).parent / "data" / "hash_vectors.json").read_text())


def _hasher(algorithm: str) -> BlockHasher:
    return BlockHasher(model_fingerprint(VECTORS["fingerprint_fields"]), VECTORS["block_size"], algorithm)


def test_fingerprint_matches_committed_vector():
    assert model_fingerprint(VECTORS["fingerprint_fields"]).hex() == VECTORS["fingerprint"]


@pytest.mark.parametrize("case", VECTORS["cases"], ids=lambda c: f"{c['algorithm']}-salt={c['cache_salt']}")
def test_block_hashes_match_committed_vectors(case):
    hashes = _hasher(case["algorithm"]).hash_blocks(VECTORS["token_ids"], case["cache_salt"])
    assert [h.hex() for h in hashes] == case["block_hashes"]


def test_xxh3_chain_follows_its_documented_definition():
    fingerprint = bytes.fromhex(VECTORS["fingerprint"])
    seed = int.from_bytes(fingerprint[:8], "little")
    tokens, size = VECTORS["token_ids"], VECTORS["block_size"]
    parent = bytes(16)
    expected = []
    for start in range(0, len(tokens) - size + 1, size):
        parent = xxhash.xxh3_128_digest(parent + struct.pack(f"<{size}I", *tokens[start : start + size]), seed)
        expected.append(parent)
    assert _hasher("xxh3_128").hash_blocks(tokens) == expected


def test_sha256_chain_follows_its_documented_definition():
    fingerprint = bytes.fromhex(VECTORS["fingerprint"])
    tokens, size = VECTORS["token_ids"], VECTORS["block_size"]
    root = hashlib.sha256(fingerprint + b"salt:tenant-a").digest()
    first = hashlib.sha256(fingerprint + root + struct.pack(f"<{size}I", *tokens[:size])).digest()
    assert _hasher("sha256").hash_blocks(tokens, "tenant-a")[0] == first


@pytest.mark.parametrize("hash_seed", ["0", "12345"])
def test_other_processes_with_other_hash_seeds_compute_the_same_keys(hash_seed):
    script = (
        "import json, sys; from rayk.hashing import BlockHasher, model_fingerprint, token_bytes; "
        "v = json.load(open(sys.argv[1])); "
        "h = BlockHasher(model_fingerprint(v['fingerprint_fields']), v['block_size'], 'xxh3_128'); "
        "print(','.join(x.hex() for x in h.hash_blocks(v['token_ids'], 'tenant-a')))"
    )
    vectors_path = Path(__file__).parent / "data" / "hash_vectors.json"
    result = subprocess.run(
        [sys.executable, "-c", script, str(vectors_path)],
        env={"PYTHONHASHSEED": hash_seed, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    expected = next(c for c in VECTORS["cases"] if c["algorithm"] == "xxh3_128" and c["cache_salt"] == "tenant-a")
    assert result.stdout.strip().split(",") == expected["block_hashes"]


def test_only_full_blocks_are_hashed():
    hasher = _hasher("xxh3_128")
    assert hasher.hash_blocks([1, 2, 3]) == []
    assert len(hasher.hash_blocks(list(range(11)))) == 2


def test_incremental_extension_equals_hashing_at_once():
    hasher = _hasher("xxh3_128")
    tokens = list(range(50))
    grown: list[bytes] = []
    for end in (3, 4, 9, 50):
        hasher.extend(grown, token_bytes(tokens[:end]), hasher.root())
    assert grown == hasher.hash_blocks(tokens)


def test_a_changed_token_changes_its_block_and_every_later_one():
    hasher = _hasher("xxh3_128")
    tokens = list(range(16))
    changed = tokens.copy()
    changed[5] = 999
    a, b = hasher.hash_blocks(tokens), hasher.hash_blocks(changed)
    assert a[0] == b[0] and all(x != y for x, y in zip(a[1:], b[1:]))


def test_salt_and_fingerprint_fields_separate_keys():
    fields = VECTORS["fingerprint_fields"]
    tokens = list(range(8))
    base = BlockHasher(model_fingerprint(fields), 4).hash_blocks(tokens)
    assert BlockHasher(model_fingerprint(fields), 4).hash_blocks(tokens, "x") != base
    for field, value in [("dtype", "torch.bfloat16"), ("weights", "other"), ("architecture", "Qwen3ForCausalLM")]:
        assert BlockHasher(model_fingerprint(fields | {field: value}), 4).hash_blocks(tokens) != base


def test_unknown_algorithm_is_refused():
    with pytest.raises(ValueError, match="hash_algorithm"):
        BlockHasher(bytes(32), 16, "md5")
