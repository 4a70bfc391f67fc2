"""Several users' requests behind one shared system prompt: the second and later skip its prefill.

    python examples/quickstart.py                  # a small random Llama written on the fly
    python examples/quickstart.py --model DIR      # any local Llama / Qwen3 Hugging Face directory

Until the real default model lands (SmolLM2-135M-Instruct as GGUF), the default is a random
checkpoint: its tokens are meaningless, but the cache at work is the same.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

import rayk


def write_random_llama(directory: Path, vocab: int = 2048, hidden: int = 256, layers: int = 4, heads: int = 8, kv_heads: int = 2) -> Path:
    """A Llama checkpoint with random weights, in the Hugging Face file layout."""
    head_dim, ffn = hidden // heads, 2 * hidden
    generator = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=generator) * 0.05  # noqa: E731
    tensors = {"model.embed_tokens.weight": rand(vocab, hidden), "model.norm.weight": torch.ones(hidden), "lm_head.weight": rand(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors |= {
            p + "input_layernorm.weight": torch.ones(hidden),
            p + "post_attention_layernorm.weight": torch.ones(hidden),
            p + "self_attn.q_proj.weight": rand(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": rand(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": rand(kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": rand(hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": rand(ffn, hidden),
            p + "mlp.up_proj.weight": rand(ffn, hidden),
            p + "mlp.down_proj.weight": rand(hidden, ffn),
        }
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "dtype": "float32",
    }
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a local Hugging Face model directory (default: a random Llama)")
    parser.add_argument("--system-prompt-tokens", type=int, default=1024)
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()

    model = args.model or str(write_random_llama(Path(tempfile.mkdtemp(prefix="rayk-quickstart-")) / "random-llama"))
    llm = rayk.LLM(model)
    vocab = llm.engine.arch.vocab_size
    generator = torch.Generator().manual_seed(1)
    system_prompt = torch.randint(0, vocab, (args.system_prompt_tokens,), generator=generator).tolist()
    params = rayk.SamplingParams(temperature=0, max_tokens=args.max_tokens)
    llm.generate([0], rayk.SamplingParams(max_tokens=1))  # one-time warm-up, so TTFTs compare caching only

    print(f"model: {model}\nshared system prompt: {len(system_prompt)} tokens, block size {llm.engine.pool.block_size}\n")
    print("| user | prompt tokens | cached tokens | TTFT (ms) | first generated tokens |")
    print("|---|---|---|---|---|")
    for user in range(args.users):
        question = torch.randint(0, vocab, (20,), generator=generator).tolist()
        output = llm.generate(system_prompt + question, params)[0]
        shown = output.text if output.text is not None else output.token_ids[:6]
        print(f"| {user} | {len(output.prompt_token_ids)} | {output.num_cached_tokens} | {output.ttft_s * 1e3:.1f} | {shown} |")
    prefix = llm.stats()["prefix_cache"]
    print(f"\nprefix cache: {prefix['hit_tokens']} of {prefix['query_tokens']} prompt tokens served from cache ({prefix['hit_rate']:.0%})")


if __name__ == "__main__":
    main()
