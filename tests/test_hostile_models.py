"""Hostile model files: each fault in config.json, the shard index, the weights or GGUF metadata
is refused with a ValueError naming the file and the key, before anything is sized by it."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import gguf
import pytest
import torch
from safetensors.torch import load_file, save_file

from rayk.model.loader import load_model
from tests.test_gguf_files import write_gguf


def _load(path):
    return load_model(path, None, torch.device("cpu"))


@pytest.fixture
def model_copy(tiny_llama_dir, tmp_path):
    directory = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, directory)
    return directory


def _edit_config(directory, **changes):
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"num_attention_heads": 0}, "num_attention_heads"),
        ({"num_hidden_layers": 2.7}, "num_hidden_layers"),
        ({"hidden_size": "64"}, "hidden_size"),
        ({"vocab_size": True}, "vocab_size"),
        ({"rms_norm_eps": -1.0}, "rms_norm_eps"),
        ({"architectures": "LlamaForCausalLM"}, "architectures"),
        ({"architectures": [["LlamaForCausalLM"]]}, "architecture"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": "4"}}, "factor"),
        ({"rope_parameters": {"rope_theta": -1.0}}, "rope_theta"),
        ({"rope_parameters": ["linear"]}, "rope_scaling"),
        ({"eos_token_id": "2"}, "eos_token_id"),
    ],
)
def test_a_bad_config_field_is_a_value_error_naming_it(model_copy, changes, named):
    _edit_config(model_copy, **changes)
    with pytest.raises(ValueError, match=named) as error:
        _load(model_copy)
    assert "config.json" in str(error.value)


def test_a_config_that_is_not_an_object_is_named(model_copy):
    (model_copy / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config.json must hold a JSON object, got a list"):
        _load(model_copy)
    (model_copy / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"cannot read config.json"):
        _load(model_copy)


def test_a_huge_layer_count_is_refused_against_the_tensors_present_at_once(model_copy):
    _edit_config(model_copy, num_hidden_layers=10**8)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"config.json: missing tensors of model.layers.3 and more \(100000000 layers declared, the files hold tensors of 3\)"):
        _load(model_copy)
    assert time.perf_counter() - start < 1.0


def _shard(directory, weight_map):
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_a_weight_map_that_is_not_a_map_is_named(model_copy):
    _shard(model_copy, ["model.safetensors"])
    with pytest.raises(ValueError, match=r"model.safetensors.index.json: weight_map must map"):
        _load(model_copy)


@pytest.mark.parametrize("shard", ["../elsewhere/model.safetensors", "/etc/passwd", "link.safetensors"])
def test_a_shard_outside_the_model_directory_is_refused(model_copy, tmp_path, shard):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(model_copy / "model.safetensors", elsewhere / "model.safetensors")
    (model_copy / "link.safetensors").symlink_to(elsewhere / "model.safetensors")
    _shard(model_copy, {"model.embed_tokens.weight": shard})
    with pytest.raises(ValueError, match=r"names shards outside the model directory"):
        _load(model_copy)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_integer_and_bool_weights_are_refused_not_cast(model_copy, dtype):
    weights = load_file(str(model_copy / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"].to(dtype)
    save_file(weights, str(model_copy / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model.safetensors: tensor model.norm.weight is (I64|BOOL); weights must be one of"):
        _load(model_copy)


@pytest.fixture(scope="module")
def tiny_gguf_source(tiny_llama_dir):
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    config["rope_parameters"] = {"rope_theta": 10000.0}
    return config, load_file(str(tiny_llama_dir / "model.safetensors"))


def _gguf_with(tmp_path, source, **fields):
    """A tiny Llama GGUF whose metadata ``fields`` (key -> (value, GGUFValueType)) are replaced."""
    config, state = source
    path = tmp_path / "model.gguf"
    original = gguf.GGUFWriter.add_key_value

    def add_key_value(writer, key, value, vtype, sub_type=None):
        if key in fields:
            value, vtype = fields.pop(key)
            sub_type = gguf.GGUFValueType.STRING if vtype == gguf.GGUFValueType.ARRAY else None
        original(writer, key, value, vtype, sub_type)

    gguf.GGUFWriter.add_key_value = add_key_value
    try:
        write_gguf(path, "llama", config, state)
    finally:
        gguf.GGUFWriter.add_key_value = original
    assert not fields, f"not written: {fields}"
    return path


F32, U32, STR, ARR = gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.UINT32, gguf.GGUFValueType.STRING, gguf.GGUFValueType.ARRAY


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"llama.attention.head_count": (0, U32)}, "llama.attention.head_count"),
        ({"llama.block_count": (2.7, F32)}, "llama.block_count"),
        ({"llama.block_count": ("3", STR)}, "llama.block_count"),
        ({"llama.rope.freq_base": (-1.0, F32)}, "llama.rope.freq_base"),
        ({"general.architecture": (["llama"], ARR)}, "architecture"),
        ({"llama.context_length": (10**9, U32)}, r"llama.context_length is 1000000000, over the 2097152 positions"),
    ],
)
def test_bad_gguf_metadata_is_a_value_error_naming_the_key(tmp_path, tiny_gguf_source, fields, named):
    path = _gguf_with(tmp_path, tiny_gguf_source, **fields)
    with pytest.raises(ValueError, match=named) as error:
        _load(path)
    assert "model.gguf" in str(error.value)


def test_a_huge_gguf_layer_count_is_refused_against_the_tensors_present(tmp_path, tiny_gguf_source):
    path = _gguf_with(tmp_path, tiny_gguf_source, **{"llama.block_count": (10**8, U32)})
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"model.gguf: missing tensors of model.layers.3 and more \(100000000 layers declared, the files hold tensors of 3\)"):
        _load(path)
    assert time.perf_counter() - start < 1.0


@contextlib.contextmanager
def _as_another_user():
    """This process without root's power to read any file (its effective ids are nobody's), so
    that a file with mode 000 is unreadable, as it is for everyone but root; as is, without root."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@pytest.fixture
def readable_copy(tiny_chat_dir, tiny_gguf_source):
    """The tiny chat model and a GGUF of it in a directory anyone may enter (pytest's are root's)."""
    base = Path(tempfile.mkdtemp(prefix="rayk-unreadable-"))
    try:
        base.chmod(0o755)
        model = base / "model"
        shutil.copytree(tiny_chat_dir, model)
        _gguf_with(base, tiny_gguf_source)
        for path in [model, *model.iterdir(), base / "model.gguf"]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        _load(model)  # imports everything a load needs while they can be read
        yield base
    finally:
        shutil.rmtree(base)


@pytest.mark.parametrize("unreadable", ["model/config.json", "model/model.safetensors", "model/tokenizer.json", "model", "model.gguf"])
def test_an_unreadable_model_file_is_named_with_what_happened(readable_copy, unreadable):
    target = readable_copy / unreadable
    target.chmod(0o000)
    path = readable_copy / ("model.gguf" if unreadable == "model.gguf" else "model")
    with _as_another_user(), pytest.raises(ValueError) as error:
        _load(path)
    message = str(error.value)
    assert target.name in message and "permission denied" in message.lower(), message
    assert "no such file" not in message.lower() and "does not exist" not in message, message
