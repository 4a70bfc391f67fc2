"""Bad input at every boundary of a deployment: the driver (``rayk.Cluster``), an attached
driver (``rayk.connect``) and the ``rayk`` command each give a clear error naming what is wrong,
and the cluster keeps serving: a good request afterwards returns transformers' greedy tokens.
(The single-process ``rayk.LLM`` is covered by tests/test_bad_input.py.)

The command has no option for a worker id, a salt or a pin, so those cases are the drivers' only.
"""

from __future__ import annotations

import math
import shutil

import pytest
import ray
import torch
from safetensors.torch import load_file, save_file

import rayk
from rayk.hashing import MAX_CACHE_SALT_BYTES
from tests.conftest import (
    BLOCK_SIZE,
    VOCAB_SIZE,
    hf_greedy,
    local_ray_nodes,
    random_prompts,
)
from tests.test_cli import assert_one_line_error, rayk_command

NAMESPACE = "rayk-bad-input-cluster"
MAX_MODEL_LEN = 128
DEVICE_BLOCKS = 32
GREEDY = rayk.SamplingParams(temperature=0, max_tokens=4)
GOOD_PROMPT = [1, 2, 3, 4, 5]


@pytest.fixture(scope="module")
def ray_nodes():
    with local_ray_nodes(NAMESPACE, 1, 2) as nodes:
        yield nodes


@pytest.fixture(scope="module")
def cluster(ray_nodes, tiny_llama_dir):
    with rayk.Cluster(
        str(tiny_llama_dir), num_workers=2, namespace=NAMESPACE, device="cpu", block_size=BLOCK_SIZE, max_model_len=MAX_MODEL_LEN, num_device_blocks=DEVICE_BLOCKS
    ) as deployment:
        yield deployment


@pytest.fixture(scope="module")
def attached(cluster):
    return rayk.connect(namespace=NAMESPACE)


@pytest.fixture(scope="module", params=["Cluster", "connect"])
def driver(request, cluster, attached):
    return cluster if request.param == "Cluster" else attached


@pytest.fixture(scope="module")
def good_reference(tiny_llama_dir):
    return hf_greedy(tiny_llama_dir, [GOOD_PROMPT], 4)[0]


def _serves(driver, good_reference) -> None:
    """The deployment still serves, correctly, and holds nothing for the refused request."""
    assert driver.generate(GOOD_PROMPT, GREEDY)[0].token_ids == good_reference
    assert driver.stats()["routing"]["in_flight"] == 0
    for state in driver._control("check_invariants", None).values():
        assert state["used_blocks"] == state["running"] == state["waiting"] == 0


LONG_PIN = random_prompts([BLOCK_SIZE * (DEVICE_BLOCKS - 2)], seed=7)[0]
"""More full blocks than a worker may pin: its pool less one max_model_len sequence's blocks."""

CASES = {
    "prompt of the wrong type": (lambda c: c.generate(42, GREEDY), TypeError, "prompts must be a string, a list of token ids"),
    "token ids of the wrong type": (lambda c: c.generate([[1.5, 2]], GREEDY), TypeError, "prompt must hold ints"),
    "sampling params of the wrong type": (lambda c: c.generate(GOOD_PROMPT, {"temperature": 0}), TypeError, "sampling_params must be a SamplingParams"),
    "worker of the wrong type": (lambda c: c.generate(GOOD_PROMPT, GREEDY, worker=0), TypeError, "worker must be a worker id string"),
    "salt of the wrong type": (lambda c: c.generate(GOOD_PROMPT, GREEDY, cache_salt=7), TypeError, "cache_salt must be a str, bytes or None, got int"),
    "token id outside the vocabulary": (lambda c: c.generate([[VOCAB_SIZE]], GREEDY), ValueError, rf"holds token id {VOCAB_SIZE}, outside the vocabulary"),
    "NaN temperature": (lambda c: c.generate(GOOD_PROMPT, rayk.SamplingParams(temperature=math.nan)), ValueError, "temperature must be >= 0 .* got nan"),
    "inf temperature": (lambda c: c.generate(GOOD_PROMPT, rayk.SamplingParams(temperature=math.inf)), ValueError, "temperature must be >= 0 and finite .* got inf"),
    "inf top_p": (lambda c: c.generate(GOOD_PROMPT, rayk.SamplingParams(top_p=math.inf)), ValueError, r"top_p must be in \(0, 1\], got inf"),
    "huge max_tokens": (
        lambda c: c.generate(GOOD_PROMPT, rayk.SamplingParams(max_tokens=10**12)),
        ValueError,
        f"max_tokens is {10**12}: {10**12 + 5} exceeds max_model_len {MAX_MODEL_LEN}",
    ),
    "prompt over the context": (lambda c: c.generate([[1] * (MAX_MODEL_LEN + 1)], GREEDY), ValueError, f"exceeds max_model_len {MAX_MODEL_LEN}"),
    "unknown routing policy": (lambda c: c.generate(GOOD_PROMPT, GREEDY, routing="fastest"), ValueError, "routing must be one of .* got 'fastest'"),
    "unknown pull mode": (lambda c: c.generate(GOOD_PROMPT, GREEDY, pull="sometimes"), ValueError, "pull must be one of .* got 'sometimes'"),
    "unknown worker in a request": (lambda c: c.generate(GOOD_PROMPT, GREEDY, worker="worker-9"), ValueError, "worker 'worker-9' is not routable"),
    "unknown worker in a stream": (lambda c: next(c.stream(GOOD_PROMPT, GREEDY, worker="worker-9")), ValueError, "worker 'worker-9' is not routable"),
    "unknown worker in a control": (lambda c: c.pin(GOOD_PROMPT, worker="worker-9"), ValueError, r"unknown worker 'worker-9'; live workers: \['worker-0', 'worker-1'\]"),
    "unknown control tier": (lambda c: c.offload(GOOD_PROMPT, "tape"), ValueError, "tape"),
    "pinning past the budget": (lambda c: c.pin(LONG_PIN, worker="worker-0"), ValueError, f"pinning {DEVICE_BLOCKS - 2} more blocks would leave fewer than"),
    "negative budget": (lambda c: c.set_budget("host", -1), ValueError, "num_bytes must be an int >= 0, got -1"),
    "oversized salt": (
        lambda c: c.generate(GOOD_PROMPT, GREEDY, cache_salt="s" * (MAX_CACHE_SALT_BYTES + 1)),
        ValueError,
        f"cache_salt is {MAX_CACHE_SALT_BYTES + 1} bytes; the limit is {MAX_CACHE_SALT_BYTES} bytes",
    ),
    "oversized salt in a control": (lambda c: c.locate(GOOD_PROMPT, cache_salt=b"x" * (MAX_CACHE_SALT_BYTES + 1)), ValueError, "cache_salt is"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_call_is_refused_clearly_and_the_cluster_keeps_serving(driver, good_reference, case):
    call, error, match = CASES[case]
    with pytest.raises(error, match=match):
        call(driver)
    _serves(driver, good_reference)


def test_a_pin_within_the_budget_works_after_one_past_it_was_refused(cluster):
    with pytest.raises(ValueError, match="would leave fewer than"):
        cluster.pin(LONG_PIN, worker="worker-0")
    cluster.generate(GOOD_PROMPT * 4, GREEDY, worker="worker-0")
    assert cluster.pin(GOOD_PROMPT * 4, worker="worker-0") == 1
    cluster.unpin(GOOD_PROMPT * 4, worker="worker-0")


def test_a_namespace_with_no_deployment_is_refused(cluster):
    with pytest.raises(ValueError, match="no rayk deployment is running in namespace 'nobody-here'"):
        rayk.connect(namespace="nobody-here")
    assert cluster.generate(GOOD_PROMPT, GREEDY)[0].token_ids


@pytest.mark.parametrize(
    "options, match",
    [
        ({"routing": "fastest"}, "routing must be one of"),
        ({"max_queued_requests": 0}, "max_queued_requests must be an int >= 1"),
        ({"num_workers": "two"}, "num_workers must be an int >= 1"),
        ({"liveness_timeout_s": math.nan}, "liveness_timeout_s must be a number of seconds"),
        ({"pull_timeout_s": math.inf * -1}, "pull_timeout_s must be a number of seconds > 0"),
    ],
)
def test_bad_deployment_options_are_refused_before_anything_starts(cluster, good_reference, tiny_llama_dir, options, match):
    with pytest.raises(ValueError, match=match):
        rayk.Cluster(str(tiny_llama_dir), namespace="rayk-bad-options", device="cpu", **options)
    _serves(cluster, good_reference)


@pytest.fixture(scope="module")
def mismatched_model_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama with one weight of the wrong shape (config.json unchanged)."""
    directory = tmp_path_factory.mktemp("mismatched")
    shutil.copytree(tiny_llama_dir, directory, dirs_exist_ok=True)
    path = directory / "model.safetensors"
    weights = load_file(path)
    name = "model.layers.1.self_attn.k_proj.weight"
    rows, columns = weights[name].shape
    weights[name] = torch.zeros(rows + 16, columns)
    save_file(weights, path, metadata={"format": "pt"})
    return directory


def test_a_model_with_mismatched_shapes_fails_to_start_naming_the_weight(cluster, good_reference, mismatched_model_dir):
    with pytest.raises(RuntimeError, match="worker-0 failed to start: .*model.layers.1.self_attn.k_proj.weight has shape"):
        rayk.Cluster(str(mismatched_model_dir), num_workers=1, namespace="rayk-mismatched", device="cpu")
    assert "rayk-mismatched" not in {a["namespace"] for a in ray.util.list_named_actors(all_namespaces=True)}
    _serves(cluster, good_reference)


# -- the command ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def command_target(ray_nodes, cluster):
    """The command works on the drivers' deployment: what it breaks, they would see."""
    return ["--address", ray_nodes.address, "--namespace", NAMESPACE]


@pytest.mark.parametrize(
    "args, match",
    [
        (["generate", "--prompt", "hi", "--max-tokens", "two"], "invalid int value: 'two'"),
        (["generate", "--prompt", "hi", "--temperature", "nan"], "temperature must be >= 0"),
        (["generate", "--prompt", "hi", "--temperature", "inf", "--raw"], "temperature must be >= 0 and finite (0 is greedy), got inf"),
        (["generate", "--prompt", "hi", "--max-tokens", "1000000000000", "--raw"], f"exceeds max_model_len {MAX_MODEL_LEN}"),
        (["generate", "--prompt", "The lazy dog. " * 200, "--raw"], f"exceeds max_model_len {MAX_MODEL_LEN}"),
    ],
)
def test_the_command_refuses_bad_generate_arguments_in_one_line(command_target, cluster, good_reference, args, match):
    assert_one_line_error(rayk_command(*args, *command_target), match)
    _serves(cluster, good_reference)


def test_the_command_refuses_a_bad_deployment_in_one_line(ray_nodes, cluster, good_reference, mismatched_model_dir):
    target = ["--address", ray_nodes.address, "--namespace", "rayk-bad-command-start"]
    assert_one_line_error(rayk_command("start", *target, "--model", str(mismatched_model_dir), "--routing", "fastest", "--device", "cpu"), "routing must be one of")
    started = rayk_command("start", *target, "--model", str(mismatched_model_dir), "--workers", "1", "--device", "cpu")
    assert_one_line_error(started, "worker-0 failed to start: ValueError: weights do not match config.json: model.layers.1.self_attn.k_proj.weight")
    _serves(cluster, good_reference)
