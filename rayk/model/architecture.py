"""The decoder architecture read from a Hugging Face ``config.json``: Llama and Qwen3."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen3ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MAX_POSITION_EMBEDDINGS = 1 << 21
"""The most positions a model may declare: its rotary tables (cos and sin for every position)
are built at load, 1 GiB at this bound with 64-dim heads."""


@dataclass(frozen=True)
class DecoderArchitecture:
    """Shapes and constants of a Llama-style decoder. ``qk_norm`` is Qwen3's per-head RMSNorm."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict = field(default_factory=dict)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    torch_dtype: torch.dtype = torch.float32
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_hf_config(cls, config: dict) -> DecoderArchitecture:
        architectures = config.get("architectures") or []
        architecture = architectures[0] if architectures else None
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"unsupported architecture {architecture!r} in config.json; rayk serves {SUPPORTED_ARCHITECTURES}")
        if config.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {config['hidden_act']!r} in config.json; rayk serves 'silu'")
        if config.get("use_sliding_window"):
            raise ValueError("config.json asks for sliding-window attention, which rayk does not serve")
        checkpoint_dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
        if checkpoint_dtype not in TORCH_DTYPES:
            raise ValueError(f"unsupported dtype {checkpoint_dtype!r} in config.json; rayk serves {tuple(TORCH_DTYPES)}")
        rope = _rope_parameters(config)
        try:
            num_heads = int(config["num_attention_heads"])
            hidden_size = int(config["hidden_size"])
            arch = cls(
                architecture=architecture,
                vocab_size=int(config["vocab_size"]),
                hidden_size=hidden_size,
                intermediate_size=int(config["intermediate_size"]),
                num_layers=int(config["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(config.get("num_key_value_heads") or num_heads),
                head_dim=int(config.get("head_dim") or hidden_size // num_heads),
                rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope.get("rope_theta", 10000.0)),
                rope_scaling=rope,
                max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                attention_bias=bool(config.get("attention_bias", False)),
                mlp_bias=bool(config.get("mlp_bias", False)),
                qk_norm=architecture == "Qwen3ForCausalLM",
                torch_dtype=TORCH_DTYPES[checkpoint_dtype],
                eos_token_ids=_as_tuple(config.get("eos_token_id")),
            )
        except KeyError as missing:
            raise ValueError(f"config.json lacks the field {missing.args[0]!r}") from None
        if not 1 <= arch.max_position_embeddings <= MAX_POSITION_EMBEDDINGS:
            raise ValueError(f"max_position_embeddings is {arch.max_position_embeddings}; rayk serves 1 to {MAX_POSITION_EMBEDDINGS}")
        if arch.num_heads % arch.num_kv_heads:
            raise ValueError(f"num_attention_heads ({arch.num_heads}) must be a multiple of num_key_value_heads ({arch.num_kv_heads})")
        rope_type = arch.rope_scaling.get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"unsupported rope_type {rope_type!r} in config.json; rayk serves {SUPPORTED_ROPE_TYPES}")
        return arch

    @classmethod
    def from_directory(cls, path: Path) -> DecoderArchitecture:
        config_path = path / "config.json"
        if not config_path.is_file():
            raise ValueError(f"model directory {str(path)!r} has no config.json")
        config = json.loads(config_path.read_text())
        arch = cls.from_hf_config(config)
        generation_config = path / "generation_config.json"
        if generation_config.is_file():
            eos = _as_tuple(json.loads(generation_config.read_text()).get("eos_token_id"))
            if eos:
                arch = replace(arch, eos_token_ids=eos)
        return arch


def _rope_parameters(config: dict) -> dict:
    """transformers 5 writes ``rope_parameters``; older configs ``rope_theta`` + ``rope_scaling``."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    if "rope_theta" in config and "rope_theta" not in params:
        params["rope_theta"] = config["rope_theta"]
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    return params


def _as_tuple(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)

