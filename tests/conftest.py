"""Tiny random checkpoints written with transformers, greedy references computed by it, and
local multi-node Ray clusters on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import shutil

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import pytest
import torch

VOCAB_SIZE = 320
BLOCK_SIZE = 16


def _write_tokenizer(directory) -> None:
    """A small byte-level BPE trained on a few sentences, so string prompts work end to end."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = ["The quick brown fox jumps over the lazy dog.", "A paged KV cache serves prefixes once.", "rayk caches blocks."] * 20
    tokenizer.train_from_iterator(text, trainer)
    tokenizer.save(str(directory / "tokenizer.json"))


def _save(model, directory, with_tokenizer: bool = False):
    model.save_pretrained(directory)
    if with_tokenizer:
        _write_tokenizer(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """Llama with GQA, llama3 RoPE scaling and separate lm_head; weights large enough to vary tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.5,
        bos_token_id=None,
        eos_token_id=None,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    )
    return _save(LlamaForCausalLM(config).eval(), tmp_path_factory.mktemp("tiny_llama"), with_tokenizer=True)


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="session")
def tiny_chat_dir(tiny_llama_dir, tmp_path_factory):
    """``tiny_llama_dir`` with a chat template, as an instruct model has: what chat prompts, the
    CLI and the examples render through."""
    directory = tmp_path_factory.mktemp("tiny_chat")
    shutil.copytree(tiny_llama_dir, directory, dirs_exist_ok=True)
    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    return directory


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory):
    """Qwen3 with GQA, per-head q/k norms, head_dim != hidden/heads and tied embeddings."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(1)
    config = Qwen3Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=512,
        initializer_range=0.5,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,
    )
    return _save(Qwen3ForCausalLM(config).eval(), tmp_path_factory.mktemp("tiny_qwen3"))


@pytest.fixture(scope="session", params=["llama", "qwen3"])
def tiny_model_dir(request):
    return request.getfixturevalue(f"tiny_{request.param}_dir")


def hf_greedy(model_dir, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers' greedy continuation of each prompt, one at a time (no padding)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outputs = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False)
            outputs.append(ids[0, len(prompt) :].tolist())
    return outputs


def chain_records(num_blocks: int):
    """``num_blocks`` records of one prefix chain (4 tokens a block, made-up keys) and their KV in
    a 1-layer, 1-head, 8-dim layout (block i filled with i): blocks for a disk tier under test."""
    from rayk.cache.block_pool import BlockRecord
    from rayk.hashing import token_bytes

    records, parent = [], bytes(16)
    for i in range(num_blocks):
        key = bytes([i + 1]) * 16
        records.append(BlockRecord(i, key, parent, i, token_bytes([4 * i + j for j in range(4)])))
        parent = key
    blocks = torch.arange(num_blocks, dtype=torch.float32).view(1, 1, num_blocks, 1, 1, 1).expand(2, 1, num_blocks, 4, 1, 8).contiguous()
    return records, blocks


def random_prompts(lengths, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB_SIZE, (n,), generator=generator).tolist() for n in lengths]


@contextlib.contextmanager
def local_ray_nodes(namespace: str, head_cpus: int, *node_cpus: int):
    """A ``ray.cluster_utils.Cluster`` on 127.0.0.1 (a head with ``head_cpus`` and one more node
    per ``node_cpus``, each with its own object store), this process connected to it in
    ``namespace``; shut down on exit."""
    import ray
    from ray.cluster_utils import Cluster

    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": head_cpus})
    try:
        for cpus in node_cpus:
            nodes.add_node(num_cpus=cpus)
        nodes.wait_for_nodes()
        ray.init(address=nodes.address, namespace=namespace)
        try:
            yield nodes
        finally:
            ray.shutdown()
    finally:
        nodes.shutdown()
