"""The ``rayk`` command in subprocesses, as a user runs it: against a deployment on a real
two-node ``ray.cluster_utils.Cluster``, and ``rayk demo`` on its own embedded Ray. Every error is
one line on stderr and a non-zero exit status."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from rayk.stats_table import format_table
from tests.conftest import BLOCK_SIZE, local_ray_nodes

NAMESPACE = "rayk-cli-test"


def rayk_command(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "rayk", *args], capture_output=True, text=True, timeout=timeout, env=env)


def assert_one_line_error(result: subprocess.CompletedProcess, match: str) -> None:
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert match in lines[0], lines[0]


@pytest.fixture(scope="module")
def address():
    with local_ray_nodes(NAMESPACE, 1, 2) as nodes:
        yield nodes.address


@pytest.fixture(scope="module")
def deployment(address, tiny_chat_dir):
    target = ["--address", address, "--namespace", NAMESPACE]
    started = rayk_command("start", *target, "--model", str(tiny_chat_dir), "--workers", "2", "--device", "cpu", "--block-size", str(BLOCK_SIZE))
    assert started.returncode == 0, started.stderr
    yield target, started
    rayk_command("stop", *target)


def test_start_reports_every_worker_ready(deployment):
    _, started = deployment
    assert "deployment 'rayk-cli-test' ready" in started.stdout
    assert "worker-0" in started.stdout and "worker-1" in started.stdout


def test_start_passes_the_integrity_key_variable_to_every_worker(address, tiny_chat_dir):
    target = ["--address", address, "--namespace", NAMESPACE + "-sealed"]
    result = rayk_command("start", *target, "--model", str(tiny_chat_dir), "--workers", "1", "--device", "cpu", "--integrity-key-env", "RAYK_TEST_UNSET_KEY")
    rayk_command("stop", *target)
    assert_one_line_error(result, "the environment variable RAYK_TEST_UNSET_KEY is not set")


def test_a_second_start_in_the_same_namespace_is_refused(deployment, tiny_chat_dir):
    target, _ = deployment
    result = rayk_command("start", *target, "--model", str(tiny_chat_dir), "--workers", "1", "--device", "cpu")
    assert_one_line_error(result, "already running in namespace 'rayk-cli-test'")


def test_generate_applies_the_chat_template_and_hits_the_cache_the_second_time(deployment):
    target, _ = deployment
    prompt = "The quick brown fox jumps over the lazy dog. A paged KV cache serves prefixes once."
    first = rayk_command("generate", *target, "--prompt", prompt, "--max-tokens", "4", "--json")
    second = rayk_command("generate", *target, "--prompt", prompt, "--max-tokens", "4", "--json")
    raw = rayk_command("generate", *target, "--prompt", prompt, "--max-tokens", "4", "--json", "--raw")
    assert first.returncode == second.returncode == raw.returncode == 0, first.stderr + second.stderr + raw.stderr
    one, two, plain = (json.loads(r.stdout) for r in (first, second, raw))
    assert one["completion_tokens"] == 4 and one["worker"] in ("worker-0", "worker-1")
    assert two["worker"] == one["worker"]  # routed to the worker holding the prefix
    assert two["cached_tokens"] >= BLOCK_SIZE and two["cached_tokens"] == sum(two["cached_tokens_by_tier"].values())
    assert one["text"] == two["text"]
    assert plain["prompt_tokens"] < one["prompt_tokens"]  # no template around the raw text


def test_generate_reads_a_jsonl_file_of_prompts_and_conversations(deployment, tmp_path):
    target, _ = deployment
    path = tmp_path / "prompts.jsonl"
    conversation = [{"role": "system", "content": "rayk caches blocks."}, {"role": "user", "content": "The lazy dog."}]
    path.write_text(json.dumps({"prompt": "The quick brown fox."}) + "\n\n" + json.dumps({"messages": conversation}) + "\n")
    result = rayk_command("generate", *target, "--file", str(path), "--max-tokens", "3")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("[worker-") == 2  # one summary line per answer


def test_stats_json_and_table(deployment):
    target, _ = deployment
    assert rayk_command("generate", *target, "--prompt", "rayk caches blocks.", "--max-tokens", "2").returncode == 0
    as_json = rayk_command("stats", *target, "--json")
    assert as_json.returncode == 0, as_json.stderr
    stats = json.loads(as_json.stdout)
    assert sorted(stats["workers"]) == ["worker-0", "worker-1"]
    assert stats["cluster"]["requests"]["finished"] >= 1
    table = rayk_command("stats", *target)
    assert table.returncode == 0, table.stderr
    rows = [line.split() for line in table.stdout.splitlines()]
    assert ["worker", "tier", "blocks", "used", "cached", "free", "bytes", "hit", "tokens", "evictions"] in rows
    assert sum(1 for r in rows if r[:2] in (["worker-0", "device"], ["worker-1", "device"])) == 2
    assert any(line.startswith("routing: ") for line in table.stdout.splitlines())


def test_stats_watch_redraws_in_place_and_stops_after_count(deployment):
    target, _ = deployment
    result = rayk_command("stats", *target, "--watch", "--interval", "0.2", "--count", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\x1b[H\x1b[2J") == 2


def test_a_driver_attaches_with_no_address_through_ray_address(address, deployment):
    script = "import rayk; print(sorted(rayk.connect(namespace='rayk-cli-test').workers()))"
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_ADDRESS=address)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['worker-0', 'worker-1']"


def test_profile_writes_one_report_for_every_worker(deployment, tmp_path):
    target, _ = deployment
    out = tmp_path / "report.html"
    result = rayk_command("profile", *target, "--out", str(out), "--seconds", "0.5")
    assert result.returncode == 0, result.stderr
    assert f"wrote the memory report of 2 workers to {out}" in result.stdout
    page = out.read_text()
    assert page.startswith("<!doctype html>")
    assert "<h2>worker-0</h2>" in page and "<h2>worker-1</h2>" in page and "Not recorded" not in page


@pytest.mark.parametrize(
    "args, match",
    [
        (["profile", "--out", "/no/such/dir/report.html", "--namespace", NAMESPACE], "is in a directory that does not exist"),
        (["stats", "--namespace", "nobody-here"], "no rayk deployment is running in namespace 'nobody-here'"),
        (["generate", "--namespace", "nobody-here", "--prompt", "hi"], "no rayk deployment is running in namespace 'nobody-here'"),
        (["start", "--namespace", "rayk-cli-bad-model", "--model", "/no/such/model", "--workers", "1", "--device", "cpu"], "model '/no/such/model' does not exist"),
        (["stats", "--interval", "0", "--namespace", NAMESPACE], "--interval must be > 0 seconds"),
        (["stats", "--count", "2", "--namespace", NAMESPACE], "--count must be >= 1 and goes with --watch"),
        (["stats", "--json", "--watch", "--namespace", NAMESPACE], "--json prints the stats once"),
    ],
)
def test_errors_against_a_running_cluster_are_one_line(address, args, match):
    assert_one_line_error(rayk_command(*args, "--address", address), match)


def test_a_worker_that_cannot_load_its_model_is_one_line(address, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    result = rayk_command("start", "--address", address, "--namespace", "rayk-cli-broken", "--model", str(tmp_path), "--workers", "1", "--device", "cpu")
    assert_one_line_error(result, "worker-0 failed to start: ")


@pytest.mark.parametrize(
    "args, match, status",
    [
        (["stats", "--address", "127.0.0.1:1"], "no Ray cluster at 127.0.0.1:1", 1),
        (["stop", "--address", "not-an-address"], "--address must be host:port", 1),
        (["generate", "--address", "127.0.0.1:1"], "one of the arguments --prompt --file is required", 2),
        (["start", "--workers", "two"], "invalid int value: 'two'", 2),
        (["bench", "no-such-benchmark"], "unknown benchmark 'no-such-benchmark'", 1),
        (["frobnicate"], "invalid choice: 'frobnicate'", 2),
    ],
)
def test_errors_without_a_cluster_are_one_line(args, match, status):
    result = rayk_command(*args)
    assert_one_line_error(result, match)
    assert result.returncode == status


def test_generate_names_the_bad_line_of_a_prompts_file(address, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "fine"}) + "\n" + "{not json\n")
    assert_one_line_error(rayk_command("generate", "--address", address, "--file", str(path)), f"{path}:2: not JSON")


@pytest.mark.parametrize("command", ["demo", "start", "stop", "generate", "stats", "profile", "bench"])
def test_every_subcommand_has_help(command):
    result = rayk_command(command, "--help", timeout=60)
    assert result.returncode == 0 and f"usage: rayk {command}" in result.stdout


def test_stop_ends_the_deployment(address, tiny_chat_dir):
    target = ["--address", address, "--namespace", "rayk-cli-stop"]
    assert rayk_command("start", *target, "--model", str(tiny_chat_dir), "--workers", "1", "--device", "cpu").returncode == 0
    stopped = rayk_command("stop", *target)
    assert stopped.returncode == 0 and "stopped deployment 'rayk-cli-stop'" in stopped.stdout
    assert_one_line_error(rayk_command("stats", *target), "no rayk deployment is running in namespace 'rayk-cli-stop'")


def test_demo_runs_the_workload_on_its_own_embedded_ray(tiny_chat_dir):
    result = rayk_command("demo", "--model", str(tiny_chat_dir), "--users", "2", "--max-tokens", "3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("worker "))
    assert header.split()[:3] == ["worker", "requests", "prompt"]
    rows = {line.split()[0]: line.split() for line in lines if line.startswith("worker-")}
    assert sorted(rows) == ["worker-0", "worker-1"]
    assert sum(int(r[1]) for r in rows.values()) == 6  # 3 desks x 2 users
    routing = next(line for line in lines if line.startswith("routing: "))
    hit, oracle = int(routing.split()[1]), int(routing.split()[6])
    assert 0 < hit <= oracle
    assert "6/6 requests" in result.stderr  # the progress bar's last state


def test_tables_align_numbers_and_humanize_bytes():
    table = format_table(("worker", "bytes", "hits"), [("worker-0", 1536, 7), ("worker-10", 3 << 30, "-")]).splitlines()
    assert table[1] == "worker-0   1.5 KiB     7"
    assert table[2] == "worker-10    3 GiB     -"
