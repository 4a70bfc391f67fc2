"""The CUDA paths give the numbers of the CPU paths: Triton KV store, torch and flash_attn attention.

Skipped without CUDA; flash_attn tests also skip when flash-attn is not installed.
"""

from __future__ import annotations

import pytest
import torch

import rayk
from rayk.model.attention import flash_attn_available
from rayk.model.store_kvcache import store_kvcache_torch, store_kvcache_triton
from tests.conftest import hf_greedy, random_prompts

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
needs_flash_attn = pytest.mark.skipif(not flash_attn_available(), reason="needs flash-attn")


def test_triton_store_kernel_matches_index_copy_on_cuda():
    key, value = torch.randn(50, 2, 64, device="cuda"), torch.randn(50, 2, 64, device="cuda")
    slots = torch.randperm(16 * 32, device="cuda")[:50]
    caches = [torch.zeros(16, 32, 2, 64, device="cuda") for _ in range(4)]
    store_kvcache_torch(key, value, caches[0], caches[1], slots)
    store_kvcache_triton(key, value, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])


def test_torch_backend_on_cuda_matches_transformers(tiny_model_dir):
    prompts = random_prompts((5, 17, 40), seed=7)
    params = rayk.SamplingParams(temperature=0, max_tokens=12)
    llm = rayk.LLM(tiny_model_dir, device="cuda", dtype="float32", attention_backend="torch")
    llm.generate(prompts, params)
    assert [o.token_ids for o in llm.generate(prompts, params)] == hf_greedy(tiny_model_dir, prompts, 12)


@needs_flash_attn
def test_flash_attn_backend_agrees_with_torch_backend(tiny_model_dir):
    prompts = random_prompts((5, 200, 300), seed=7)
    params = rayk.SamplingParams(temperature=0, max_tokens=8)
    results = {}
    for backend in ("torch", "flash_attn"):
        llm = rayk.LLM(tiny_model_dir, device="cuda", dtype="bfloat16", block_size=256, attention_backend=backend)
        cold = llm.generate(prompts, params)
        warm = llm.generate(prompts, params)
        assert [o.token_ids for o in cold] == [o.token_ids for o in warm]
        results[backend] = [o.token_ids[:2] for o in cold]
    assert results["flash_attn"] == results["torch"]


def test_tiers_on_cuda_demote_through_the_copy_stream_and_match_transformers(tiny_model_dir, tmp_path):
    prompts = random_prompts((40, 50, 45, 60, 38, 55), seed=21)
    params = rayk.SamplingParams(temperature=0, max_tokens=6)
    reference = hf_greedy(tiny_model_dir, prompts, 6)
    llm = rayk.LLM(
        tiny_model_dir, device="cuda", dtype="float32", block_size=16, num_device_blocks=8, host_blocks=6,
        disk_dir=str(tmp_path / "kv"), max_num_seqs=2,
    )
    assert llm.engine.host.blocks.is_pinned()
    cold = [llm.generate(p, params)[0] for p in prompts]
    llm.engine.host.drain()
    llm.engine.disk.flush()
    warm = [llm.generate(p, params)[0] for p in prompts[::-1]][::-1]
    assert [o.token_ids for o in cold] == [o.token_ids for o in warm] == reference
    assert sum(o.cached_tokens_by_tier["host"] for o in warm) > 0
    llm.engine.kv_cache_manager.check_invariants()
    llm.close()
