"""The worker's engine loop and event reporter, without Ray: a thread steps the engine while
requests and control calls arrive from other threads, and reports reach a plain function."""

from __future__ import annotations

import threading
import time

import pytest

import rayk
from rayk.cache.events import BlocksStored
from rayk.cluster.engine_loop import EngineLoop
from rayk.cluster.reporting import EventReporter
from tests.conftest import BLOCK_SIZE, hf_greedy, random_prompts

GREEDY = rayk.SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture()
def loop(tiny_llama_dir):
    loop = EngineLoop(rayk.LLM(tiny_llama_dir, block_size=BLOCK_SIZE)._engine)
    yield loop
    loop.close()


def _submit(loop, prompt, request_id):
    """Submits a request; returns (deltas list, event set when it finished or failed)."""
    deltas, done = [], threading.Event()

    def on_delta(delta):
        deltas.append(delta)
        if isinstance(delta, BaseException) or delta.finished:
            done.set()

    loop.submit(prompt, GREEDY, None, request_id, on_delta)
    return deltas, done


def test_requests_from_many_threads_stream_and_match_transformers(loop, tiny_llama_dir):
    prompts = random_prompts([9, 20, 33, 17], seed=21)
    results = [None] * len(prompts)

    def client(i):
        deltas, done = _submit(loop, prompts[i], f"r{i}")
        assert done.wait(60)
        results[i] = deltas

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reference = hf_greedy(tiny_llama_dir, prompts, GREEDY.max_tokens)
    for deltas, expected in zip(results, reference):
        assert [t for d in deltas for t in d.new_token_ids] == expected == deltas[-1].output.token_ids


def test_a_refused_request_gets_its_error_and_the_loop_keeps_serving(loop):
    deltas, done = _submit(loop, [10**6], "bad")
    assert done.wait(10) and isinstance(deltas[0], ValueError) and "vocabulary" in str(deltas[0])
    deltas, done = _submit(loop, [1, 2, 3], "good")
    assert done.wait(30) and deltas[-1].finished


def test_calls_run_between_steps_and_reports_carry_batches_load_and_received_ids(loop):
    prompt = random_prompts([40], seed=22)[0]
    _, done = _submit(loop, prompt, "a")
    assert done.wait(30)
    batches, load, received = loop.take_report()
    assert received == ["a"] and load.num_running == 0 and load.num_waiting == 0
    stored = [k for b in batches for e in b.events if isinstance(e, BlocksStored) for k in e.block_hashes]
    seq, inventory = loop.call(lambda engine: engine.inventory()).result(10)
    assert seq == batches[-1].seq and sorted(inventory["device"]) == sorted(stored)
    assert loop.take_report()[0] == []


def test_closing_the_loop_fails_unfinished_requests_and_refuses_new_ones(tiny_llama_dir):
    loop = EngineLoop(rayk.LLM(tiny_llama_dir, block_size=BLOCK_SIZE)._engine)
    long = rayk.SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    deltas, done = [], threading.Event()
    loop.submit([1, 2, 3], long, None, "long", lambda d: (deltas.append(d), isinstance(d, BaseException) and done.set()))
    time.sleep(0.2)
    loop.close()
    assert done.wait(5) and "shut down" in str(deltas[-1])
    with pytest.raises(RuntimeError, match="closed"):
        loop.submit([1], GREEDY, None, "late", lambda d: None)


def test_the_reporter_sends_batches_in_order_heartbeats_and_the_inventory_on_request(loop):
    reports, inventories = [], []
    ask_inventory = threading.Event()
    ask_inventory.set()  # the first report is answered like a coordinator that never saw the worker

    def send_report(batches, load, received):
        reports.append((list(batches), load, list(received)))
        wanted = ask_inventory.is_set()
        ask_inventory.clear()
        return wanted

    reporter = EventReporter(loop, send_report, lambda seq, inventory: inventories.append((seq, inventory)), interval_s=0.01, heartbeat_s=0.1)
    try:
        _, done = _submit(loop, random_prompts([40], seed=23)[0], "a")
        assert done.wait(30)
        deadline = time.monotonic() + 5
        while (len(reports) < 5 or not inventories) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        reporter.close()
    seqs = [b.seq for batches, _, _ in reports for b in batches]
    assert seqs == list(range(len(seqs))) and seqs
    assert [r for _, _, received in reports for r in received] == ["a"]
    assert len(reports) >= 5  # heartbeats keep coming when nothing happens
    assert inventories and inventories[0][0] >= -1


def test_a_failed_report_is_sent_again_with_the_next(loop):
    delivered, calls = [], []

    def flaky(batches, load, received):
        calls.append(len(batches))
        if len(calls) == 1:
            raise ConnectionError("coordinator restarting")
        delivered.extend(b.seq for b in batches)
        return False

    _, done = _submit(loop, random_prompts([40], seed=25)[0], "a")
    assert done.wait(30)  # its event batches wait for the reporter
    reporter = EventReporter(loop, flaky, lambda seq, inventory: None, interval_s=0.01, heartbeat_s=0.05)
    try:
        deadline = time.monotonic() + 5
        while len(calls) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        reporter.close()
    assert reporter.num_failed_reports == 1 and reporter.num_reports >= 2
    assert calls[0] > 0 and delivered == list(range(len(delivered))) and len(delivered) >= calls[0]


def test_a_failed_loop_fails_what_waits_and_the_reporter_goes_silent(tiny_llama_dir):
    loop = EngineLoop(rayk.LLM(tiny_llama_dir, block_size=BLOCK_SIZE)._engine)
    reporter = EventReporter(loop, lambda batches, load, received: False, lambda seq, inventory: None, interval_s=0.01, heartbeat_s=0.05)
    try:
        def broken_publish():
            raise MemoryError("simulated")

        loop.engine.publish_events = broken_publish  # runs on the loop thread after any inbox work
        assert loop.call(lambda engine: 1).result(timeout=10) == 1
        deadline = time.monotonic() + 5
        while loop.failed is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert isinstance(loop.failed, MemoryError)
        with pytest.raises(RuntimeError, match="engine loop failed"):
            loop.call(lambda engine: 2)
        with pytest.raises(RuntimeError, match="engine loop failed"):
            loop.submit([1, 2, 3], GREEDY, None, "late", lambda d: None)
        reporter._thread.join(timeout=5)
        assert not reporter._thread.is_alive(), "no heartbeat: the coordinator drops the worker"
    finally:
        reporter.close()


def test_flush_returns_once_what_the_loop_collected_is_sent(loop):
    sent = []
    reporter = EventReporter(loop, lambda batches, load, received: sent.extend(batches) or False, lambda seq, inventory: None, interval_s=5.0, heartbeat_s=5.0)
    try:
        _, done = _submit(loop, random_prompts([40], seed=24)[0], "a")
        assert done.wait(30)
        loop.call(lambda engine: engine.publish_events()).result()
        assert reporter.flush(timeout=5)
        assert any(isinstance(e, BlocksStored) for batch in sent for e in batch.events)
    finally:
        reporter.close()


def test_replica_sync_never_waits_and_a_failed_apply_brings_a_reset_next():
    import concurrent.futures

    from rayk.cluster.reporting import ReplicaSync

    asked, applies = [], []

    def ask(applied):
        asked.append(applied)
        future = concurrent.futures.Future()
        future.set_result((f"g{len(asked)}", False, [b"k"], []))
        return future

    def apply(gained, lost, reset):
        future = concurrent.futures.Future()  # the engine has not run it yet
        applies.append(future)
        return future

    sync = ReplicaSync(ask, apply)
    sync.ask()
    sync.ask()  # the first exchange is still waiting for the engine: skipped, not queued
    assert asked == [None] and len(applies) == 1
    applies[0].set_exception(RuntimeError("the engine loop is closed"))
    sync.ask()
    assert asked == [None, None]  # nothing counted as applied: the coordinator will reset
    applies[1].set_result(None)
    sync.ask()
    assert asked == [None, None, "g2"] and sync.applied == "g2"
