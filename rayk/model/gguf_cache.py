"""A converted copy of a GGUF model in the user's cache directory, so the next start is quick.

Reading a GGUF file means dequantizing every tensor (for SmolLM2, about 0.9 CPU-seconds, the
largest part of a cold load after importing torch). After the first load, the model is kept
under ``cache_dir/gguf-<key>/``: the dequantized, fused float32 weights as safetensors, the
architecture and special tokens as JSON, and the tokenizer as tokenizer.json. A later load maps
the safetensors file instead of reading it, so its pages are read as the model first touches
them. An entry is written by a background thread (the first model serves meanwhile) to a
temporary directory and renamed into place; one that cannot be read is ignored (and rebuilt).

Nothing in an entry is trusted as found:

- the key is a digest of the GGUF file's whole content (``file_digest``), not its path or
  mtime, so a changed file names another entry;
- the entry records ``content_digest`` of what it serves (architecture, every tensor, the
  tokenizer, its special tokens and chat template); a load recomputes it, and a mismatch is
  logged, the entry removed and the model converted again;
- an entry whose directory or files are not this user's own regular files, or that others can
  write, is converted again rather than read;
- the weights identity that goes into the engine's fingerprint (``served_identity``) is derived
  from the source's digest and the digest of the content actually served, never read from the
  entry, so a planted entry that passes the checks still gets a fingerprint of its own and the
  KV it spills is never served to an engine running the real model.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import shutil
import stat
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

_FORMAT = 2
# Files in an entry: the owner's only, like the directory mkdtemp makes.
_FILE_MODE = 0o600
# Entries being written by this process, so that loading one model twice writes it once.
_writes: dict[Path, threading.Thread] = {}
_writes_lock = threading.Lock()


def cache_entry(cache_dir: Path, source_digest: str) -> Path:
    """The entry of the GGUF file whose whole content hashes to ``source_digest`` (``file_digest``)."""
    key = xxhash.xxh3_64_hexdigest(f"{_FORMAT}:{source_digest}".encode())
    return cache_dir / f"gguf-{key}"


def content_digest(arch: DecoderArchitecture, weights: dict[str, torch.Tensor], tokenizer: TextTokenizer | None) -> str:
    """xxh3_128 (hex) of everything a converted model serves: the architecture, each tensor's
    name, dtype, shape and bytes, the tokenizer, its special tokens and chat template.

    Hashing SmolLM2's 520 MB of float32 weights takes 0.02 s in memory and 0.06 s from a mapped
    file in the page cache (measured on a 2-core VM)."""
    digest = xxhash.xxh3_128(b"rayk-converted-gguf\0")
    digest.update(json.dumps(_architecture_fields(arch), sort_keys=True).encode())
    for name in sorted(weights):
        tensor = weights[name].detach().contiguous().cpu()
        digest.update(f"\0{name}:{tensor.dtype}:{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    if tokenizer is None:
        digest.update(b"\0no tokenizer")
    else:
        digest.update(json.dumps(_special_tokens(tokenizer), sort_keys=True).encode())
        digest.update(tokenizer.backend.to_str().encode())
    return digest.hexdigest()


def served_identity(source_digest: str, served_content_digest: str) -> str:
    """The weights identity of a GGUF model as served: the source file's content digest and the
    ``content_digest`` of the served model (in the dtype it is served in)."""
    return xxhash.xxh3_128_hexdigest(f"gguf:{source_digest}:{served_content_digest}".encode())


def load_cached(entry: Path, dtype: torch.dtype, source_digest: str | None = None):
    """(architecture, fused weights in ``dtype``, tokenizer, identity), or None if absent,
    unreadable, not this user's own, or not matching its recorded ``content_digest`` (then the
    entry is removed, with a warning, so that the caller's conversion rewrites it).

    ``source_digest``: the GGUF file's ``file_digest``; the identity is then ``served_identity``
    of it and the loaded content. Without it, the identity recorded in the entry is returned.
    """
    try:
        if not _is_own(entry):
            logger.warning("the converted model in %s is not this user's own or others can write to it; it is not used", entry)
            return None
        meta = json.loads((entry / "meta.json").read_text())
        if meta.get("format") != _FORMAT:
            return None
        arch = DecoderArchitecture(**{**meta["architecture"], "torch_dtype": torch.float32, "eos_token_ids": tuple(meta["architecture"]["eos_token_ids"])})
        stored = load_file(str(entry / "model.safetensors"))
        tokenizer = None
        if meta["tokenizer"] is not None:
            special = meta["tokenizer"]
            backend = Tokenizer.from_file(str(entry / "tokenizer.json"))
            tokenizer = TextTokenizer(backend, special["bos_token_id"], special["eos_token_id"], special["chat_template"])
        recorded, identity = meta["content_digest"], meta["identity"]
    except Exception:
        return None
    stored_digest = content_digest(arch, stored, tokenizer)
    if stored_digest != recorded:
        logger.warning("the converted model in %s does not match the digest it was written with; it is removed and converted again", entry)
        shutil.rmtree(entry, ignore_errors=True)
        return None
    weights = {name: t.to(dtype) for name, t in stored.items()}
    if source_digest is not None:
        served = stored_digest if dtype == torch.float32 else content_digest(arch, weights, tokenizer)
        identity = served_identity(source_digest, served)
    return arch, weights, tokenizer, identity


def _is_own(entry: Path) -> bool:
    """The entry is a real directory of this user's, holding only regular files of this user's,
    and none of them is writable by group or others (links are not followed)."""
    paths = [entry, *entry.iterdir()]
    for path in paths:
        info = os.lstat(path)
        kind_ok = stat.S_ISDIR(info.st_mode) if path == entry else stat.S_ISREG(info.st_mode)
        if not kind_ok or info.st_uid != os.getuid() or info.st_mode & 0o022:
            return False
    return True


def _architecture_fields(arch: DecoderArchitecture) -> dict:
    return {k: v for k, v in dataclasses.asdict(arch).items() if k != "torch_dtype"}


def _special_tokens(tokenizer: TextTokenizer) -> dict:
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "chat_template": tokenizer.chat_template}


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
            special = None
            if tokenizer is not None:
                tokenizer.backend.save(str(staging / "tokenizer.json"))
                special = _special_tokens(tokenizer)
            assert all(t.dtype == torch.float32 for t in fused.values()), "the cache keeps float32 weights only"
            save_file({n: t.contiguous() for n, t in fused.items()}, str(staging / "model.safetensors"))
            meta = {"format": _FORMAT, "architecture": _architecture_fields(arch), "tokenizer": special, "identity": identity, "content_digest": content_digest(arch, fused, tokenizer)}
            (staging / "meta.json").write_text(json.dumps(meta))
            # Set explicitly: a umask that lets the group write (002) would make loads refuse the entry.
            for file in staging.iterdir():
                file.chmod(_FILE_MODE)
            os.replace(staging, entry)
            staging = None
    except Exception as error:  # safetensors and tokenizers report I/O failures as their own errors
        logger.warning("could not write the converted model to %s (%s); the next load converts it again", entry, error)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _is_complete(entry: Path) -> bool:
    """Written in this format and this user's own: anything else is replaced."""
    try:
        return _is_own(entry) and json.loads((entry / "meta.json").read_text()).get("format") == _FORMAT
    except (OSError, ValueError):
        return False
