"""Checkpoints load from one file or from shards named by an index, with the same tokens."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file, save_file

import rayk
from rayk.model.loader import load_model
from tests.conftest import hf_greedy, random_prompts


def test_a_sharded_checkpoint_with_an_index_serves_the_same_tokens(tiny_llama_dir, tmp_path):
    tensors = load_file(str(tiny_llama_dir / "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, str(tmp_path / shard), metadata={"format": "pt"})
        weight_map |= {n: shard for n in shard_names}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    prompts = random_prompts((8, 21), seed=6)
    outputs = rayk.LLM(str(tmp_path)).generate(prompts, rayk.SamplingParams(temperature=0, max_tokens=8))
    assert [o.token_ids for o in outputs] == hf_greedy(tiny_llama_dir, prompts, 8)


def test_weights_load_in_the_requested_dtype_and_identity_tells_checkpoints_apart(tiny_llama_dir, tiny_qwen3_dir):
    bf16 = load_model(tiny_llama_dir, torch.bfloat16, torch.device("cpu"))
    assert all(p.dtype == torch.bfloat16 for p in bf16.model.parameters())
    again = load_model(tiny_llama_dir, torch.float32, torch.device("cpu"))
    other = load_model(tiny_qwen3_dir, torch.float32, torch.device("cpu"))
    assert bf16.weights_identity == again.weights_identity != other.weights_identity


def test_bfloat16_engine_runs_and_mostly_agrees_with_float32(tiny_llama_dir):
    prompts = random_prompts((10, 30), seed=8)
    params = rayk.SamplingParams(temperature=0, max_tokens=4)
    fp32 = rayk.LLM(tiny_llama_dir).generate(prompts, params)
    bf16 = rayk.LLM(tiny_llama_dir, dtype="bfloat16").generate(prompts, params)
    assert [o.token_ids[0] for o in bf16] == [o.token_ids[0] for o in fp32]
