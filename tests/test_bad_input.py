"""Bad input gets a clear error naming what is wrong, changes nothing, and the engine keeps serving."""

from __future__ import annotations

import json
import math
import shutil

import pytest

import rayk
from tests.conftest import VOCAB_SIZE, hf_greedy

GREEDY = rayk.SamplingParams(temperature=0, max_tokens=4)
GOOD_PROMPT = [1, 2, 3, 4, 5]


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return rayk.LLM(tiny_llama_dir, max_model_len=64)


@pytest.fixture(scope="module")
def good_reference(tiny_llama_dir):
    return hf_greedy(tiny_llama_dir, [GOOD_PROMPT], 4)[0]


@pytest.mark.parametrize(
    "prompts, params, error, match",
    [
        ([[-1, 2]], GREEDY, ValueError, r"prompts\[0\] holds token id -1, outside the vocabulary \[0, 320\)"),
        ([GOOD_PROMPT, [VOCAB_SIZE]], GREEDY, ValueError, r"prompts\[1\] holds token id 320"),
        ([[]], GREEDY, ValueError, r"prompts\[0\] is empty"),
        ([], GREEDY, ValueError, "prompts is empty"),
        ("", GREEDY, ValueError, r"prompts\[0\] is empty"),
        ([list(range(61))], GREEDY, ValueError, "has 61 tokens and max_tokens is 4: 65 exceeds max_model_len 64"),
        (42, GREEDY, TypeError, "prompts must be a string, a list of token ids"),
        ([[1.5, 2]], GREEDY, TypeError, r"prompts\[0\] must hold ints"),
        ([{"text": "hi"}], GREEDY, TypeError, r"prompts\[0\] must be a string or a list of token ids, got dict"),
        ([GOOD_PROMPT], [GREEDY, GREEDY], ValueError, "got 2 sampling_params for 1 prompts"),
        ([GOOD_PROMPT], {"temperature": 0}, TypeError, "sampling_params must be a SamplingParams"),
    ],
)
def test_bad_prompts_are_refused_and_the_engine_keeps_serving(llm, good_reference, prompts, params, error, match):
    with pytest.raises(error, match=match):
        llm.generate(prompts, params)
    assert not llm.engine.has_unfinished_requests()
    llm.engine.kv_cache_manager.check_invariants()
    assert llm.generate(GOOD_PROMPT, GREEDY)[0].token_ids == good_reference


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"max_tokens": 0}, ValueError, "max_tokens must be >= 1, got 0"),
        ({"max_tokens": 2.5}, TypeError, "max_tokens must be an int"),
        ({"temperature": -0.1}, ValueError, "temperature must be >= 0"),
        ({"temperature": math.nan}, ValueError, "temperature must be >= 0 .* got nan"),
        ({"top_p": 0.0}, ValueError, r"top_p must be in \(0, 1\], got 0.0"),
        ({"top_p": 1.5}, ValueError, r"top_p must be in \(0, 1\], got 1.5"),
        ({"top_k": -2}, ValueError, "top_k must be -1"),
        ({"stop_token_ids": "ab"}, TypeError, "stop_token_ids must be a sequence of ints"),
        ({"seed": "7"}, TypeError, "seed must be an int"),
        ({"stop": ""}, ValueError, "stop strings must not be empty"),
        ({"stop": ["\n", ""]}, ValueError, r"stop strings must not be empty, got \['\\n', ''\]"),
        ({"stop": 3}, TypeError, "stop must be a string or a sequence of strings, got 3"),
        ({"stop": ["a", 3]}, TypeError, "stop must be a string or a sequence of strings"),
    ],
)
def test_bad_sampling_params_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        rayk.SamplingParams(**kwargs)


def test_a_prompt_that_cannot_fit_the_pool_is_refused_up_front(tiny_llama_dir):
    llm = rayk.LLM(tiny_llama_dir, num_device_blocks=2, block_size=4)
    with pytest.raises(ValueError, match="needs 3 KV blocks; the device pool has num_device_blocks=2, of which 2 are usable"):
        llm.generate([GOOD_PROMPT], rayk.SamplingParams(temperature=0, max_tokens=6))
    assert len(llm.generate([GOOD_PROMPT], rayk.SamplingParams(temperature=0, max_tokens=3))[0].token_ids) == 3


def test_one_bad_prompt_in_a_batch_queues_none_of_them(llm):
    finished_before = llm.stats()["requests"]["finished"]
    with pytest.raises(ValueError):
        llm.generate([GOOD_PROMPT, [1, -5]], GREEDY)
    assert llm.stats()["requests"]["finished"] == finished_before
    assert llm.stats()["scheduler"]["waiting"] == 0


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"block_size": 0}, ValueError, "CacheConfig.block_size must be >= 1"),
        ({"num_device_blocks": -3}, ValueError, "CacheConfig.num_device_blocks must be >= 1"),
        ({"max_num_seqs": 0}, ValueError, "SchedulerConfig.max_num_seqs must be >= 1"),
        ({"dtype": "float8"}, ValueError, "ModelConfig.dtype must be one of"),
        ({"device": "tpu"}, ValueError, "ModelConfig.device must be"),
        ({"max_model_len": 100_000}, ValueError, "max_model_len must be <= the model's max_position_embeddings"),
        ({"hash_algorithm": "md5"}, ValueError, "CacheConfig.hash_algorithm must be one of"),
        ({"attention_backend": "flash_attn"}, ValueError, "attention_backend='flash_attn' needs CUDA"),
        ({"colour": "blue"}, TypeError, r"unknown option\(s\) \['colour'\]"),
        ({"disk_write_timeout_s": 0}, ValueError, "CacheConfig.disk_write_timeout_s must be a number of seconds > 0"),
        ({"disk_write_timeout_s": float("inf")}, ValueError, "CacheConfig.disk_write_timeout_s must be a number of seconds > 0"),
        ({"integrity_key_env": "not a name"}, ValueError, "CacheConfig.integrity_key_env must name an environment variable"),
        ({"integrity_key_env": "RAYK_TEST_UNSET_KEY"}, ValueError, "the environment variable RAYK_TEST_UNSET_KEY is not set"),
    ],
)
def test_bad_engine_options_name_the_field(tiny_llama_dir, kwargs, error, match):
    with pytest.raises(error, match=match):
        rayk.LLM(tiny_llama_dir, **kwargs)


def test_a_short_integrity_key_is_refused_without_showing_it(tiny_llama_dir, monkeypatch):
    monkeypatch.setenv("RAYK_TEST_SHORT_KEY", "tiny-secret")
    with pytest.raises(ValueError, match="RAYK_TEST_SHORT_KEY holds fewer than 16 bytes") as refused:
        rayk.LLM(tiny_llama_dir, integrity_key_env="RAYK_TEST_SHORT_KEY")
    assert "tiny-secret" not in str(refused.value)


def test_the_disk_write_timeout_reaches_the_disk_tier(tiny_llama_dir, tmp_path):
    llm = rayk.LLM(tiny_llama_dir, num_device_blocks=8, disk_dir=str(tmp_path), disk_write_timeout_s=2.5)
    assert llm.engine.disk.write_timeout_s == 2.5
    llm.close()


@pytest.mark.parametrize("model", [None, 3, ""])
def test_a_model_that_is_not_a_path_is_named(model):
    with pytest.raises(TypeError, match=f"model must be a path to a Hugging Face directory or a .gguf file, got {model!r}"):
        rayk.LLM(model)


def test_a_missing_model_directory_is_named(tmp_path):
    with pytest.raises(ValueError, match="model .*nowhere.* does not exist"):
        rayk.LLM(str(tmp_path / "nowhere"))


def _copy_with_config(model_dir, tmp_path, **changes) -> str:
    """A copy of the checkpoint whose config.json has the given fields changed."""
    shutil.copytree(model_dir, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps(config | changes))
    return str(tmp_path / "m")


def test_an_unsupported_architecture_is_named(tiny_llama_dir, tmp_path):
    with pytest.raises(ValueError, match="unsupported architecture 'MambaForCausalLM'"):
        rayk.LLM(_copy_with_config(tiny_llama_dir, tmp_path, architectures=["MambaForCausalLM"]))


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("hidden_size", 96, r"(lm_head|model.embed_tokens).weight has shape \(320, 64\), config.json implies \(320, 96\)"),
        ("num_hidden_layers", 2, "unexpected tensor 'model.layers.2"),
        ("num_hidden_layers", 4, "missing tensors .*model.layers.3"),
        ("num_key_value_heads", 4, r"k_proj.weight has shape \(32, 64\), config.json implies \(64, 64\)"),
    ],
)
def test_weights_that_do_not_match_config_are_named(tiny_llama_dir, tmp_path, field, value, match):
    with pytest.raises(ValueError, match=match):
        rayk.LLM(_copy_with_config(tiny_llama_dir, tmp_path, **{field: value}))


def test_a_directory_without_weights_is_named(tiny_llama_dir, tmp_path):
    (tmp_path / "m").mkdir()
    shutil.copy(tiny_llama_dir / "config.json", tmp_path / "m" / "config.json")
    with pytest.raises(ValueError, match=r"has no \*.safetensors weights"):
        rayk.LLM(str(tmp_path / "m"))


def test_a_corrupt_weights_file_is_named(tiny_llama_dir, tmp_path):
    shutil.copytree(tiny_llama_dir, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00garbage")
    with pytest.raises(ValueError, match="cannot read weights file model.safetensors"):
        rayk.LLM(str(tmp_path / "m"))


def test_string_prompt_without_tokenizer_asks_for_token_ids(tiny_qwen3_dir):
    llm = rayk.LLM(tiny_qwen3_dir, max_model_len=64)
    with pytest.raises(TypeError, match="no tokenizer.json: pass token ids"):
        llm.generate("hello", GREEDY)
    assert len(llm.generate(GOOD_PROMPT, GREEDY)[0].token_ids) == 4


def test_generate_returns_its_own_outputs_when_others_share_the_engine(llm, good_reference):
    other = llm.engine.add_request([9, 8, 7], rayk.SamplingParams(temperature=0, max_tokens=1), request_id="1")
    outputs = llm.generate([GOOD_PROMPT, GOOD_PROMPT], GREEDY)
    assert [o.token_ids for o in outputs] == [good_reference, good_reference]
    assert other not in [o.request_id for o in outputs]
    while llm.engine.has_unfinished_requests():
        llm.engine.step()


def test_an_out_of_range_seed_is_refused_before_anything_is_queued():
    with pytest.raises(ValueError, match=r"seed must be in \[-2\*\*63, 2\*\*64\)"):
        rayk.SamplingParams(seed=2**64)


def test_a_cache_salt_of_the_wrong_type_is_refused_and_the_engine_keeps_serving(llm, good_reference):
    with pytest.raises(TypeError, match="cache_salt must be a str, bytes or None, got int"):
        llm.generate(GOOD_PROMPT, GREEDY, cache_salt=5)
    with pytest.raises(TypeError, match="cache_salt"):
        llm.engine.add_request(GOOD_PROMPT, GREEDY, cache_salt=5)
    assert not llm.engine.has_unfinished_requests()
    assert llm.generate(GOOD_PROMPT, GREEDY)[0].token_ids == good_reference


def test_automatic_request_ids_skip_ids_chosen_by_the_user(llm):
    taken = [llm.engine.add_request(GOOD_PROMPT, GREEDY, request_id=str(i)) for i in range(3)]
    outputs = llm.generate([GOOD_PROMPT, GOOD_PROMPT], GREEDY)
    assert not set(o.request_id for o in outputs) & set(taken)
    while llm.engine.has_unfinished_requests():
        llm.engine.step()


def test_a_failing_event_subscriber_loses_no_output(tiny_llama_dir, good_reference):
    llm = rayk.LLM(tiny_llama_dir, max_model_len=64)

    def broken(events):
        raise RuntimeError("subscriber bug")

    llm.engine.subscribe(broken)
    assert llm.generate([GOOD_PROMPT] * 2, GREEDY)[1].token_ids == good_reference
    assert llm.stats()["requests"]["finished"] == 2


@pytest.mark.parametrize("field, value, error, match", [
    ("dtype", "float64", ValueError, "unsupported dtype 'float64' in config.json"),
    ("hidden_act", "gelu", ValueError, "unsupported hidden_act 'gelu'"),
    # The rotary tables hold every position: a hostile count must not allocate gigabytes.
    ("max_position_embeddings", 1 << 31, ValueError, r"max_position_embeddings is 2147483648; rayk serves 1 to 2097152"),
    ("max_position_embeddings", 0, ValueError, r"max_position_embeddings is 0; rayk serves 1 to 2097152"),
])
def test_unsupported_config_values_are_named(tiny_llama_dir, tmp_path, field, value, error, match):
    with pytest.raises(error, match=match):
        rayk.LLM(_copy_with_config(tiny_llama_dir, tmp_path, **{field: value}))


@pytest.mark.parametrize("kwargs, match", [
    ({"stop_token_ids": None}, "stop_token_ids must be a sequence of ints"),
    ({"stop_token_ids": 5}, "stop_token_ids must be a sequence of ints"),
])
def test_stop_token_ids_of_the_wrong_type_name_the_field(kwargs, match):
    with pytest.raises(TypeError, match=match):
        rayk.SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"device": "cuda:x"}, ValueError, "ModelConfig.device must be"),
    ({"gpu_memory_utilization": "high"}, TypeError, "CacheConfig.gpu_memory_utilization must be a number"),
    ({"host_blocks": -1}, ValueError, "CacheConfig.host_blocks must be an int >= 0"),
    ({"disk_dir": 3}, TypeError, "CacheConfig.disk_dir must be a directory path"),
    ({"eviction_policy": "fifo"}, ValueError, "eviction_policy must be an EvictionPolicy or one of"),
])
def test_more_bad_engine_options_name_the_field(tiny_llama_dir, kwargs, error, match):
    with pytest.raises(error, match=match):
        rayk.LLM(tiny_llama_dir, **kwargs)
