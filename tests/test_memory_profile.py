"""The memory profile's numbers equal hand-computed ones; lifecycles add up; the profiler's
Chrome trace and HTML report hold what happened."""

from __future__ import annotations

import json

import rayk
from tests.conftest import BLOCK_SIZE, random_prompts

GREEDY = rayk.SamplingParams(temperature=0, max_tokens=5)


def test_profile_matches_a_hand_computed_layout(tiny_llama_dir):
    # Tiny Llama: 3 layers, 2 KV heads of 16 dims, float32, 16-token blocks.
    bytes_per_token = 2 * 3 * 2 * 16 * 4
    bytes_per_block = bytes_per_token * BLOCK_SIZE
    engine = rayk.LLM(tiny_llama_dir, block_size=BLOCK_SIZE, num_device_blocks=10).engine
    engine.add_request(list(range(20)), GREEDY)
    engine.add_request(list(range(100, 105)), GREEDY)
    engine.step()  # both prompts prefilled: 2 blocks + 1 block, 20 + 5 token slots
    device = engine.memory_profile()["device"]
    assert device["bytes_per_token"] == bytes_per_token and device["bytes_per_block"] == bytes_per_block
    assert device["total_bytes"] == 10 * bytes_per_block
    assert device["used_bytes"] == 3 * bytes_per_block and device["free_bytes"] == 7 * bytes_per_block
    assert device["physical_blocks"] == {"total": 10, "referenced": 3, "free": 7, "cached": 1, "pinned": 0, "reserved": 0}
    assert device["logical_blocks"] == 3 and device["active_sequences"] == 2 and device["total_tokens"] == 25
    assert device["internal_fragmentation"] == {"unused_slots": (32 - 20) + (16 - 5), "fraction": 23 / 48}
    assert device["external_fragmentation"] == {"free_runs": 1, "largest_free_run": 7, "run_length_histogram": {7: 1}, "index": 0.0}
    assert device["page_table_bytes"] == 3 * 4
    assert device["allocator_overhead_bytes"] > 0
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.memory_profile()["device"]["physical_blocks"]["referenced"] == 0


def test_the_idle_buffers_kept_for_disk_reads_and_writes_and_exports_are_counted(tiny_llama_dir, tmp_path):
    llm = rayk.LLM(tiny_llama_dir, block_size=BLOCK_SIZE, num_device_blocks=8, disk_dir=str(tmp_path))
    prompt = random_prompts((40,), seed=52)[0]
    llm.generate(prompt, GREEDY)
    assert llm.memory_profile()["recycled_host_bytes"] == {"disk_reads": 0, "disk_writes": 0, "exports": 0}
    keys = llm.engine.block_hashes(prompt)
    batch, num_blocks = llm.engine.cache.chain.export(keys)
    del batch
    bytes_per_block = 2 * 3 * 2 * 16 * 4 * BLOCK_SIZE
    assert llm.memory_profile()["recycled_host_bytes"]["exports"] > num_blocks * bytes_per_block
    llm.offload(keys, tier="disk")
    llm.engine.disk.flush()
    assert llm.memory_profile()["recycled_host_bytes"]["disk_writes"] == len(keys) * bytes_per_block  # gathered into it, written
    llm.generate(prompt, GREEDY)  # its prefix is read back from disk
    recycled = llm.memory_profile()["recycled_host_bytes"]
    assert recycled["disk_reads"] == (len(prompt) // BLOCK_SIZE) * bytes_per_block
    llm.close()


def test_free_runs_show_external_fragmentation(tiny_llama_dir):
    engine = rayk.LLM(tiny_llama_dir, block_size=BLOCK_SIZE, num_device_blocks=10, enable_prefix_caching=False).engine
    for i in range(3):
        engine.add_request(list(range(i * 40, i * 40 + 30)), rayk.SamplingParams(temperature=0, max_tokens=1 + 20 * (i % 2)))
    engine.step()
    engine.step()  # requests 0 and 2 finished after one token; 1 keeps blocks 2-3 in the middle
    frag = engine.memory_profile()["device"]["external_fragmentation"]
    # Free: blocks 0-1 and 4-9 (request 2's blocks 4-5 join the never-used 6-9).
    assert frag == {"free_runs": 2, "largest_free_run": 6, "run_length_histogram": {2: 1, 6: 1}, "index": 1 - 6 / 8}


def test_lifecycle_samples_add_up_under_eviction(tiny_llama_dir):
    llm = rayk.LLM(tiny_llama_dir, block_size=BLOCK_SIZE, num_device_blocks=8, lifecycle_sample_rate=1.0, max_num_seqs=1)
    prompts = random_prompts((40, 45, 50, 40), seed=51)
    for prompt in prompts + prompts[:1]:
        llm.generate(prompt, GREEDY)
    life = llm.memory_profile()["device"]["lifecycle"]
    assert life["sampled_blocks"] > life["evicted"] > 0
    assert life["lifetime_s"]["count"] == life["idle_before_eviction_s"]["count"] == life["evicted"]
    assert life["lifetime_s"]["max"] >= life["idle_before_eviction_s"]["max"] >= 0
    assert 0 < life["evicted_before_reuse"] <= life["evicted"]


def test_profiler_exports_a_chrome_trace_and_an_html_report(tiny_llama_dir, tmp_path):
    llm = rayk.LLM(tiny_llama_dir, block_size=BLOCK_SIZE, num_device_blocks=8, host_blocks=8, max_num_seqs=1)
    prompts = random_prompts((40, 45, 50), seed=52)
    with llm.profile() as prof:
        for prompt in prompts + prompts[::-1]:
            llm.generate(prompt, GREEDY)
    prof.export_chrome_trace(tmp_path / "trace.json")
    trace = json.loads((tmp_path / "trace.json").read_text())
    names = {e["name"] for e in trace["traceEvents"]}
    assert {"step", "demote device->host", "onload host->device", "evict", "occupancy (cached blocks)", "hit rate"} <= names
    steps = [e for e in trace["traceEvents"] if e["name"] == "step"]
    assert len(steps) == llm.stats()["scheduler"]["steps"] and all(e["dur"] > 0 for e in steps)
    prof.export_html(tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text()
    assert page.count("<svg") == 3 and "Cached blocks per tier" in page and "<rect" in page
    assert llm.engine.step_observers == []
