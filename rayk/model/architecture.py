"""The decoder architecture read from a Hugging Face ``config.json``: Llama and Qwen3."""

from __future__ import annotations

import json
import math
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
        """The architecture, or a ValueError naming config.json and the field that is wrong: every
        count must be a positive int (a whole-number float is taken; a bool, a string or 2.7 is not)."""
        if not isinstance(config, dict):
            raise ValueError(f"config.json must hold a JSON object, got a {type(config).__name__}")
        architectures = config.get("architectures") or []
        if not isinstance(architectures, list):
            raise ValueError(f"config.json: architectures must be a list of names, got {architectures!r:.80}")
        architecture = architectures[0] if architectures else None
        if not isinstance(architecture, str) or architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"unsupported architecture {architecture!r:.80} in config.json; rayk serves {SUPPORTED_ARCHITECTURES}")
        if config.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {config['hidden_act']!r:.80} in config.json; rayk serves 'silu'")
        if config.get("use_sliding_window"):
            raise ValueError("config.json asks for sliding-window attention, which rayk does not serve")
        checkpoint_dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
        if not isinstance(checkpoint_dtype, str) or checkpoint_dtype not in TORCH_DTYPES:
            raise ValueError(f"unsupported dtype {checkpoint_dtype!r:.80} in config.json; rayk serves {tuple(TORCH_DTYPES)}")
        rope = _rope_parameters(config)
        num_heads = _positive(config, "num_attention_heads")
        hidden_size = _positive(config, "hidden_size")
        arch = cls(
            architecture=architecture,
            vocab_size=_positive(config, "vocab_size"),
            hidden_size=hidden_size,
            intermediate_size=_positive(config, "intermediate_size"),
            num_layers=_positive(config, "num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=_positive(config, "num_key_value_heads", num_heads),
            head_dim=_positive(config, "head_dim", hidden_size // num_heads),
            rms_norm_eps=_positive(config, "rms_norm_eps", 1e-6, float),
            rope_theta=_positive(rope, "rope_theta", 10000.0, float),
            rope_scaling=rope,
            max_position_embeddings=_number(config, "max_position_embeddings", 2048),  # range checked below
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(config.get("attention_bias", False)),
            mlp_bias=bool(config.get("mlp_bias", False)),
            qk_norm=architecture == "Qwen3ForCausalLM",
            torch_dtype=TORCH_DTYPES[checkpoint_dtype],
            eos_token_ids=_as_tuple(config.get("eos_token_id")),
        )
        if not 1 <= arch.max_position_embeddings <= MAX_POSITION_EMBEDDINGS:
            raise ValueError(f"config.json: max_position_embeddings is {arch.max_position_embeddings}; rayk serves 1 to {MAX_POSITION_EMBEDDINGS}")
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
        arch = cls.from_hf_config(read_json_object(config_path))
        generation_config = path / "generation_config.json"
        if generation_config.is_file():
            eos = _as_tuple(read_json_object(generation_config).get("eos_token_id"), generation_config.name)
            if eos:
                arch = replace(arch, eos_token_ids=eos)
        return arch


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object, or a ValueError naming the file and the fault."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read {path.name}: {error}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path.name} must hold a JSON object, got a {type(value).__name__}")
    return value


def _number(config: dict, key: str, default=None, kind: type = int):
    """``config[key]`` (``default`` if absent or null) as a finite ``kind``, or a ValueError
    naming config.json and the key."""
    value = config.get(key)
    if value is None:
        value = default
    if value is None:
        raise ValueError(f"config.json lacks the field {key!r}")
    if isinstance(value, float) and kind is int and value.is_integer():
        value = int(value)  # some writers store counts as 32.0
    wanted = int if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, wanted) or not -math.inf < value < math.inf:
        raise ValueError(f"config.json: {key} is {value!r:.80}, not {'an integer' if kind is int else 'a finite number'}")
    return kind(value)


def _positive(config: dict, key: str, default=None, kind: type = int):
    """``_number``, which must also be above 0."""
    value = _number(config, key, default, kind)
    if value <= 0:
        raise ValueError(f"config.json: {key} is {value!r}, not a positive {'integer' if kind is int else 'number'}")
    return value


def _rope_parameters(config: dict) -> dict:
    """transformers 5 writes ``rope_parameters``; older configs ``rope_theta`` + ``rope_scaling``.
    Every value but the type's name must be a number (a ValueError names the key otherwise)."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ValueError(f"config.json: rope_scaling is {params!r:.80}, not an object")
    params = dict(params)
    if "rope_theta" in config and "rope_theta" not in params:
        params["rope_theta"] = config["rope_theta"]
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    params = {key: value for key, value in params.items() if value is not None}
    for key, value in params.items():
        if key == "rope_type":
            if not isinstance(value, str):
                raise ValueError(f"config.json: rope_type is {value!r:.80}, not a name")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"config.json: RoPE parameter {key} is {value!r:.80}, not a finite number")
    return params


def _as_tuple(value, source: str = "config.json") -> tuple[int, ...]:
    """eos_token_id (one id or a list of them) as a tuple of non-negative ints."""
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
        raise ValueError(f"{source}: eos_token_id is {value!r:.80}, not a token id or a list of them")
    return tuple(values)

