"""Loading a decoder from a GGUF file (llama.cpp's format), dequantized on load.

The file is read with the ``gguf`` package (llama.cpp's own reader). Its metadata (``llama.*``,
``qwen3.*``) becomes the same ``DecoderArchitecture`` a config.json gives, its tensor names map
onto the Hugging Face names the safetensors loader checks, and every shape is checked before
anything is dequantized. llama.cpp's converter permutes the rows of Llama's q and k projections
(for its own rotary layout); they are permuted back here. The tokenizer is rebuilt from
``tokenizer.ggml.*`` (byte-level BPE for ``gpt2``-type vocabularies).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import xxhash
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from rayk.model.architecture import DecoderArchitecture
from rayk.model.file_identity import add_file_samples

SUPPORTED_QUANT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
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


def open_gguf(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as error:
        raise ValueError(f"{path.name} is not a readable GGUF file ({type(error).__name__}: {error})") from None


def gguf_architecture(reader, path: Path) -> DecoderArchitecture:
    """The architecture from GGUF metadata, as a config.json would give it."""
    def field(name: str, default=None):
        found = reader.fields.get(name)
        return default if found is None else _value(found)

    arch_name = field("general.architecture")
    if arch_name not in _ARCHITECTURES:
        raise ValueError(f"{path.name}: unsupported GGUF architecture {arch_name!r}; rayk serves {sorted(_ARCHITECTURES)}")

    def meta(key: str, default=None):
        value = field(f"{arch_name}.{key}", default)
        if value is None:
            raise ValueError(f"{path.name}: GGUF metadata lacks {arch_name}.{key}")
        return value

    hidden, heads = int(meta("embedding_length")), int(meta("attention.head_count"))
    tensor_names = {t.name for t in reader.tensors}
    token_count = len(reader.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in reader.fields else None
    config = {
        "architectures": [_ARCHITECTURES[arch_name]],
        "vocab_size": int(field(f"{arch_name}.vocab_size") or token_count or 0),
        "hidden_size": hidden,
        "intermediate_size": int(meta("feed_forward_length")),
        "num_hidden_layers": int(meta("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta("attention.head_count_kv", heads)),
        "head_dim": int(field(f"{arch_name}.attention.key_length") or hidden // heads),
        "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(meta("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta("context_length")),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "eos_token_id": field("tokenizer.ggml.eos_token_id"),
    }
    return DecoderArchitecture.from_hf_config(config)


def gguf_tensors(reader, arch: DecoderArchitecture, expected: dict[str, tuple[int, ...]], dtype: torch.dtype, path: Path) -> dict[str, torch.Tensor]:
    """Every tensor under its Hugging Face name, checked, then dequantized into ``dtype``."""
    named = {}
    for tensor in reader.tensors:
        if tensor.name == "rope_freqs.weight":
            raise ValueError(f"{path.name}: per-frequency RoPE factors (rope_freqs.weight, llama3 scaling) are not supported in GGUF yet")
        name = _hf_name(tensor.name)
        if name is None or (arch.tie_word_embeddings and name == "lm_head.weight"):
            raise ValueError(f"{path.name}: unexpected tensor {tensor.name!r}")
        quant = tensor.tensor_type.name
        if quant not in SUPPORTED_QUANT_TYPES:
            raise ValueError(f"{path.name}: tensor {tensor.name} is {quant}, not one of the supported types {SUPPORTED_QUANT_TYPES}")
        shape = tuple(int(d) for d in reversed(tensor.shape))
        if name not in expected:
            raise ValueError(f"weights do not match the GGUF metadata: unexpected tensor {tensor.name!r}")
        if shape != expected[name]:
            raise ValueError(f"weights do not match the GGUF metadata: {tensor.name} has shape {shape}, the metadata implies {expected[name]}")
        named[name] = tensor
    missing = sorted(set(expected) - set(named))
    if missing:
        raise ValueError(f"weights do not match the GGUF metadata: missing tensors {missing[:5]}")
    tensors = {}
    for name, tensor in named.items():
        try:
            values = dequantize_tensor(tensor)
        except Exception as error:
            raise ValueError(f"{path.name}: cannot dequantize {tensor.name} ({type(error).__name__}: {error}); is the file truncated?") from None
        if arch.architecture == "LlamaForCausalLM" and name.endswith(("q_proj.weight", "k_proj.weight")):
            values = _unpermute(values, arch.num_heads if "q_proj" in name else arch.num_kv_heads)
        tensors[name] = torch.from_numpy(values).to(dtype)
    return tensors


def dequantize_tensor(tensor) -> np.ndarray:
    """A GGUF tensor as a writable float32 array in row-major (Hugging Face) shape."""
    from gguf.quants import dequantize

    shape = tuple(int(d) for d in reversed(tensor.shape))
    return np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)


def gguf_identity(reader, path: Path) -> str:
    """File identity plus quant types, so a Q4_1 and an F16 copy of one model differ."""
    digest = xxhash.xxh3_128(b"gguf:")
    digest.update(",".join(f"{t.name}={t.tensor_type.name}" for t in reader.tensors).encode())
    add_file_samples(digest, path)
    return digest.hexdigest()


def gguf_tokenizer(reader, path: Path) -> Tokenizer | None:
    """A byte-level BPE tokenizer from ``tokenizer.ggml.*``; None if the file has none."""
    if "tokenizer.ggml.tokens" not in reader.fields:
        return None
    kind = _value(reader.fields["tokenizer.ggml.model"])
    if kind != "gpt2":
        raise ValueError(f"{path.name}: tokenizer type {kind!r} is not supported; rayk builds byte-level BPE ('gpt2') tokenizers")
    tokens = _value(reader.fields["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in _value(reader.fields["tokenizer.ggml.merges"])]
    types = _value(reader.fields["tokenizer.ggml.token_type"]) if "tokenizer.ggml.token_type" in reader.fields else [1] * len(tokens)
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, kind in zip(tokens, types) if kind == _CONTROL_TOKEN])
    return tokenizer


def chat_template(reader) -> str | None:
    field = reader.fields.get("tokenizer.chat_template")
    return None if field is None else _value(field)


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return None


def _unpermute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's row permutation of a q/k projection (pairs interleaved per head)."""
    rows = weight.shape[0]
    return weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _value(field):
    """A metadata field as a plain Python value."""
    value = field.contents()
    return value.tolist() if isinstance(value, np.ndarray) else value
