"""Manual memory control: warm, evict, pin, offload, prefetch, budgets, policies, snapshots.
Every served output still equals transformers' greedy output."""

from __future__ import annotations

import pytest

import rayk
from rayk.cache.policies import LRUPolicy
from tests.conftest import BLOCK_SIZE, hf_greedy, random_prompts

GREEDY = rayk.SamplingParams(temperature=0, max_tokens=4)
SYSTEM = random_prompts([48], seed=41)[0]
QUESTIONS = random_prompts([7, 9, 11], seed=42)
OTHERS = random_prompts([40, 44, 50, 46], seed=43)


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    return hf_greedy(tiny_llama_dir, [SYSTEM + q for q in QUESTIONS], 4)


def _ask(llm, i=0):
    return llm.generate(SYSTEM + QUESTIONS[i], GREEDY)[0]


def _tiered(model_dir, tmp_path, **options):
    return rayk.LLM(model_dir, block_size=BLOCK_SIZE, num_device_blocks=12, host_blocks=8, disk_dir=str(tmp_path / "kv"), **options)


def test_warm_caches_a_system_prompt_before_traffic(tiny_llama_dir, reference):
    llm = rayk.LLM(tiny_llama_dir, block_size=BLOCK_SIZE)
    assert _ask(llm, 0).num_cached_tokens == 0
    llm.evict(SYSTEM)
    llm.warm([SYSTEM])
    outputs = [_ask(llm, i) for i in range(3)]
    assert [o.token_ids for o in outputs] == reference
    assert [o.num_cached_tokens for o in outputs] == [48, 48, 48]


def test_evict_drops_a_prompt_from_every_tier(tiny_llama_dir, tmp_path, reference):
    llm = _tiered(tiny_llama_dir, tmp_path)
    llm.warm([SYSTEM])
    llm.offload(SYSTEM, tier="host")
    llm.warm([SYSTEM])
    dropped = llm.evict(SYSTEM)
    assert dropped["device"] == 3 and dropped["host"] == 3
    output = _ask(llm)
    assert output.num_cached_tokens == 0 and output.token_ids == reference[0]
    llm.close()


def test_offload_and_prefetch_move_a_prompt_between_tiers(tiny_llama_dir, tmp_path, reference):
    llm = _tiered(tiny_llama_dir, tmp_path)
    llm.warm([SYSTEM])
    assert llm.offload(SYSTEM, tier="host") == 3
    served = _ask(llm, 0)
    assert served.cached_tokens_by_tier["host"] == 48 and served.token_ids == reference[0]
    assert llm.offload(SYSTEM, tier="disk") == 3
    served = _ask(llm, 1)
    assert served.cached_tokens_by_tier["disk"] == 48 and served.token_ids == reference[1]
    llm.offload(SYSTEM, tier="disk")
    assert llm.prefetch(SYSTEM) == 3
    served = _ask(llm, 2)
    assert served.cached_tokens_by_tier["device"] == 48 and served.token_ids == reference[2]
    with pytest.raises(ValueError, match="offload tier must be 'host' or 'disk'"):
        llm.offload(SYSTEM, tier="gpu")
    llm.engine.kv_cache_manager.check_invariants()
    llm.close()


def test_pinned_system_prompt_survives_pressure_that_evicts_it_otherwise(tiny_llama_dir, reference):
    def run(pinned: bool):
        llm = rayk.LLM(tiny_llama_dir, block_size=BLOCK_SIZE, num_device_blocks=8, max_num_seqs=1)
        llm.warm([SYSTEM])
        if pinned:
            assert llm.pin(SYSTEM) == 3
        for prompt in OTHERS:
            llm.generate(prompt, GREEDY)
        output = _ask(llm)
        assert output.token_ids == reference[0]
        llm.engine.kv_cache_manager.check_invariants()
        return output.num_cached_tokens

    assert run(pinned=False) == 0
    assert run(pinned=True) == 48


def test_pinning_beyond_the_budget_is_refused(tiny_llama_dir):
    llm = rayk.LLM(tiny_llama_dir, block_size=BLOCK_SIZE, num_device_blocks=8)
    llm.warm([SYSTEM])
    assert llm.pin(SYSTEM) == 3
    llm.warm([OTHERS[0]])
    with pytest.raises(ValueError, match="pinning 2 more blocks would leave fewer than the 4 device blocks"):
        llm.pin(OTHERS[0])
    llm.unpin(SYSTEM)
    assert llm.pin(OTHERS[0]) == 2


def test_device_budget_sets_blocks_aside_and_gives_them_back(tiny_llama_dir, reference):
    llm = rayk.LLM(tiny_llama_dir, block_size=BLOCK_SIZE, num_device_blocks=16)
    bytes_per_block = llm.stats()["device_pool"]["bytes_per_block"]
    assert llm.set_budget("device", 10 * bytes_per_block) == 10
    assert llm.stats()["device_pool"]["free_blocks"] == 10
    assert _ask(llm).token_ids == reference[0]
    llm.engine.kv_cache_manager.check_invariants()
    with pytest.raises(ValueError, match="holds 2 blocks; at least 8 are needed"):
        llm.set_budget("device", 2 * bytes_per_block)
    assert llm.set_budget("device", 100 * bytes_per_block) == 16
    assert llm.stats()["device_pool"]["free_blocks"] == 16
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match=f"num_bytes must be an int >= 0, got {bad!r}"):
            llm.engine.memory.set_budget("device", bad)
    assert llm.stats()["device_pool"]["free_blocks"] == 16


def test_disk_budget_evicts_files_down_to_it(tiny_llama_dir, tmp_path):
    llm = _tiered(tiny_llama_dir, tmp_path)
    for prompt in OTHERS:
        llm.warm([prompt])
    llm.offload(sum([llm.block_hashes(p) for p in OTHERS], []), tier="disk")
    before = llm.stats()["disk_tier"]
    assert before["cached_blocks"] >= 8
    llm.set_budget("disk", before["used_bytes"] // 2)
    after = llm.stats()["disk_tier"]
    assert after["used_bytes"] <= before["used_bytes"] // 2 and after["cached_blocks"] < before["cached_blocks"]
    llm.close()


def test_switching_eviction_policy_keeps_serving(tiny_llama_dir, reference):
    llm = rayk.LLM(tiny_llama_dir, block_size=BLOCK_SIZE, num_device_blocks=8, max_num_seqs=1)
    llm.warm([SYSTEM])
    llm.set_eviction_policy("lfu")
    llm.set_eviction_policy(LRUPolicy())
    assert _ask(llm).token_ids == reference[0]
    with pytest.raises(ValueError, match="eviction_policy must be"):
        llm.set_eviction_policy("fifo")


def test_a_saved_cache_loads_into_a_fresh_engine(tiny_llama_dir, tmp_path, reference):
    first = rayk.LLM(tiny_llama_dir, block_size=BLOCK_SIZE)
    first.warm([SYSTEM])
    assert first.save_cache(str(tmp_path / "snapshot")) == 3
    second = rayk.LLM(tiny_llama_dir, block_size=BLOCK_SIZE)
    assert second.load_cache(str(tmp_path / "snapshot")) == 3
    output = _ask(second)
    assert output.token_ids == reference[0] and output.cached_tokens_by_tier["device"] == 48
    with pytest.raises(ValueError, match="is not a directory"):
        second.load_cache(str(tmp_path / "missing"))


def test_a_pinned_prompt_can_be_unpinned_by_prompt_and_extended(tiny_llama_dir):
    llm = rayk.LLM(tiny_llama_dir, block_size=4, num_device_blocks=8)
    prompt = list(range(17))
    llm.warm([prompt])
    assert llm.pin(prompt) == 4
    # 18 tokens + 4 new need 6 blocks: 4 of them are the prompt's own pins, 4 blocks remain free.
    assert llm.generate(prompt + [5], GREEDY)[0].num_cached_tokens == 16
    llm.unpin(prompt)
    assert not llm.engine.pool.pinned


def test_pinning_a_chain_partly_on_the_host_pins_all_of_it(tiny_llama_dir, tmp_path):
    llm = _tiered(tiny_llama_dir, tmp_path)
    llm.warm([SYSTEM])
    keys = llm.block_hashes(SYSTEM)
    llm.offload(keys[1:], tier="host")
    assert llm.pin(SYSTEM) == 3
    assert all(k in llm.engine.pool.pinned for k in keys)
    llm.engine.kv_cache_manager.check_invariants()
    llm.close()


def test_offload_and_prefetch_count_what_they_placed_once_per_key(tiny_llama_dir):
    llm = rayk.LLM(tiny_llama_dir, block_size=BLOCK_SIZE, num_device_blocks=16, host_blocks=2)
    llm.warm([SYSTEM])
    keys = llm.block_hashes(SYSTEM)
    assert llm.offload(keys + keys, tier="host") == 2  # two host slots, no disk: one block is lost
    assert llm.prefetch(keys + keys) == 2


def test_another_models_snapshot_is_refused_and_left_alone(tiny_llama_dir, tiny_qwen3_dir, tmp_path):
    llama = rayk.LLM(tiny_llama_dir, block_size=BLOCK_SIZE)
    llama.warm([SYSTEM])
    llama.save_cache(str(tmp_path / "snapshot"))
    files = sorted((tmp_path / "snapshot").iterdir())
    qwen = rayk.LLM(tiny_qwen3_dir, block_size=BLOCK_SIZE)
    with pytest.raises(ValueError, match="holds 1 files written for another model, block size or KV layout"):
        qwen.load_cache(str(tmp_path / "snapshot"))
    with pytest.raises(ValueError, match="another model"):
        qwen.save_cache(str(tmp_path / "snapshot"))
    assert sorted((tmp_path / "snapshot").iterdir()) == files


def test_a_snapshot_larger_than_the_host_tier_keeps_its_prefixes(tiny_llama_dir, tmp_path, reference):
    first = rayk.LLM(tiny_llama_dir, block_size=BLOCK_SIZE)
    first.warm([SYSTEM + QUESTIONS[0] + OTHERS[0]])  # 95 tokens: 5 full blocks, the system prompt's 3 first
    assert first.save_cache(str(tmp_path / "snapshot")) == 5
    second = rayk.LLM(tiny_llama_dir, block_size=BLOCK_SIZE, host_blocks=3)
    assert second.load_cache(str(tmp_path / "snapshot")) == 3
    served = _ask(second)
    assert served.cached_tokens_by_tier["host"] == 48 and served.token_ids == reference[0]


def test_a_replica_reset_replaces_the_marks(tiny_llama_dir):
    llm = rayk.LLM(tiny_llama_dir, block_size=BLOCK_SIZE, eviction_policy="cluster_aware")
    memory = llm.engine.memory
    memory.mark_replicated([b"a" * 16, b"b" * 16], [])
    memory.mark_replicated([b"b" * 16, b"c" * 16], [], reset=True)
    assert memory.replicated == {b"b" * 16, b"c" * 16} == llm.engine.pool.policy.replicated
