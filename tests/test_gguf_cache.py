"""The conversion cache's writer: one writer per entry across processes, nothing left behind
by a failed or killed write, and a failure that only costs the cache."""

from __future__ import annotations

import fcntl

import pytest
import torch

from rayk.model import gguf_cache
from rayk.model.architecture import DecoderArchitecture

ARCH = DecoderArchitecture(
    architecture="LlamaForCausalLM", vocab_size=8, hidden_size=4, intermediate_size=8, num_layers=1,
    num_heads=2, num_kv_heads=1, head_dim=2, rms_norm_eps=1e-6, rope_theta=10000.0,
)
WEIGHTS = {"embed.weight": torch.arange(32, dtype=torch.float32).reshape(8, 4)}


def _store(entry):
    gguf_cache.store_cached(entry, ARCH, WEIGHTS, None, "identity")


def test_an_entry_is_written_and_loads(tmp_path):
    entry = tmp_path / "gguf-abc"
    _store(entry)
    arch, weights, tokenizer, identity = gguf_cache.load_cached(entry, torch.float32)
    assert arch == ARCH and identity == "identity" and tokenizer is None
    assert torch.equal(weights["embed.weight"], WEIGHTS["embed.weight"])


def test_a_failed_write_leaves_nothing_behind_and_raises_nothing(tmp_path, monkeypatch, caplog):
    def full_disk(*args, **kwargs):
        raise Exception("No space left on device")  # safetensors' own error type is not an OSError

    monkeypatch.setattr(gguf_cache, "save_file", full_disk)
    entry = tmp_path / "gguf-abc"
    _store(entry)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gguf-abc.lock"]
    assert "No space left on device" in caplog.text


def test_a_write_another_process_holds_is_skipped(tmp_path):
    entry = tmp_path / "gguf-abc"
    with open(tmp_path / "gguf-abc.lock", "a") as held:  # a second open file: flock conflicts as across processes
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _store(entry)
    assert not entry.exists()


def test_staging_left_by_a_killed_writer_is_removed(tmp_path):
    stale = tmp_path / "gguf-abc.k1ll3d"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    _store(tmp_path / "gguf-abc")
    assert not stale.exists()
    assert gguf_cache.load_cached(tmp_path / "gguf-abc", torch.float32) is not None


@pytest.mark.parametrize("meta", ["{not json", '{"format": 0}'])
def test_an_unreadable_entry_is_rebuilt(tmp_path, meta):
    entry = tmp_path / "gguf-abc"
    entry.mkdir()
    (entry / "meta.json").write_text(meta)
    assert gguf_cache.load_cached(entry, torch.float32) is None
    _store(entry)
    assert gguf_cache.load_cached(entry, torch.float32) is not None
