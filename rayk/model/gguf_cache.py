"""A converted copy of a GGUF model in the user's cache directory, so the next start is quick.

Reading a GGUF file means dequantizing every tensor (for SmolLM2, about 0.9 CPU-seconds, the
largest part of a cold load after importing torch). After the first load, the model is kept
under ``cache_dir/gguf-<key>/``: the dequantized, fused float32 weights as safetensors, the
architecture and special tokens as JSON, and the tokenizer as tokenizer.json. A later load maps
the safetensors file instead of reading it, so its pages are read as the model first touches
them. The key covers the GGUF file's path, size and modification time, so a changed file is
converted again. An entry is written by a background thread (the first model serves meanwhile)
to a temporary directory and renamed into place; one that cannot be read is ignored (and
rebuilt), never trusted.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path

import torch
import xxhash
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from rayk.model.architecture import DecoderArchitecture
from rayk.model.tokenizer import TextTokenizer

logger = logging.getLogger(__name__)

_FORMAT = 1
# Entries being written by this process, so that loading one model twice writes it once.
_writes: dict[Path, threading.Thread] = {}
_writes_lock = threading.Lock()


def cache_entry(cache_dir: Path, gguf_file: Path) -> Path:
    stat = gguf_file.stat()
    key = xxhash.xxh3_64_hexdigest(f"{_FORMAT}:{gguf_file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return cache_dir / f"gguf-{key}"


def load_cached(entry: Path, dtype: torch.dtype):
    """(architecture, fused weights in ``dtype``, tokenizer, identity), or None if absent or unreadable."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
        if meta.get("format") != _FORMAT:
            return None
        arch = DecoderArchitecture(**{**meta["architecture"], "torch_dtype": torch.float32, "eos_token_ids": tuple(meta["architecture"]["eos_token_ids"])})
        weights = {name: t.to(dtype) for name, t in load_file(str(entry / "model.safetensors")).items()}
        tokenizer = None
        if meta["tokenizer"] is not None:
            special = meta["tokenizer"]
            backend = Tokenizer.from_file(str(entry / "tokenizer.json"))
            tokenizer = TextTokenizer(backend, special["bos_token_id"], special["eos_token_id"], special["chat_template"])
        return arch, weights, tokenizer, meta["identity"]
    except Exception:
        return None


def store_cached_in_background(entry: Path, arch: DecoderArchitecture, fused: dict[str, torch.Tensor], tokenizer: TextTokenizer | None, identity: str) -> threading.Thread:
    """Starts ``store_cached`` on a non-daemon thread (so that an exiting interpreter finishes the
    write rather than leaving a half-written staging directory) and returns it. ``fused`` must
    not be modified until the thread ends; the model only reads its weights. An entry already
    being written by this process is not written twice: its thread is returned."""
    with _writes_lock:
        running = _writes.get(entry)
        if running is not None and running.is_alive():
            return running
        thread = threading.Thread(target=store_cached, args=(entry, arch, fused, tokenizer, identity), name=f"rayk-cache-{entry.name}")
        _writes[entry] = thread
        thread.start()
        return thread


def store_cached(entry: Path, arch: DecoderArchitecture, fused: dict[str, torch.Tensor], tokenizer: TextTokenizer | None, identity: str) -> None:
    """Writes an entry atomically; a failure (disk full, read-only home) only costs the cache.

    Workers on one machine start together, so an entry has one writer at a time across
    processes: the one holding ``<entry>.lock``; the others skip the write. The holder first
    removes staging directories that writers killed mid-write left behind.

    ``fused`` must be float32 (dequantized as is): a copy rounded to 16 bits would serve later
    float32 loads rounded weights.
    """
    staging = None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        with open(entry.parent / f"{entry.name}.lock", "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # another process is writing this entry
            if _is_complete(entry):
                return  # written by another process since this one looked
            for stale in entry.parent.glob(f"{entry.name}.*"):
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
            shutil.rmtree(entry, ignore_errors=True)  # an unreadable entry, or none
            staging = Path(tempfile.mkdtemp(prefix=entry.name + ".", dir=entry.parent))
            architecture = {k: v for k, v in dataclasses.asdict(arch).items() if k != "torch_dtype"}
            special = None
            if tokenizer is not None:
                tokenizer.backend.save(str(staging / "tokenizer.json"))
                special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "chat_template": tokenizer.chat_template}
            assert all(t.dtype == torch.float32 for t in fused.values()), "the cache keeps float32 weights only"
            save_file({n: t.contiguous() for n, t in fused.items()}, str(staging / "model.safetensors"))
            meta = {"format": _FORMAT, "architecture": architecture, "tokenizer": special, "identity": identity}
            (staging / "meta.json").write_text(json.dumps(meta))
            os.replace(staging, entry)
            staging = None
    except Exception as error:  # safetensors and tokenizers report I/O failures as their own errors
        logger.warning("could not write the converted model to %s (%s); the next load converts it again", entry, error)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _is_complete(entry: Path) -> bool:
    try:
        return json.loads((entry / "meta.json").read_text()).get("format") == _FORMAT
    except (OSError, ValueError):
        return False
