"""Sampling: seeded requests are reproducible whatever they are batched with; the knobs do what
they say; stop conditions end requests with the right reason."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import rayk
from rayk.model.sampler import sample
from tests.conftest import random_prompts


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return rayk.LLM(tiny_llama_dir)


def test_a_seeded_request_samples_the_same_tokens_alone_or_in_a_batch(llm):
    prompt, *others = random_prompts((9, 20, 31), seed=2)
    params = rayk.SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=16)
    alone = llm.generate(prompt, params)[0].token_ids
    batched = llm.generate([prompt, *others], [params, rayk.SamplingParams(max_tokens=16), rayk.SamplingParams(seed=9, max_tokens=16)])
    assert batched[0].token_ids == alone
    assert llm.generate(prompt, rayk.SamplingParams(temperature=1.0, seed=4321, max_tokens=16))[0].token_ids != alone


def test_top_k_one_and_tiny_top_p_are_greedy(llm):
    prompt = random_prompts([12], seed=3)[0]
    greedy = llm.generate(prompt, rayk.SamplingParams(temperature=0, max_tokens=10))[0].token_ids
    assert llm.generate(prompt, rayk.SamplingParams(temperature=1.5, top_k=1, max_tokens=10))[0].token_ids == greedy
    assert llm.generate(prompt, rayk.SamplingParams(temperature=1.5, top_p=1e-6, seed=0, max_tokens=10))[0].token_ids == greedy


def test_stop_token_ends_the_request_and_is_included(llm):
    prompt = random_prompts([12], seed=3)[0]
    greedy = llm.generate(prompt, rayk.SamplingParams(temperature=0, max_tokens=10))[0]
    stop = greedy.token_ids[4]
    first = greedy.token_ids.index(stop)
    out = llm.generate(prompt, rayk.SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop]))[0]
    assert out.token_ids == greedy.token_ids[: first + 1]
    assert out.finish_reason == "stop" and greedy.finish_reason == "length"


def test_eos_from_generation_config_stops_unless_ignore_eos(tiny_llama_dir, tmp_path, llm):
    prompt = random_prompts([12], seed=3)[0]
    greedy = llm.generate(prompt, rayk.SamplingParams(temperature=0, max_tokens=10))[0].token_ids
    model_dir = tmp_path / "with_eos"
    shutil.copytree(tiny_llama_dir, model_dir)
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [greedy[2], 999]}))
    with_eos = rayk.LLM(str(model_dir))
    first = greedy.index(greedy[2])
    stopped = with_eos.generate(prompt, rayk.SamplingParams(temperature=0, max_tokens=10))[0]
    assert stopped.token_ids == greedy[: first + 1] and stopped.finish_reason == "stop"
    assert with_eos.generate(prompt, rayk.SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0].token_ids == greedy


def test_top_k_never_draws_outside_the_k_best():
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0, 3.0]])
    params = [rayk.SamplingParams(temperature=2.0, top_k=2)]
    drawn = {sample(logits, params, [torch.Generator().manual_seed(s)])[0] for s in range(200)}
    assert drawn == {1, 2}


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    params = [rayk.SamplingParams(temperature=1.0, top_p=0.75)]
    drawn = {sample(logits, params, [torch.Generator().manual_seed(s)])[0] for s in range(300)}
    assert drawn == {0, 1}


def test_a_vanishing_temperature_is_greedy_not_nan(llm):
    prompt = random_prompts([12], seed=3)[0]
    greedy = llm.generate(prompt, rayk.SamplingParams(temperature=0, max_tokens=6))[0].token_ids
    assert llm.generate(prompt, rayk.SamplingParams(temperature=1e-45, max_tokens=6))[0].token_ids == greedy


def test_top_k_keeps_exactly_k_tokens_when_logits_tie():
    logits = torch.zeros(1, 6)
    params = [rayk.SamplingParams(temperature=1.0, top_k=2)]
    drawn = {sample(logits, params, [torch.Generator().manual_seed(s)])[0] for s in range(200)}
    assert len(drawn) == 2
