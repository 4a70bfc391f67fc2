"""The tier chain's peer path, without Ray: one engine exports a prefix from whatever tier holds
it as one block batch, another engine stages it for a request, which is then served from the
"remote" tier with transformers' greedy tokens; damaged, foreign or stale batches cost a recompute,
never a wrong token, and leave nothing held."""

from __future__ import annotations

import pytest

import rayk
from rayk.cache import block_codec
from rayk.cache.block_codec import BlockBatchError
from tests.conftest import BLOCK_SIZE, hf_greedy, random_prompts

GREEDY = rayk.SamplingParams(temperature=0, max_tokens=6)
PROMPT_LEN = 5 * BLOCK_SIZE + 5  # 5 full blocks; the last prompt token is always computed


@pytest.fixture(scope="module")
def prompt():
    return random_prompts([PROMPT_LEN], seed=41)[0]


@pytest.fixture(scope="module")
def reference(tiny_llama_dir, prompt):
    return hf_greedy(tiny_llama_dir, [prompt], GREEDY.max_tokens)[0]


def _llm(model_dir, **options):
    return rayk.LLM(model_dir, block_size=BLOCK_SIZE, num_device_blocks=32, **options)


def _serve(engine, prompt, remote=None):
    request_id = engine.add_validated_request(prompt, GREEDY, remote=remote)
    while engine.has_unfinished_requests():
        for delta in engine.step():
            if delta.finished and delta.request_id == request_id:
                return delta.output


def _export(llm, prompt):
    return llm.engine.cache.chain.export(llm.engine.block_hashes(prompt))[0]


@pytest.mark.parametrize("source_tier", ["device", "host", "disk"])
def test_a_prefix_exported_from_any_tier_serves_another_engine_from_the_remote_tier(tiny_llama_dir, tmp_path, prompt, reference, source_tier):
    source = _llm(tiny_llama_dir, host_blocks=16, disk_dir=str(tmp_path / "kv"))
    source.generate(prompt, GREEDY)
    if source_tier != "device":
        source.offload(prompt, tier=source_tier)
        assert source.locate(prompt)[source_tier] == 5 and source.locate(prompt)["device"] == 0
    buffer = _export(source, prompt)
    assert len(block_codec.read_header(buffer, source.engine.fingerprint, source.engine.kv_cache.layout).records) == 5
    target = _llm(tiny_llama_dir)
    output = _serve(target.engine, prompt, block_codec.decode(buffer, target.engine.fingerprint, target.engine.kv_cache.layout))
    assert output.token_ids == reference
    assert output.cached_tokens_by_tier["remote"] == output.num_cached_tokens == 5 * BLOCK_SIZE
    assert target.generate(prompt, GREEDY)[0].cached_tokens_by_tier["device"] == 5 * BLOCK_SIZE  # published on arrival
    assert not target.engine.cache.chain.remote
    target.engine.kv_cache_manager.check_invariants()
    source.close()


def test_an_export_stops_at_the_first_block_it_does_not_hold(tiny_llama_dir, prompt):
    source = _llm(tiny_llama_dir)
    source.generate(prompt, GREEDY)
    keys = source.engine.block_hashes(prompt)
    source.evict(keys[2:3])
    layout = source.engine.kv_cache.layout
    buffer, num_blocks = source.engine.cache.chain.export(keys)
    header = block_codec.read_header(buffer, source.engine.fingerprint, layout)
    assert [r.key for r in header.records] == keys[:2] and num_blocks == 2
    empty, num_blocks = source.engine.cache.chain.export([b"x" * 16])
    assert num_blocks == 0
    assert block_codec.read_header(empty, source.engine.fingerprint, layout).records == ()


def test_an_export_fills_the_memory_of_an_earlier_batch_only_once_that_batch_is_dropped(tiny_llama_dir, prompt):
    source = _llm(tiny_llama_dir)
    source.generate(prompt, GREEDY)
    first = _export(source, prompt)
    held = _export(source, prompt)
    address = first.ctypes.data
    assert held.ctypes.data != address and bytes(held) == bytes(first)
    del first
    again = _export(source, prompt)
    assert again.ctypes.data == address and bytes(again) == bytes(held)
    source.close()


def test_a_damaged_block_is_left_out_and_the_rest_of_the_prefix_recomputed(tiny_llama_dir, prompt, reference):
    source, target = _llm(tiny_llama_dir), _llm(tiny_llama_dir)
    source.generate(prompt, GREEDY)
    buffer = _export(source, prompt)
    layout = target.engine.kv_cache.layout
    start, end = block_codec.read_header(buffer, target.engine.fingerprint, layout).block_range(2)
    buffer[start + 3] ^= 0x55
    decoded = block_codec.decode(buffer, target.engine.fingerprint, layout)
    assert decoded.num_rejected == 1
    output = _serve(target.engine, prompt, decoded)
    assert output.token_ids == reference
    assert output.cached_tokens_by_tier["remote"] == 2 * BLOCK_SIZE  # the chain breaks at the damaged block
    target.engine.kv_cache_manager.check_invariants()
    assert not target.engine.cache.chain.remote


def test_another_models_batch_is_refused_by_name(tiny_llama_dir, tiny_qwen3_dir, prompt):
    source, target = _llm(tiny_llama_dir), _llm(tiny_qwen3_dir)
    source.generate(prompt, GREEDY)
    with pytest.raises(BlockBatchError, match="fingerprint"):
        block_codec.decode(_export(source, prompt), target.engine.fingerprint, target.engine.kv_cache.layout)


def test_blocks_staged_for_an_aborted_request_are_dropped(tiny_llama_dir, prompt):
    source, target = _llm(tiny_llama_dir), _llm(tiny_llama_dir)
    source.generate(prompt, GREEDY)
    decoded = block_codec.decode(_export(source, prompt), target.engine.fingerprint, target.engine.kv_cache.layout)
    request_id = target.engine.add_validated_request(prompt, GREEDY, remote=decoded)
    assert target.engine.cache.chain.remote
    target.engine.abort_request(request_id)
    assert not target.engine.cache.chain.remote
    target.engine.kv_cache_manager.check_invariants()


def test_staged_blocks_serve_only_their_own_request(tiny_llama_dir, prompt, reference):
    source, target = _llm(tiny_llama_dir), _llm(tiny_llama_dir)
    source.generate(prompt, GREEDY)
    decoded = block_codec.decode(_export(source, prompt), target.engine.fingerprint, target.engine.kv_cache.layout)
    engine = target.engine
    other = engine.add_validated_request(prompt, GREEDY)
    staged = engine.add_validated_request(prompt, GREEDY, remote=decoded)
    outputs = {}
    while engine.has_unfinished_requests():
        for delta in engine.step():
            if delta.finished:
                outputs[delta.request_id] = delta.output
    assert outputs[other].cached_tokens_by_tier["remote"] == 0
    assert outputs[staged].cached_tokens_by_tier["remote"] == 5 * BLOCK_SIZE
    assert outputs[staged].token_ids == outputs[other].token_ids == reference
