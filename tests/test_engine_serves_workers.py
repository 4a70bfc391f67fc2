"""What the engine offers a cluster worker: streaming steps, numbered event batches with an
inventory, a burst computing a new prefix once, a cache built without a model, and close()."""

from __future__ import annotations

import pytest
import torch

import rayk
from rayk.cache.events import AllBlocksCleared, BlocksRemoved, BlocksStored
from rayk.cache.factory import build_tiered_cache
from rayk.cache.paged_kv import KVLayout
from rayk.config import CacheConfig
from tests.conftest import BLOCK_SIZE, hf_greedy, random_prompts

GREEDY = rayk.SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def _run_to_completion(engine) -> tuple[dict, dict]:
    """Steps until idle; returns (deltas per request, final output per request)."""
    deltas, outputs = {}, {}
    while engine.has_unfinished_requests():
        for delta in engine.step():
            deltas.setdefault(delta.request_id, []).append(delta)
            if delta.finished:
                outputs[delta.request_id] = delta.output
    return deltas, outputs


def test_every_step_streams_each_running_requests_new_tokens(tiny_llama_dir):
    engine = rayk.LLM(tiny_llama_dir, block_size=BLOCK_SIZE).engine
    prompts = random_prompts([5, 21], seed=3)
    ids = [engine.add_request(p, GREEDY) for p in prompts]
    first_step = engine.step()
    assert [d.request_id for d in first_step] == ids
    assert all(len(d.new_token_ids) == 1 and not d.finished for d in first_step)
    deltas, outputs = _run_to_completion(engine)
    for request_id, first in zip(ids, first_step):
        streamed = first.new_token_ids + [t for d in deltas[request_id] for t in d.new_token_ids]
        assert streamed == outputs[request_id].token_ids
        assert sum(d.finished for d in deltas[request_id]) == 1 and deltas[request_id][-1].finished


def test_streamed_text_adds_up_to_the_output_text_and_never_shows_a_stop_string(tiny_llama_dir):
    llm = rayk.LLM(tiny_llama_dir, block_size=BLOCK_SIZE)
    prompt = "The quick brown fox"
    reference = llm.generate(prompt, rayk.SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0].text
    stop = reference[9:12]
    engine = llm.engine
    engine.add_request(prompt, rayk.SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]))
    deltas, outputs = _run_to_completion(engine)
    [request_deltas] = deltas.values()
    [output] = outputs.values()
    assert "".join(d.new_text for d in request_deltas) == output.text == reference[: reference.index(stop)]


def test_event_batches_are_numbered_and_hold_prefix_chains(tiny_llama_dir):
    llm = rayk.LLM(tiny_llama_dir, block_size=BLOCK_SIZE)
    batches = []
    llm.engine.subscribe(batches.append)
    prompts = random_prompts([40, 36], seed=4)
    llm.generate(prompts, GREEDY)
    assert [b.seq for b in batches] == list(range(len(batches)))
    assert all(b.timestamp > 0 for b in batches)
    pool = llm.engine.pool
    for batch in batches:
        for event in batch.events:
            assert isinstance(event, BlocksStored) and event.tier == "device"
            chain = [event.parent_hash, *event.block_hashes]
            assert all(pool.parent_hashes[pool.cached[key]] == parent for parent, key in zip(chain, chain[1:]))
    stored = [k for b in batches for e in b.events for k in e.block_hashes]
    seq, inventory = llm.engine.inventory()
    assert seq == batches[-1].seq
    assert sorted(inventory["device"]) == sorted(stored)


def test_clearing_a_tier_is_one_event_and_the_inventory_follows(tiny_llama_dir, tmp_path):
    llm = rayk.LLM(tiny_llama_dir, block_size=BLOCK_SIZE, host_blocks=16, disk_dir=str(tmp_path))
    batches = []
    llm.engine.subscribe(batches.append)
    prompt = random_prompts([50], seed=5)[0]
    llm.generate(prompt, GREEDY)
    llm.offload(prompt, "disk")
    assert llm.reset_prefix_cache(["disk"])["disk"] == 3
    llm.generate(random_prompts([3], seed=6), GREEDY)  # a step publishes the pending events
    events = [e for b in batches for e in b.events]
    assert events[-1] == AllBlocksCleared("disk")
    assert not any(isinstance(e, BlocksRemoved) and e.tier == "disk" for e in events)
    seq, inventory = llm.engine.inventory()
    assert inventory["disk"] == [] and seq == batches[-1].seq
    with pytest.raises(ValueError, match="tiers must be"):
        llm.reset_prefix_cache("disk")


def test_a_burst_sharing_a_new_prefix_computes_it_once(tiny_model_dir):
    shared = random_prompts([55], seed=11)[0]
    questions = random_prompts([3, 7, 9, 12, 4, 6, 10, 2], seed=12)
    prompts = [shared + q for q in questions]
    llm = rayk.LLM(tiny_model_dir, block_size=BLOCK_SIZE)
    outputs = llm.generate(prompts, GREEDY)
    cached = sorted(o.num_cached_tokens for o in outputs)
    assert cached == [0] + [48] * 7  # 55 shared tokens: 3 full blocks, computed by one request
    assert [o.token_ids for o in outputs] == hf_greedy(tiny_model_dir, prompts, GREEDY.max_tokens)


def test_without_prefix_caching_a_burst_waits_for_nothing(tiny_llama_dir):
    shared = random_prompts([55], seed=11)[0]
    prompts = [shared + q for q in random_prompts([3, 7, 9], seed=12)]
    llm = rayk.LLM(tiny_llama_dir, block_size=BLOCK_SIZE, enable_prefix_caching=False)
    assert [o.num_cached_tokens for o in llm.generate(prompts, GREEDY)] == [0, 0, 0]
    assert llm.stats()["scheduler"]["steps"] == GREEDY.max_tokens


def test_a_cache_is_built_from_its_config_without_a_model(tmp_path):
    layout = KVLayout(num_layers=2, block_size=4, num_kv_heads=1, head_dim=8, dtype=torch.float32)
    cache = build_tiered_cache(CacheConfig(block_size=4, host_blocks=8, disk_dir=str(tmp_path)), layout, bytes(32), torch.device("cpu"), 16)
    assert cache.pool.num_blocks == 16 and cache.host.pool.num_blocks == 8 and cache.disk is not None
    assert cache.manager.kv_cache is cache.kv_cache
    assert cache.chain.inventory() == {"device": [], "host": [], "disk": []}
    cache.disk.close()


def test_a_closed_llm_refuses_every_call_and_has_spilled_its_cache(tiny_llama_dir, tmp_path):
    llm = rayk.LLM(tiny_llama_dir, block_size=BLOCK_SIZE, disk_dir=str(tmp_path))
    prompt = random_prompts([40], seed=13)[0]
    llm.generate(prompt, GREEDY)
    llm.close()
    llm.close()  # a second close is a no-op
    for call in (lambda: llm.generate(prompt, GREEDY), llm.stats, lambda: llm.evict(prompt), lambda: llm.engine.step()):
        with pytest.raises(RuntimeError, match="closed"):
            call()
    reopened = rayk.LLM(tiny_llama_dir, block_size=BLOCK_SIZE, disk_dir=str(tmp_path))
    assert reopened.generate(prompt, GREEDY)[0].cached_tokens_by_tier["disk"] == 32
