"""Greedy generation through rayk equals transformers' greedy generation, token for token:
cold, from the prefix cache, with prefixes that end mid-block, under preemption, and with
chunked prefill."""

from __future__ import annotations

import pytest

import rayk
from tests.conftest import BLOCK_SIZE, hf_greedy, random_prompts

MAX_NEW = 12
GREEDY = rayk.SamplingParams(temperature=0, max_tokens=MAX_NEW)
LENGTHS = (1, 5, 16, 17, 40, 33)


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(LENGTHS, seed=7)


@pytest.fixture(scope="module")
def reference(tiny_model_dir, prompts):
    return hf_greedy(tiny_model_dir, prompts, MAX_NEW)


def _token_ids(outputs):
    return [o.token_ids for o in outputs]


def test_greedy_batch_of_mixed_lengths_matches_transformers(tiny_model_dir, prompts, reference):
    llm = rayk.LLM(tiny_model_dir, block_size=BLOCK_SIZE)
    outputs = llm.generate(prompts, GREEDY)
    assert _token_ids(outputs) == reference
    assert [o.prompt_token_ids for o in outputs] == prompts
    assert all(o.finish_reason == "length" and o.num_cached_tokens == 0 for o in outputs)
    assert all(0 < o.ttft_s <= o.latency_s for o in outputs)
    llm.engine.kv_cache_manager.check_invariants()


def test_second_pass_is_served_from_cache_with_identical_tokens(tiny_model_dir, prompts, reference):
    llm = rayk.LLM(tiny_model_dir, block_size=BLOCK_SIZE)
    cold = llm.generate(prompts, GREEDY)
    warm = llm.generate(prompts, GREEDY)
    assert _token_ids(warm) == _token_ids(cold) == reference
    # Full blocks are served, but never the last prompt token: at least one token is computed.
    assert [o.num_cached_tokens for o in warm] == [(n - 1) // BLOCK_SIZE * BLOCK_SIZE for n in LENGTHS]
    assert [o.num_cached_tokens for o in cold] == [0] * len(LENGTHS)
    stats = llm.stats()["prefix_cache"]
    assert stats["hit_tokens"] == sum(o.num_cached_tokens for o in warm)
    assert stats["query_tokens"] == 2 * sum(LENGTHS)
    assert stats["miss_tokens"] == stats["query_tokens"] - stats["hit_tokens"]


def test_prompts_sharing_a_prefix_that_ends_mid_block_reuse_its_full_blocks(tiny_model_dir):
    shared = random_prompts([37], seed=11)[0]
    tails = random_prompts([3, 9, 20], seed=12)
    prompts = [shared + tail for tail in tails]
    reference = hf_greedy(tiny_model_dir, prompts, MAX_NEW)
    llm = rayk.LLM(tiny_model_dir, block_size=BLOCK_SIZE)
    first = llm.generate(prompts[0], GREEDY)[0]
    rest = llm.generate(prompts[1:], GREEDY)
    assert [first.token_ids] + _token_ids(rest) == reference
    assert first.num_cached_tokens == 0
    assert [o.num_cached_tokens for o in rest] == [32, 32]


def test_cache_off_computes_everything_and_gives_the_same_tokens(tiny_model_dir, prompts, reference):
    llm = rayk.LLM(tiny_model_dir, block_size=BLOCK_SIZE, enable_prefix_caching=False)
    llm.generate(prompts, GREEDY)
    again = llm.generate(prompts, GREEDY)
    assert _token_ids(again) == reference
    assert all(o.num_cached_tokens == 0 for o in again)


def test_pool_small_enough_to_preempt_gives_identical_tokens(tiny_model_dir, prompts, reference):
    # 6 prompts need up to 4 blocks each by the end; 8 blocks force running requests out.
    llm = rayk.LLM(tiny_model_dir, block_size=BLOCK_SIZE, num_device_blocks=8)
    outputs = llm.generate(prompts, GREEDY)
    assert _token_ids(outputs) == reference
    assert llm.stats()["scheduler"]["preemptions"] > 0
    llm.engine.kv_cache_manager.check_invariants()
    assert llm.stats()["device_pool"]["used_blocks"] == 0


def test_chunked_prefill_under_a_small_token_budget_gives_identical_tokens(tiny_model_dir, prompts, reference):
    llm = rayk.LLM(tiny_model_dir, block_size=BLOCK_SIZE, max_num_batched_tokens=7, max_num_seqs=3)
    assert _token_ids(llm.generate(prompts, GREEDY)) == reference


@pytest.mark.parametrize("block_size", [1, 8, 32])
def test_other_block_sizes_give_identical_tokens(tiny_llama_dir, block_size):
    prompts = random_prompts((3, 30, 64), seed=5)
    reference = hf_greedy(tiny_llama_dir, prompts, MAX_NEW)
    llm = rayk.LLM(tiny_llama_dir, block_size=block_size)
    llm.generate(prompts, GREEDY)
    assert _token_ids(llm.generate(prompts, GREEDY)) == reference


def test_sha256_keys_serve_the_same_tokens(tiny_llama_dir):
    prompts = random_prompts((20, 35), seed=3)
    reference = hf_greedy(tiny_llama_dir, prompts, MAX_NEW)
    llm = rayk.LLM(tiny_llama_dir, block_size=BLOCK_SIZE, hash_algorithm="sha256")
    llm.generate(prompts, GREEDY)
    warm = llm.generate(prompts, GREEDY)
    assert _token_ids(warm) == reference
    assert [o.num_cached_tokens for o in warm] == [16, 32]


def test_cache_salt_isolates_tenants(tiny_llama_dir):
    prompt = random_prompts([40], seed=4)[0]
    llm = rayk.LLM(tiny_llama_dir, block_size=BLOCK_SIZE)
    llm.generate(prompt, GREEDY, cache_salt="tenant-a")
    assert llm.generate(prompt, GREEDY, cache_salt="tenant-b")[0].num_cached_tokens == 0
    assert llm.generate(prompt, GREEDY)[0].num_cached_tokens == 0
    assert llm.generate(prompt, GREEDY, cache_salt="tenant-a")[0].num_cached_tokens == 32


def test_string_prompts_are_tokenized_and_outputs_detokenized(tiny_llama_dir):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tiny_llama_dir / "tokenizer.json"))
    text = "The quick brown fox"
    llm = rayk.LLM(tiny_llama_dir, block_size=BLOCK_SIZE)
    output = llm.generate(text, GREEDY)[0]
    assert output.prompt_token_ids == tokenizer.encode(text).ids
    assert output.token_ids == hf_greedy(tiny_llama_dir, [output.prompt_token_ids], MAX_NEW)[0]
    assert output.text == tokenizer.decode(output.token_ids)


def test_kv_events_announce_stored_blocks(tiny_llama_dir):
    from rayk.cache.events import BlocksStored

    batches = []
    llm = rayk.LLM(tiny_llama_dir, block_size=BLOCK_SIZE)
    llm.engine.subscribe(batches.append)
    prompt = random_prompts([40], seed=9)[0]
    output = llm.generate(prompt, GREEDY)[0]
    stored = [h for batch in batches for e in batch.events if isinstance(e, BlocksStored) for h in e.block_hashes]
    # 40 prompt + 11 output tokens have KV (the last sampled token never ran): 3 full blocks.
    assert stored == llm.engine.kv_cache_manager.hasher.hash_blocks((prompt + output.token_ids)[:48])
    assert all(e.tier == "device" for batch in batches for e in batch.events)
    assert [batch.seq for batch in batches] == list(range(len(batches)))


def test_preemption_does_not_inflate_prefix_cache_statistics(tiny_llama_dir):
    prompts = random_prompts(LENGTHS, seed=7)
    llm = rayk.LLM(tiny_llama_dir, block_size=BLOCK_SIZE, num_device_blocks=8)
    llm.generate(prompts, GREEDY)
    stats = llm.stats()
    assert stats["scheduler"]["preemptions"] > 0
    assert stats["prefix_cache"]["query_tokens"] == sum(LENGTHS)


def test_a_long_prefill_joining_running_decodes_gives_identical_tokens(tiny_model_dir):
    short, long_prompt = random_prompts((5, 9, 12), seed=31), random_prompts([300], seed=32)[0]
    reference = hf_greedy(tiny_model_dir, short + [long_prompt], MAX_NEW)
    engine = rayk.LLM(tiny_model_dir, block_size=BLOCK_SIZE).engine
    ids = [engine.add_request(p, GREEDY) for p in short]
    outputs = {}
    for _ in range(3):
        outputs |= {d.request_id: d.output for d in engine.step() if d.finished}
    ids.append(engine.add_request(long_prompt, GREEDY))
    # The next step prefills 300 tokens beside three decodes: separate attention groups.
    while engine.has_unfinished_requests():
        outputs |= {d.request_id: d.output for d in engine.step() if d.finished}
    assert [outputs[i].token_ids for i in ids] == reference
