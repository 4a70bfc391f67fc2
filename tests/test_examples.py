"""Every example runs as a user runs it, in its own process with its own Ray, made small: the tiny
random Llama with a chat template (``tiny_chat_dir``) and a few new tokens. Each test checks the lines that
show what its example is about, not only that it exited 0.

The selected tests' examples start together, three at a time, when the first test asks for one
(most of an example's time is Ray starting up, which overlaps well), so the module takes about as
long as the slowest few examples rather than all of them in turn.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rayk.config import CacheConfig

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_ARGS = {
    "quickstart": ["--users", "4"],
    "single_process": ["--users", "3"],
    "shared_system_prompt": ["--users", "6", "--rounds", "2"],
    "manual_memory_control": ["--host-mib", "4"],
    "custom_eviction_policy": ["--device-blocks", "48", "--documents", "6", "--document-words", "30"],
    "multinode": ["--nodes", "2", "--prefix-words", "40"],
}
TIMEOUT_S = 300
BLOCK_SIZE = CacheConfig.block_size  # the examples run with rayk's default


def _run(name: str, model_dir: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    env.pop("RAY_ADDRESS", None)  # each example starts its own Ray
    command = [sys.executable, str(REPO / "examples" / f"{name}.py"), "--model", str(model_dir), "--max-tokens", "4", *EXAMPLE_ARGS[name]]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def example_runs(request, tiny_chat_dir):
    """The runs of the examples whose tests were selected, started together (three at a time):
    name -> future of its process."""
    selected = [n for n in EXAMPLE_ARGS if any(item.name.startswith(f"test_{n}_") for item in request.session.items)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        yield {name: pool.submit(_run, name, tiny_chat_dir) for name in selected}


@pytest.fixture()
def output(request, example_runs) -> str:
    """The stdout of the example the test is named for (``test_<example>_...``), once it exited 0."""
    name = next(n for n in EXAMPLE_ARGS if request.node.name.startswith(f"test_{n}_"))
    result = example_runs[name].result()
    # The tiny random model answers in arbitrary bytes: decode them leniently.
    stdout, stderr = result.stdout.decode(errors="replace"), result.stderr.decode(errors="replace")
    assert result.returncode == 0, f"{name} exited {result.returncode}\n{stdout}\n{stderr[-4000:]}"
    return stdout


def _numbers(pattern: str, text: str) -> list[tuple[int, ...]]:
    """Every match of ``pattern`` (its groups all integers), as tuples of ints."""
    return [tuple(map(int, m)) if isinstance(m, tuple) else (int(m),) for m in re.findall(pattern, text)]


def _placements(text: str) -> list[tuple[str, dict[str, dict[str, int]]]]:
    """The manual-control example's steps: (the step's line, per worker its blocks per tier)."""
    steps, previous = [], None
    for line in text.splitlines():
        if re.match(r"^    worker-\d+: device", line):
            where = {w: {"device": int(d), "host": int(h), "disk": int(k)} for w, d, h, k in re.findall(r"(worker-\d+): device (\d+), host (\d+), disk (\d+)", line)}
            steps.append((previous, where))
        elif not line.startswith(" "):
            previous = line
    return steps


def test_quickstart_routes_each_desk_to_its_own_worker_and_hits_all_the_oracle_offers(output):
    served = re.findall(r"^\[(\w+)\] .*\n(?:.*\n)*?    served by (worker-\d+): (\d+) of (\d+) prompt tokens from cache", output, re.M)
    assert [desk for desk, *_ in served] == ["library", "bakery", "library", "bakery"]
    workers = {desk: {w for d, w, *_ in served if d == desk} for desk in ("library", "bakery")}
    assert all(len(w) == 1 for w in workers.values()) and workers["library"] != workers["bakery"]
    cached = [int(c) for *_, c, _ in served]
    assert cached[:2] == [0, 0] and all(c > 0 for c in cached[2:])  # a desk's later users hit its system prompt
    [(hits, oracle)] = _numbers(r"router: (\d+) hit tokens of the (\d+) the cluster held", output)
    assert hits == oracle == sum(cached)


def test_single_process_serves_every_user_after_the_first_from_the_cache(output):
    cached = [c for _, c in _numbers(r"prompt (\d+) tokens, (\d+) from cache, TTFT", output)]
    assert len(cached) == 3 and cached[0] == 0 and all(c > 0 for c in cached[1:])
    [(hits, _)] = _numbers(r"prefix cache: (\d+) of (\d+) prompt tokens served from cache", output)
    assert hits == sum(cached)


def test_shared_system_prompt_reports_rounds_workers_and_the_router_against_the_oracle(output):
    [(system_tokens, pulled)] = _numbers(r"warm: worker-\d computed the system prompt \((\d+) tokens\), worker-\d pulled (\d+) tokens", output)
    assert pulled in ((system_tokens - 1) // BLOCK_SIZE * BLOCK_SIZE, 0)  # 0: a pull timed out on a loaded machine, and it computed
    assert _numbers(r"round (\d+): (\d+) users at once", output) == [(1, 6), (2, 6)]
    round_hits = _numbers(r"    (\d+) of (\d+) prompt tokens from cache; user 0", output)
    assert len(round_hits) == 2 and all(0 < hit < total for hit, total in round_hits)
    workers = _numbers(r"  worker-(\d+): (\d+) requests, (\d+) of \d+ prompt tokens from cache \(device (\d+), host (\d+), disk (\d+), remote (\d+)\)", output)
    assert sorted(w for w, *_ in workers) == [0, 1]
    assert sum(requests for _, requests, *_ in workers) == 2 + 2 * 6  # warm's two, and every user's two
    for _, _, hit, *by_tier in workers:
        assert hit == sum(by_tier)
    [(hits, oracle)] = _numbers(r"router: (\d+) hit tokens of the (\d+) the cluster held", output)
    assert hits == sum(hit for _, _, hit, *_ in workers) == pulled + sum(hit for hit, _ in round_hits)
    # Not hits <= oracle: the oracle is what the cluster held when a request was routed, and in a
    # burst a request may also hit blocks that an earlier one of the same burst stored meanwhile.
    assert hits > 0 and oracle > 0


def test_manual_memory_control_moves_the_system_prompt_as_each_control_says(output):
    [(blocks,)] = _numbers(r"system prompt: \d+ tokens, (\d+) full blocks", output)
    steps = _placements(output)

    def on(step: str) -> dict[str, dict[str, int]]:
        return next(where for label, where in steps if label.startswith(step))

    assert all(sum(t.values()) == 0 for t in on("nothing cached yet").values())
    assert on("warm(workers=2)") == {w: {"device": blocks, "host": 0, "disk": 0} for w in ("worker-0", "worker-1")}
    # worker-1 pulls the whole prefix; on a loaded machine a pull may time out, and it computes it.
    assert _numbers(r"worker-\d pulled (\d+) tokens", output)[0][0] in (blocks * BLOCK_SIZE, 0)
    assert f"pin on worker-0 ({blocks} blocks), then offload to host there: 0 moved" in output
    assert on("pin on worker-0")["worker-0"] == {"device": blocks, "host": 0, "disk": 0}
    assert on("offload to host on worker-1")["worker-1"] == {"device": 0, "host": blocks, "disk": 0}
    assert re.search(rf"served by worker-1, {blocks * BLOCK_SIZE} prompt tokens from cache \(host {blocks * BLOCK_SIZE}\)", output)
    assert on("after a request on worker-1")["worker-1"]["device"] == blocks
    assert on("offload again, then prefetch on worker-1")["worker-1"]["device"] == blocks
    assert on("evict on worker-1") == {"worker-0": {"device": blocks, "host": 0, "disk": 0}, "worker-1": {"device": 0, "host": 0, "disk": 0}}
    assert re.search(rf"served by worker-0, {blocks * BLOCK_SIZE} prompt tokens from cache \(device {blocks * BLOCK_SIZE}\)", output)
    assert on("unpin and offload to host on worker-0")["worker-0"] == {"device": 0, "host": blocks, "disk": 0}
    assert on("set_budget('host'")["worker-0"]["host"] == 4
    assert all(sum(t.values()) == 0 for t in on("evict on every worker").values())


def test_custom_eviction_policy_keeps_the_system_prompt_where_lru_loses_it(output):
    held = _numbers(r"system prompt (\d+) of (\d+) blocks on the device, documents (\d+) of (\d+)", output)
    next_user = _numbers(r"the next user: (\d+) of (\d+) prompt tokens from cache", output)
    assert "eviction_policy='lru'" in output and "eviction_policy='keep_system_prompt'" in output
    (lru_held, total, lru_documents, documents), (kept_held, _, kept_documents, _) = held
    assert lru_held < total and kept_held == total
    assert kept_documents < lru_documents < documents  # the room the system prompt keeps came from the documents
    (lru_cached, _), (kept_cached, _) = next_user
    assert lru_cached < kept_cached and kept_cached >= total * BLOCK_SIZE


def test_multinode_spreads_the_workers_and_pulls_the_prefix_across_nodes(output):
    assert "2 nodes, 2 workers:" in output
    nodes = re.findall(r"    (worker-\d+) on node (\w+)", output)
    assert len({node for _, node in nodes}) == 2
    [(pulled, _)] = _numbers(r"worker-1 pulled it: (\d+) of (\d+) prompt tokens from worker-0's node", output)
    transfers = {
        worker: numbers
        for worker, *numbers in _numbers(
            r"    worker-(\d+): pulls (\d+): (\d+) blocks, (\d+) bytes in \d+ ms \([\d.]+ MB/s\); served (\d+) blocks, (\d+) bytes; failed pulls: none", output
        )
    }
    pulls, pulled_blocks, pulled_bytes, _, _ = transfers[1]
    _, _, _, served_blocks, served_bytes = transfers[0]
    assert pulls == 1 and pulled_blocks * BLOCK_SIZE >= pulled > 0
    assert (pulled_blocks, pulled_bytes) == (served_blocks, served_bytes)
