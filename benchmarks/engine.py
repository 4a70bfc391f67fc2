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

    python benchmarks/engine.py [--batch-sizes 1 32] [--max-tokens 64] [--device auto]
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

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

import rayk
from rayk.model.attention import FLASH_ATTN_BLOCK_SIZE_MULTIPLE, flash_attn_available

RESULTS = Path(__file__).parent / "results" / "engine.json"
VOCAB_SIZE = 512
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
    rows = []
    for batch_size in args.batch_sizes:
        warm_up = torch.randint(0, VOCAB_SIZE, (batch_size, args.prompt_len), generator=generator)
        time_rayk(llm, warm_up, args.max_tokens, device)
        time_transformers(model, warm_up, args.max_tokens, device)
        rayk_s, hf_s, matching = [], [], []
        for _ in range(args.repeats):
            prompts = torch.randint(0, VOCAB_SIZE, (batch_size, args.prompt_len), generator=generator)
            seconds, ours = time_rayk(llm, prompts, args.max_tokens, device)
            rayk_s.append(seconds)
            seconds, theirs = time_transformers(model, prompts, args.max_tokens, device)
            hf_s.append(seconds)
            matching.append(_check_tokens(ours, theirs, exact=dtype == "float32"))
        new_tokens = batch_size * args.max_tokens
        rayk_rate, hf_rate = new_tokens / statistics.median(rayk_s), new_tokens / statistics.median(hf_s)
        rows.append(
            {
                "batch_size": batch_size,
                "backend": backend,
                "dtype": dtype,
                "rayk_tokens_per_s": rayk_rate,
                "transformers_tokens_per_s": hf_rate,
                "ratio": rayk_rate / hf_rate,
                "goal": ">= 2x" if batch_size == 32 else "-",
                "tokens_match": min(matching),
                "rayk_seconds": rayk_s,
                "transformers_seconds": hf_s,
            }
        )
    return rows


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

    print("| batch | backend | dtype | rayk tok/s | transformers tok/s | ratio | goal | tokens match |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['batch_size']} | {r['backend']} | {r['dtype']} | {r['rayk_tokens_per_s']:.0f} | "
            f"{r['transformers_tokens_per_s']:.0f} | {r['ratio']:.2f}x | {r['goal']} | {r['tokens_match']:.0%} |"
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
    RESULTS.write_text(json.dumps({"config": vars(args), "environment": environment, "rows": rows}, indent=2))
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
