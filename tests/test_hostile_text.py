"""Hostile text: oversized prompts and chat templates that would exhaust time or memory are
refused with a ValueError, before the Rust tokenizer sees them and within bounded time."""

from __future__ import annotations

import resource
import time

import pytest
from tokenizers import Tokenizer

import rayk
from rayk.model.template_sandbox import RENDER_MEMORY_BYTES, TEMPLATE_RENDER_SECONDS
from rayk.model.tokenizer import (
    MAX_CHARS_PER_TOKEN,
    MAX_TEXT_CHARS,
    TextTokenizer,
)

MAX_MODEL_LEN = 256


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return rayk.LLM(str(tiny_llama_dir), max_model_len=MAX_MODEL_LEN)


@pytest.mark.parametrize("length", [MAX_CHARS_PER_TOKEN * MAX_MODEL_LEN + 1, 10**7, 10**8])
def test_a_prompt_too_long_for_max_model_len_is_refused_before_tokenizing(llm, length):
    prompt = "A" * length
    start = time.perf_counter()
    with pytest.raises(ValueError, match=rf"prompts\[0\]: text of {length} characters exceeds {MAX_CHARS_PER_TOKEN * MAX_MODEL_LEN} \(32 characters per token of 256 tokens\)"):
        llm.generate(prompt, rayk.SamplingParams(max_tokens=1))
    assert time.perf_counter() - start < 0.5


def test_a_prompt_at_the_character_bound_is_tokenized_and_judged_by_its_tokens(llm):
    params = rayk.SamplingParams(temperature=0, max_tokens=2)
    assert len(llm.generate("The quick brown fox", params)[0].token_ids) == 2
    # 8192 characters of a sentence the tokenizer knows: tokenized, then refused for its token count.
    text = ("The quick brown fox jumps over the lazy dog. " * 200)[: MAX_CHARS_PER_TOKEN * MAX_MODEL_LEN]
    with pytest.raises(ValueError, match=r"prompts\[0\] has \d+ tokens and max_tokens is 2: \d+ exceeds max_model_len 256"):
        llm.generate(text, params)


def _tokenizer(tiny_llama_dir, template: str) -> TextTokenizer:
    return TextTokenizer(Tokenizer.from_file(str(tiny_llama_dir / "tokenizer.json")), None, None, template)


CONVERSATION = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("template", "refusal"),
    [
        ("{{ 'A' * 10**9 }}", r"repeats a sequence of 1 items 1000000000 times"),
        ("{{ [1, 2] * 10**8 }}", r"repeats a sequence of 2 items 100000000 times"),
        ("{{ 7 ** 10000000 }}", r"raises 7 to the power 10000000"),
        ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", r"rendering ran over 2.0 s"),
        ("{% for i in range(100000) %}{{ messages[0].content * 1000 }}{% endfor %}", rf"rendering exceeds {MAX_TEXT_CHARS} characters"),
        # One C call each, allocating gigabytes at once: only the sandbox process's memory cap stops them.
        ("{{ 'a'.ljust(10**10) }}", rf"needed more than {RENDER_MEMORY_BYTES >> 20} MiB"),
        ("{{ '%*s' % (10**10, 'a') }}", rf"needed more than {RENDER_MEMORY_BYTES >> 20} MiB"),
        (
            "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
            rf"needed more than {RENDER_MEMORY_BYTES >> 20} MiB",
        ),
        ("{{ raise_exception('this template refuses') }}", r"chat template error: this template refuses"),
    ],
)
def test_a_runaway_chat_template_is_stopped_in_bounded_time_and_memory(tiny_llama_dir, template, refusal):
    rss_before, start = _max_rss_bytes(), time.perf_counter()
    with pytest.raises(ValueError, match=refusal):
        _tokenizer(tiny_llama_dir, template).apply_chat_template(CONVERSATION)
    assert time.perf_counter() - start < TEMPLATE_RENDER_SECONDS + 1.0
    assert _max_rss_bytes() - rss_before < 64 << 20  # the caller's own memory never held it
    assert _tokenizer(tiny_llama_dir, "{{ messages[0].content }}").apply_chat_template(CONVERSATION) == "hi"  # and renders go on


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def test_chat_renders_within_the_models_token_budget(tiny_chat_dir):
    llm = rayk.LLM(str(tiny_chat_dir), max_model_len=MAX_MODEL_LEN)
    long = [{"role": "user", "content": "x" * (MAX_CHARS_PER_TOKEN * MAX_MODEL_LEN + 1)}]
    with pytest.raises(ValueError, match=rf"32 characters per token of {MAX_MODEL_LEN} tokens"):
        llm.chat(long)
    assert llm.chat([{"role": "user", "content": "hi"}], rayk.SamplingParams(max_tokens=2))[0].finish_reason == "length"


def test_a_rendering_is_bounded_by_the_callers_token_budget(tiny_llama_dir):
    tokenizer = _tokenizer(tiny_llama_dir, "{% for m in messages %}{{ m.content }}{% endfor %}")
    long = [{"role": "user", "content": "x" * (MAX_CHARS_PER_TOKEN * 16 + 1)}]
    with pytest.raises(ValueError, match=r"exceeds 512 characters \(32 characters per token of 16 tokens\)"):
        tokenizer.apply_chat_template(long, max_tokens=16)
    assert tokenizer.apply_chat_template(long) == long[0]["content"]  # no budget: only the global bound
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=True, max_tokens=16) == tokenizer.encode("hi", add_special_tokens=False)


def test_the_template_process_holds_none_of_the_callers_secrets(tiny_llama_dir, monkeypatch):
    """Templates are code from model files: the process running them inherits only what finds
    Python, not a deployment's secrets kept in the environment."""
    from rayk.model import template_sandbox

    monkeypatch.setenv("RAYK_TEST_SECRET", "a deployment secret")
    template_sandbox._RENDERER.stop()  # the next render starts a child with the environment as it is now
    assert _tokenizer(tiny_llama_dir, "{{ messages[0].content }}").apply_chat_template(CONVERSATION) == "hi"
    environment = open(f"/proc/{template_sandbox._RENDERER._process.pid}/environ", "rb").read().split(b"\0")
    assert environment and not any(entry.startswith(b"RAYK_TEST_SECRET=") for entry in environment)
