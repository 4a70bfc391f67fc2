"""Output tokens/s of ``rayk.LLM`` against transformers' ``generate``, same weights, same prompts.

A tiny random Llama checkpoint is written with transformers into a temporary directory; both
engines load it, in the same process, with the same torch threads. For each batch size, each
repeat draws fresh random prompts of ``--prompt-len`` tokens (so rayk's prefix cache never hits,
while its hashing cost still counts) and times greedy generation of exactly ``--max-tokens``
new tokens per prompt: ``LLM.generate(..., SamplingParams(temperature=0, ignore_eos=True))``
against ``model.generate(..., min_new_tokens=N, max_new_tokens=N, do_sample=False)`` on the
unpadded batch. Each engine runs once untimed first. Reported: medians of ``--repeats`` runs,
and the ratio of the medians. Goal: rayk >= 2x transformers at batch 32.

Every repeat asserts that rayk's greedy tokens equal transformers' in float32, so the two do
the same work. In half precision the two round differently and may part ways after a near-tie,
so there the fraction of matching tokens is reported instead.

On CUDA, rayk runs with ``attention_backend="torch"`` in ``--dtype`` and, when flash-attn
imports, also with ``"flash_attn"`` in bfloat16 (it needs half precision and block_size 256),
each against transformers in the same dtype.

Then, unless ``--no-real-model``, the default model (SmolLM2-135M-Instruct, the Q4_1 GGUF of
``rayk.default_model_path()``) in float32: ``rayk.LLM()`` against transformers'
``AutoModelForCausalLM.from_pretrained(..., gguf_file=...)``, which dequantizes the same file.

- Throughput, as above, with ``--real-max-tokens`` new tokens and ``--real-repeats`` repeats.
  The prompts are consecutive ``--prompt-len``-token windows of real text (the Python reference
  topics in ``pydoc_data``), each used once: one length, no padding, no prefix-cache hits. At
  batch 1 the tokens must match; at larger batches the fraction that does is reported, since a
  batched matmul may round differently and flip a near-tie.
- TTFT: one chat request, a ``--system-tokens`` system prompt (another window of that text) and
  a question, with ``max_tokens=1``. Cold: its blocks evicted first (``LLM.evict``). Cached: the
  system prompt warmed (``LLM.warm``) by a request with another question, so every full block
  before the question is served from the cache. Reported: medians of ``output.ttft_s``, the
  speedup and ``output.num_cached_tokens``.

    python benchmarks/engine.py [--batch-sizes 1 32] [--max-tokens 64] [--device auto] [--no-real-model]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from pydoc_data.topics import topics

import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import rayk
from rayk.model.attention import FLASH_ATTN_BLOCK_SIZE_MULTIPLE, flash_attn_available

RESULTS = Path(__file__).parent / "results" / "engine.json"
VOCAB_SIZE = 512
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
QUESTION = "How is an exception matched to its handler?"
WARM_QUESTION = "Summarise the reference above in one sentence."


def write_checkpoint(directory: str, args) -> None:
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=args.hidden_size,
        intermediate_size=2 * args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max(1024, args.prompt_len + args.max_tokens),
        initializer_range=0.2,
        bos_token_id=None,
        eos_token_id=None,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_rayk(llm: rayk.LLM, prompts: torch.Tensor, max_tokens: int, device: torch.device) -> tuple[float, list[list[int]]]:
    params = rayk.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    prompt_lists = prompts.tolist()
    _synchronize(device)
    start = time.perf_counter()
    outputs = llm.generate(prompt_lists, params)
    _synchronize(device)
    seconds = time.perf_counter() - start
    assert all(o.num_cached_tokens == 0 for o in outputs), "prompts must be fresh: no prefix-cache hits"
    return seconds, [o.token_ids for o in outputs]


def time_transformers(model, prompts: torch.Tensor, max_tokens: int, device: torch.device) -> tuple[float, list[list[int]]]:
    input_ids = prompts.to(device)
    attention_mask = torch.ones_like(input_ids)
    _synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(
            input_ids, attention_mask=attention_mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, pad_token_id=0
        )
    _synchronize(device)
    seconds = time.perf_counter() - start
    return seconds, output[:, prompts.shape[1] :].tolist()


def _check_tokens(ours: list[list[int]], theirs: list[list[int]], exact: bool) -> float:
    """The fraction of new tokens on which the two agree; with ``exact``, asserts it is all."""
    if exact:
        for i, (x, y) in enumerate(zip(ours, theirs)):
            if x != y:
                first = next(p for p, (a, b) in enumerate(zip(x, y)) if a != b)
                raise AssertionError(f"prompt {i}: new token {first} is {x[first]} in rayk, {y[first]} in transformers")
    return sum(a == b for x, y in zip(ours, theirs) for a, b in zip(x, y)) / sum(len(y) for y in theirs)


def bench_config(model_dir: str, backend: str, dtype: str, device: torch.device, generator: torch.Generator, args) -> list[dict]:
    """One row per batch size for rayk with ``backend`` in ``dtype`` against transformers in ``dtype``."""
    block_size = FLASH_ATTN_BLOCK_SIZE_MULTIPLE if backend == "flash_attn" else 16
    blocks_per_sequence = math.ceil((args.prompt_len + args.max_tokens) / block_size)
    # An explicit pool: on CUDA the default would take 90% of the GPU, leaving none to transformers.
    llm = rayk.LLM(
        model_dir,
        device=str(device),
        dtype=dtype,
        block_size=block_size,
        num_device_blocks=max(args.batch_sizes) * blocks_per_sequence,
        max_num_seqs=64,
        attention_backend=backend,
    )
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype]).to(device).eval()
    draw_prompts = lambda batch_size: torch.randint(0, VOCAB_SIZE, (batch_size, args.prompt_len), generator=generator)
    rows = []
    for batch_size in args.batch_sizes:
        row = compare_at_batch(llm, model, draw_prompts, batch_size, args.max_tokens, args.repeats, dtype == "float32", device)
        rows.append({"batch_size": batch_size, "backend": backend, "dtype": dtype, **row, "goal": ">= 2x" if batch_size == 32 else "-"})
    return rows


def compare_at_batch(llm: rayk.LLM, model, draw_prompts, batch_size: int, max_tokens: int, repeats: int, exact: bool, device: torch.device) -> dict:
    """Both engines on one untimed batch from ``draw_prompts(batch_size)``, then on ``repeats``
    fresh ones; tokens/s are of the median seconds, and with ``exact`` the tokens must match."""
    warm_up = draw_prompts(batch_size)
    time_rayk(llm, warm_up, max_tokens, device)
    time_transformers(model, warm_up, max_tokens, device)
    rayk_s, hf_s, matching = [], [], []
    for _ in range(repeats):
        prompts = draw_prompts(batch_size)
        seconds, ours = time_rayk(llm, prompts, max_tokens, device)
        rayk_s.append(seconds)
        seconds, theirs = time_transformers(model, prompts, max_tokens, device)
        hf_s.append(seconds)
        matching.append(_check_tokens(ours, theirs, exact=exact))
    new_tokens = batch_size * max_tokens
    rayk_rate, hf_rate = new_tokens / statistics.median(rayk_s), new_tokens / statistics.median(hf_s)
    return {
        "rayk_tokens_per_s": rayk_rate,
        "transformers_tokens_per_s": hf_rate,
        "ratio": rayk_rate / hf_rate,
        "tokens_match": min(matching),
        "rayk_seconds": rayk_s,
        "transformers_seconds": hf_s,
    }


def real_text_ids(tokenizer) -> list[int]:
    """Token ids of varied real English: the Python reference topics in the standard library."""
    return tokenizer.encode("\n\n".join(topics[name] for name in sorted(topics)), add_special_tokens=False)


def bench_real_throughput(llm: rayk.LLM, model, text_ids: list[int], device: torch.device, args) -> list[dict]:
    """One row per batch size; every prompt is its own ``--prompt-len`` window of ``text_ids``,
    so all have one length (no padding) and none shares a block with another."""
    windows = (text_ids[start : start + args.prompt_len] for start in range(0, len(text_ids), args.prompt_len))
    draw_prompts = lambda batch_size: torch.tensor([next(windows) for _ in range(batch_size)])
    return [
        {"batch_size": b, **compare_at_batch(llm, model, draw_prompts, b, args.real_max_tokens, args.real_repeats, b == 1, device)}
        for b in args.batch_sizes
    ]


def bench_ttft(llm: rayk.LLM, system: str, args) -> dict:
    """TTFT of one chat request with its system prompt cold (evicted) and cached (``warm``ed
    through a request with another question); medians of ``--real-repeats`` after one untimed pair."""
    tokenizer = llm.get_tokenizer()
    chat = lambda question: tokenizer.apply_chat_template(
        [{"role": "system", "content": system}, {"role": "user", "content": question}], add_generation_prompt=True, tokenize=True
    )
    first_token = rayk.SamplingParams(temperature=0, max_tokens=1)
    prompt, warm_prompt = chat(QUESTION), chat(WARM_QUESTION)
    pairs = []
    for _ in range(args.real_repeats + 1):
        llm.evict(prompt)
        (cold,) = llm.generate(prompt, first_token)
        assert cold.num_cached_tokens == 0, "the cold request must find nothing cached"
        llm.evict(prompt)
        llm.warm([warm_prompt])
        (cached,) = llm.generate(prompt, first_token)
        pairs.append((cold, cached))
    cold_s = [cold.ttft_s for cold, _ in pairs[1:]]
    cached_s = [cached.ttft_s for _, cached in pairs[1:]]
    return {
        "prompt_tokens": len(prompt),
        "cached_tokens": min(cached.num_cached_tokens for _, cached in pairs[1:]),
        "ttft_cold_s": statistics.median(cold_s),
        "ttft_cached_s": statistics.median(cached_s),
        "speedup": statistics.median(cold_s) / statistics.median(cached_s),
        "cold_seconds": cold_s,
        "cached_seconds": cached_s,
    }


def bench_real_model(device: torch.device, args) -> dict:
    """The default model (SmolLM2-135M-Instruct, GGUF) in float32 in rayk and in transformers."""
    gguf_path = rayk.default_model_path()
    # An explicit pool, as for the tiny model: the largest batch plus two chat prompts.
    block_size = 16
    num_blocks = max(args.batch_sizes) * math.ceil((args.prompt_len + args.real_max_tokens) / block_size)
    num_blocks += 2 * math.ceil((args.system_tokens + 64) / block_size)
    llm = rayk.LLM(device=str(device), dtype="float32", block_size=block_size, num_device_blocks=num_blocks, max_num_seqs=64)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32).to(device).eval()
    # With ignore_eos rayk may pick EOS like any token, while min_new_tokens masks it out of the
    # logits: greedy tokens would part wherever EOS is the argmax. With no EOS set, transformers
    # neither masks nor stops, and max_new_tokens alone fixes the length.
    model.generation_config.eos_token_id = None
    text_ids = real_text_ids(llm.get_tokenizer())
    needed = (args.real_repeats + 1) * sum(args.batch_sizes) * args.prompt_len + args.system_tokens
    assert needed <= len(text_ids), f"the text has {len(text_ids)} tokens; this run needs {needed}"
    system = llm.get_tokenizer().decode(text_ids[-args.system_tokens :])
    return {
        "model": gguf_path.name,
        "rows": bench_real_throughput(llm, model, text_ids, device, args),
        "ttft": bench_ttft(llm, system, args),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32], help="prompts per generate call (<= 64)")
    parser.add_argument("--prompt-len", type=int, default=64, help="tokens per prompt")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per prompt")
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats; medians are reported")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when present")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="dtype of the torch-backend comparison")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads for both engines (default: torch's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    parser.add_argument("--no-real-model", dest="real_model", action="store_false", help="skip the default-model section")
    parser.add_argument("--real-max-tokens", type=int, default=32, help="new tokens per prompt on the default model")
    parser.add_argument("--real-repeats", type=int, default=3, help="timed repeats on the default model")
    parser.add_argument("--system-tokens", type=int, default=1000, help="tokens of the system prompt in the TTFT comparison")
    args = parser.parse_args()
    if not all(1 <= b <= 64 for b in args.batch_sizes):
        parser.error(f"--batch-sizes must be in [1, 64] (rayk's max_num_seqs), got {args.batch_sizes}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    configs = [("torch", args.dtype)]
    if device.type == "cuda" and flash_attn_available():
        configs.append(("flash_attn", args.dtype if args.dtype != "float32" else "bfloat16"))

    transformers.utils.logging.disable_progress_bar()
    generator = torch.Generator().manual_seed(args.seed)
    rows = []
    with tempfile.TemporaryDirectory() as model_dir:
        write_checkpoint(model_dir, args)
        for backend, dtype in configs:
            rows.extend(bench_config(model_dir, backend, dtype, device, generator, args))
    real_model = bench_real_model(device, args) if args.real_model else None

    print("| batch | backend | dtype | rayk tok/s | transformers tok/s | ratio | goal | tokens match |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['batch_size']} | {r['backend']} | {r['dtype']} | {r['rayk_tokens_per_s']:.0f} | "
            f"{r['transformers_tokens_per_s']:.0f} | {r['ratio']:.2f}x | {r['goal']} | {r['tokens_match']:.0%} |"
        )
    if real_model is not None:
        print(f"\n{real_model['model']}, float32:\n")
        print("| batch | rayk tok/s | transformers tok/s | ratio | tokens match |")
        print("|---|---|---|---|---|")
        for r in real_model["rows"]:
            print(
                f"| {r['batch_size']} | {r['rayk_tokens_per_s']:.1f} | {r['transformers_tokens_per_s']:.1f} | "
                f"{r['ratio']:.2f}x | {r['tokens_match']:.1%} |"
            )
        t = real_model["ttft"]
        print("\n| prompt tokens | cached tokens | TTFT cold | TTFT cached | speedup |")
        print("|---|---|---|---|---|")
        print(
            f"| {t['prompt_tokens']} | {t['cached_tokens']} | {t['ttft_cold_s'] * 1e3:.0f} ms | "
            f"{t['ttft_cached_s'] * 1e3:.0f} ms | {t['speedup']:.1f}x |"
        )
    environment = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"config": vars(args), "environment": environment, "rows": rows, "real_model": real_model}, indent=2))
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
