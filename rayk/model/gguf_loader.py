"""Loading a decoder from a GGUF file (llama.cpp's format), dequantized on load.

The file is parsed by ``rayk.model.gguf_file`` (every length and offset checked, tensor bytes
memory-mapped) and dequantized by ``rayk.model.gguf_dequantize``. Its metadata (``llama.*``,
``qwen3.*``) becomes the same ``DecoderArchitecture`` a config.json gives, its tensor names map
onto the Hugging Face names the safetensors loader checks, and every shape is checked before
anything is dequantized. llama.cpp's converter permutes the rows of Llama's q and k projections
(for its own rotary layout); they are permuted back here. The tokenizer is rebuilt from
``tokenizer.ggml.*`` (byte-level BPE for ``gpt2``-type vocabularies).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from rayk.model.architecture import MAX_POSITION_EMBEDDINGS, DecoderArchitecture
from rayk.model.gguf_dequantize import dequantize
from rayk.model.gguf_file import TENSOR_TYPES, GGUFFile, GGUFTensor

SUPPORTED_QUANT_TYPES = tuple(name for name, _, _ in TENSOR_TYPES.values())
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_CONTROL_TOKEN = 3


def find_gguf(path: Path) -> Path | None:
    """``path`` itself if it is a .gguf file, the single .gguf in a directory without a
    config.json, else None (a Hugging Face directory)."""
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").exists():
        files = sorted(path.glob("*.gguf"))
        if len(files) > 1:
            raise ValueError(f"model directory {str(path)!r} holds {len(files)} .gguf files; name the one to load")
        return files[0] if files else None
    return None


def gguf_architecture(reader: GGUFFile, path: Path) -> DecoderArchitecture:
    """The architecture from GGUF metadata, as a config.json would give it."""
    def field(name: str, default=None):
        return reader.fields.get(name, default)

    arch_name = field("general.architecture")
    if not isinstance(arch_name, str) or arch_name not in _ARCHITECTURES:
        raise ValueError(f"{path.name}: unsupported GGUF architecture {arch_name!r}; rayk serves {sorted(_ARCHITECTURES)}")

    def meta(key: str, default=None, kind: type = int, limit: int | None = None):
        """A positive int (or a float, for ``kind=float``) of at most ``limit``, else an error
        naming the key."""
        value = field(f"{arch_name}.{key}", default)
        if value is None:
            raise ValueError(f"{path.name}: GGUF metadata lacks {arch_name}.{key}")
        wanted = (int,) if kind is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, wanted) or not value > 0:
            raise ValueError(f"{path.name}: GGUF metadata {arch_name}.{key} is {value!r}, not a positive {kind.__name__}")
        if limit is not None and value > limit:
            raise ValueError(f"{path.name}: GGUF metadata {arch_name}.{key} is {value}, over the {limit} positions rayk serves")
        return kind(value)

    hidden, heads = meta("embedding_length"), meta("attention.head_count")
    tokens = field("tokenizer.ggml.tokens")
    config = {
        "architectures": [_ARCHITECTURES[arch_name]],
        "vocab_size": meta("vocab_size", len(tokens) if isinstance(tokens, list) else None),
        "hidden_size": hidden,
        "intermediate_size": meta("feed_forward_length"),
        "num_hidden_layers": meta("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": meta("attention.head_count_kv", heads),
        "head_dim": meta("attention.key_length", hidden // heads),
        "rms_norm_eps": meta("attention.layer_norm_rms_epsilon", kind=float),
        "rope_theta": meta("rope.freq_base", 10000.0, kind=float),
        "max_position_embeddings": meta("context_length", limit=MAX_POSITION_EMBEDDINGS),
        "tie_word_embeddings": "output.weight" not in {t.name for t in reader.tensors},
        "eos_token_id": field("tokenizer.ggml.eos_token_id"),
    }
    return DecoderArchitecture.from_hf_config(config)


def gguf_weights(
    reader: GGUFFile, arch: DecoderArchitecture, expected: dict[str, tuple[int, ...]], layout: dict[str, tuple[str, ...]], dtype: torch.dtype, path: Path
) -> dict[str, torch.Tensor]:
    """The decoder's weights in ``dtype``, every tensor checked first, then dequantized.

    ``expected``: Hugging Face name -> shape; ``layout``: fused name -> the parts stacked into it.
    Each part is dequantized straight into its rows of the fused tensor (no concatenation copy),
    on several threads.
    """
    named = _checked_tensors(reader, arch, expected, path)
    weights, targets = {}, {}
    for fused_name, parts in layout.items():
        rows = [expected[part][0] for part in parts]
        weights[fused_name] = torch.empty((sum(rows), *expected[parts[0]][1:]), dtype=dtype)
        targets |= dict(zip(parts, weights[fused_name].split(rows)))
    for name in named.keys() - targets.keys():
        weights[name] = targets[name] = torch.empty(expected[name], dtype=dtype)

    def convert(name: str) -> None:
        target, tensor = targets[name], named[name]
        heads = None
        if arch.architecture == "LlamaForCausalLM" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = arch.num_heads if "q_proj" in name else arch.num_kv_heads
        if heads is None and target.dtype == torch.float32:
            dequantize(reader.raw(tensor), tensor.quant, target)
            return
        values = dequantize_tensor(reader, tensor)
        if heads is None:
            target.copy_(values)  # rounds to a 16-bit dtype as .to() would
        else:
            _copy_unpermuted(target, values, heads)

    # numpy's ufuncs release the GIL: decode on as many threads as torch may use here (a cluster
    # worker is given its share of the cores).
    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        list(pool.map(convert, named))
    return weights


def _checked_tensors(reader: GGUFFile, arch: DecoderArchitecture, expected: dict[str, tuple[int, ...]], path: Path) -> dict[str, GGUFTensor]:
    """Hugging Face name -> tensor, once every name, type and shape is known to be right."""
    named = {}
    for tensor in reader.tensors:
        if tensor.name == "rope_freqs.weight":
            raise ValueError(f"{path.name}: per-frequency RoPE factors (rope_freqs.weight, llama3 scaling) are not supported in GGUF yet")
        name = _hf_name(tensor.name)
        if name is None or (arch.tie_word_embeddings and name == "lm_head.weight"):
            raise ValueError(f"{path.name}: unexpected tensor {tensor.name!r}")
        if tensor.quant not in SUPPORTED_QUANT_TYPES:
            raise ValueError(f"{path.name}: tensor {tensor.name} is {tensor.quant}, not one of the supported types {SUPPORTED_QUANT_TYPES}")
        if name not in expected:
            raise ValueError(f"weights do not match the GGUF metadata: unexpected tensor {tensor.name!r}")
        if tensor.shape != expected[name]:
            raise ValueError(f"weights do not match the GGUF metadata: {tensor.name} has shape {tensor.shape}, the metadata implies {expected[name]}")
        named[name] = tensor
    missing = sorted(set(expected) - set(named))
    if missing:
        raise ValueError(f"weights do not match the GGUF metadata: missing tensors {missing[:5]}")
    return named


def dequantize_tensor(reader: GGUFFile, tensor: GGUFTensor) -> torch.Tensor:
    """A GGUF tensor as a new float32 tensor in row-major (Hugging Face) shape."""
    values = torch.empty(tensor.shape, dtype=torch.float32)
    dequantize(reader.raw(tensor), tensor.quant, values)
    return values


def gguf_tokenizer(reader: GGUFFile, path: Path) -> Tokenizer | None:
    """A byte-level BPE tokenizer from ``tokenizer.ggml.*``; None if the file has none."""
    if "tokenizer.ggml.tokens" not in reader.fields:
        return None
    fields = reader.fields
    kind = fields.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{path.name}: tokenizer type {kind!r} is not supported; rayk builds byte-level BPE ('gpt2') tokenizers")
    tokens = _string_list(fields["tokenizer.ggml.tokens"], "tokenizer.ggml.tokens", path)
    merges = [tuple(m.split(" ", 1)) for m in _string_list(fields.get("tokenizer.ggml.merges", []), "tokenizer.ggml.merges", path)]
    if any(len(m) != 2 for m in merges):
        raise ValueError(f"{path.name}: tokenizer.ggml.merges holds an entry that is not two space-separated tokens")
    types = fields.get("tokenizer.ggml.token_type", [1] * len(tokens))
    if not isinstance(types, list) or len(types) != len(tokens):
        raise ValueError(f"{path.name}: tokenizer.ggml.token_type must list one type per token ({len(tokens)})")
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, kind in zip(tokens, types) if kind == _CONTROL_TOKEN])
    return tokenizer


def chat_template(reader: GGUFFile, path: Path) -> str | None:
    template = reader.fields.get("tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{path.name}: tokenizer.chat_template is a {type(template).__name__}, not a string")
    return template


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return None


def _copy_unpermuted(target: torch.Tensor, weight: torch.Tensor, num_heads: int) -> None:
    """Writes ``weight`` into ``target`` undoing llama.cpp's row permutation of a q/k projection
    (per head, its converter interleaves the rows of the two rotary halves)."""
    rows = weight.shape[0]
    split = (num_heads, 2, rows // num_heads // 2, *weight.shape[1:])
    target.view(split).copy_(weight.view(num_heads, rows // num_heads // 2, 2, *weight.shape[1:]).transpose(1, 2))


def _string_list(value, key: str, path: Path) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{path.name}: {key} is not a list of strings")
    return value
