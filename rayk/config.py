"""Engine configuration: plain dataclasses, validated once at construction.

They hold plain values (str, int, float, bool, None, small dicts), plus at most a user's
``EvictionPolicy`` object, so they pickle and pass through a Ray actor's constructor unchanged.
Every error names the field and the allowed range.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields

from rayk.cache.policies import EvictionPolicy, make_policy
from rayk.hashing import HASH_ALGORITHMS

ATTENTION_BACKENDS = ("auto", "torch", "flash_attn")
MIN_SECRET_BYTES = 16
"""The shortest secret rayk takes from an environment variable (an integrity key, a tenant secret)."""
DTYPES = ("auto", "float32", "float16", "bfloat16")


def check_env_name(option: str, name) -> None:
    """A ValueError naming ``option`` unless ``name`` can name an environment variable."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ValueError(f"{option} must name an environment variable (letters, digits, _), got {name!r}")


def secret_from_env(option: str, name: str, where: str) -> bytes:
    """The secret in the environment variable ``name`` of this process, at least
    ``MIN_SECRET_BYTES`` bytes; a ValueError naming ``option``, the variable and ``where`` (never
    the value) if it is unset or shorter."""
    value = os.environ.get(name)
    if value is None or len(value.encode("utf-8")) < MIN_SECRET_BYTES:
        state = "is not set" if value is None else f"holds fewer than {MIN_SECRET_BYTES} bytes"
        raise ValueError(f"{option}: the environment variable {name} {state} {where}")
    return value.encode("utf-8")


def _check_positive_int(owner: str, name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}.{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{owner}.{name} must be >= 1, got {value}")


def _check_choice(owner: str, name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{owner}.{name} must be one of {choices}, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Which weights to serve, and how.

    ``model`` is a local Hugging Face directory (config.json + safetensors). ``device`` is
    "auto" (CUDA when present, else CPU), "cpu", "cuda" or "cuda:N". ``dtype`` "auto" takes the
    checkpoint's dtype on CUDA and float32 on the CPU. ``max_model_len`` (tokens, prompt plus
    output) defaults to the model's ``max_position_embeddings``. ``conversion_cache_dir`` keeps a
    converted copy of a GGUF model for quick later starts (None: never written).
    """

    model: str
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    attention_backend: str = "auto"
    conversion_cache_dir: str | None = "~/.cache/rayk"

    def __post_init__(self):
        if not isinstance(self.model, str) or not self.model:
            raise TypeError(f"model must be a path to a Hugging Face directory or a .gguf file, got {self.model!r}")
        _check_choice("ModelConfig", "dtype", self.dtype, DTYPES)
        if not isinstance(self.device, str) or not (self.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", self.device)):
            raise ValueError(f"ModelConfig.device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        _check_positive_int("ModelConfig", "max_model_len", self.max_model_len, allow_none=True)
        _check_choice("ModelConfig", "attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        if self.conversion_cache_dir is not None and (not isinstance(self.conversion_cache_dir, str) or not self.conversion_cache_dir):
            raise TypeError(f"ModelConfig.conversion_cache_dir must be a directory path string or None, got {self.conversion_cache_dir!r}")


@dataclass(frozen=True)
class CacheConfig:
    """The device KV pool and the tiers below it.

    ``block_size`` is tokens per block. ``num_device_blocks`` None sizes the pool from memory:
    on CUDA, ``gpu_memory_utilization`` of the device's memory minus what is in use; on the CPU,
    enough blocks for ``max_num_seqs`` full-length sequences, capped at ``cpu_kv_cache_bytes``.
    ``host_blocks`` > 0 adds a host-memory tier of that many blocks, or ``host_bytes`` > 0 one of
    as many blocks as fit in that many bytes (not both); ``disk_dir`` adds a disk
    tier there, holding at most ``disk_bytes``. ``eviction_policy`` (a registered name or an
    ``EvictionPolicy``) orders eviction in every tier; each tier gets its own copy.
    ``lifecycle_sample_rate`` is the fraction of blocks whose lifetimes are measured.
    ``compress`` None or "int8" for both lower tiers, or per tier, e.g. {"disk": "int8"}: cold
    blocks stored as int8 with a scale per block and head (approximate; off by default).
    ``disk_write_timeout_s``: a segment write running longer is *hung* (the disk tier stops
    waiting for it and drops new blocks until it ends). ``integrity_key_env`` names an environment
    variable holding a per-deployment secret (at least ``MIN_SECRET_BYTES`` bytes), read
    in the process that builds the cache: with it, the disk tier, snapshots and peer transfers
    seal what they write with an HMAC under that key and refuse whatever is not sealed under it
    (for directories others can write to). The config holds the variable's name, never the secret.
    """

    block_size: int = 16
    num_device_blocks: int | None = None
    enable_prefix_caching: bool = True
    hash_algorithm: str = "xxh3_128"
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_bytes: int = 1 << 30
    host_blocks: int = 0
    host_bytes: int | None = None
    disk_dir: str | None = None
    disk_bytes: int = 8 << 30
    eviction_policy: str | EvictionPolicy = "lru"
    lifecycle_sample_rate: float = 0.01
    compress: str | dict | None = None
    disk_write_timeout_s: float = 10.0
    integrity_key_env: str | None = None

    def integrity_key(self) -> bytes | None:
        """The secret ``integrity_key_env`` names, read from this process's environment (None
        without one); a ValueError naming the variable, never its value, if it is unset or short."""
        if self.integrity_key_env is None:
            return None
        return secret_from_env("CacheConfig.integrity_key_env", self.integrity_key_env, "in this process")

    def compression(self, tier: str) -> bool:
        """Whether ``tier`` ("host" or "disk") stores blocks as int8."""
        setting = self.compress.get(tier) if isinstance(self.compress, dict) else self.compress
        return setting == "int8"

    def __post_init__(self):
        _check_positive_int("CacheConfig", "block_size", self.block_size)
        _check_positive_int("CacheConfig", "num_device_blocks", self.num_device_blocks, allow_none=True)
        if not isinstance(self.enable_prefix_caching, bool):
            raise TypeError(f"CacheConfig.enable_prefix_caching must be a bool, got {self.enable_prefix_caching!r}")
        _check_choice("CacheConfig", "hash_algorithm", self.hash_algorithm, HASH_ALGORITHMS)
        if isinstance(self.gpu_memory_utilization, bool) or not isinstance(self.gpu_memory_utilization, (int, float)):
            raise TypeError(f"CacheConfig.gpu_memory_utilization must be a number, got {self.gpu_memory_utilization!r}")
        if not (0.0 < self.gpu_memory_utilization <= 1.0):
            raise ValueError(f"CacheConfig.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        _check_positive_int("CacheConfig", "cpu_kv_cache_bytes", self.cpu_kv_cache_bytes)
        if isinstance(self.host_blocks, bool) or not isinstance(self.host_blocks, int) or self.host_blocks < 0:
            raise ValueError(f"CacheConfig.host_blocks must be an int >= 0 (0 = no host tier), got {self.host_blocks!r}")
        if self.host_bytes is not None:
            if isinstance(self.host_bytes, bool) or not isinstance(self.host_bytes, int) or self.host_bytes < 0:
                raise ValueError(f"CacheConfig.host_bytes must be an int >= 0 (0 = no host tier) or None, got {self.host_bytes!r}")
            if self.host_blocks:
                raise ValueError(f"give host_blocks or host_bytes, not both (host_blocks={self.host_blocks}, host_bytes={self.host_bytes})")
        if self.disk_dir is not None and (not isinstance(self.disk_dir, str) or not self.disk_dir):
            raise TypeError(f"CacheConfig.disk_dir must be a directory path string or None, got {self.disk_dir!r}")
        _check_positive_int("CacheConfig", "disk_bytes", self.disk_bytes)
        make_policy(self.eviction_policy)
        if isinstance(self.lifecycle_sample_rate, bool) or not isinstance(self.lifecycle_sample_rate, (int, float)) or not (
            0.0 <= self.lifecycle_sample_rate <= 1.0
        ):
            raise ValueError(f"CacheConfig.lifecycle_sample_rate must be in [0, 1], got {self.lifecycle_sample_rate!r}")
        timeout = self.disk_write_timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
            raise ValueError(f"CacheConfig.disk_write_timeout_s must be a number of seconds > 0, got {timeout!r}")
        if self.integrity_key_env is not None:
            check_env_name("CacheConfig.integrity_key_env", self.integrity_key_env)
        settings = self.compress.items() if isinstance(self.compress, dict) else [("host", self.compress)]
        for tier, setting in settings:
            if tier not in ("host", "disk") or setting not in (None, "int8"):
                raise ValueError(
                    f"CacheConfig.compress must be None, 'int8', or a dict from 'host'/'disk' to None or 'int8'; got {self.compress!r}"
                )


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits: sequences per step, and tokens per step (chunked prefill)."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 4096

    def __post_init__(self):
        _check_positive_int("SchedulerConfig", "max_num_seqs", self.max_num_seqs)
        _check_positive_int("SchedulerConfig", "max_num_batched_tokens", self.max_num_batched_tokens)


_CACHE_OPTIONS = tuple(f.name for f in fields(CacheConfig) if f.name not in ("block_size", "num_device_blocks"))
_SCHEDULER_OPTIONS = ("max_num_batched_tokens",)
_MODEL_OPTIONS = ("attention_backend", "conversion_cache_dir")
ENGINE_OPTIONS = tuple(sorted(_CACHE_OPTIONS + _SCHEDULER_OPTIONS + _MODEL_OPTIONS))


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()

    @classmethod
    def from_options(
        cls,
        model: str,
        *,
        block_size: int = 16,
        device: str = "auto",
        dtype: str = "auto",
        num_device_blocks: int | None = None,
        max_model_len: int | None = None,
        max_num_seqs: int = 64,
        **options,
    ) -> EngineConfig:
        """The config of ``rayk.LLM(model, ...)``'s flat keyword options (``ENGINE_OPTIONS`` and
        the named ones); an unknown option is a TypeError that lists the known ones."""
        unknown = sorted(set(options) - set(ENGINE_OPTIONS))
        if unknown:
            raise TypeError(f"unknown option(s) {unknown}; known options: {list(ENGINE_OPTIONS)}")
        pick = lambda names: {k: v for k, v in options.items() if k in names}  # noqa: E731
        return cls(
            model=ModelConfig(os.fspath(model) if isinstance(model, os.PathLike) else model, dtype=dtype, device=device, max_model_len=max_model_len, **pick(_MODEL_OPTIONS)),
            cache=CacheConfig(block_size=block_size, num_device_blocks=num_device_blocks, **pick(_CACHE_OPTIONS)),
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, **pick(_SCHEDULER_OPTIONS)),
        )
