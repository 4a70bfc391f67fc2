"""Hostile files and inputs (issue 15): each attack refused in bounded time and memory, nothing
outside rayk's directories touched, and the engine still serving correct tokens afterwards.

The script builds a tiny random Llama (safetensors, a BPE tokenizer and a chat template; the
same weights as a GGUF file) and computes, with transformers, the greedy tokens of a fixed
prompt: the reference. Each attack then runs in a fresh child process (this script with
``--attack NAME``) under ``RLIMIT_AS`` = ``--memory-limit-gib`` and a wall-clock limit of
``--timeout-s``. The child prepares the hostile input (a planted file, a model file, a string),
then confronts rayk with it: that one step is the attack, timed, with the growth of the peak RSS
over the RSS just before it (``VmHWM`` reset through ``/proc/self/clear_refs``). It reports JSON
on stdout. The attacks, by class:

* the disk tier's directory: a link at ``segment_dir`` (the predictable
  ``<disk_dir>/rayk-kv-<16 hex>``), links at the names the writer picks (the attacker guesses
  them: the name generator is replaced), dangling links and links out of the directory,
  directories and FIFOs named like segments (at start, and swapped in during a run), a sparse
  file whose header claims 4 GiB, a segment of NaN blocks under the prompt's true keys with
  recomputed checksums, and a user's files (``notes.tmp``, a ``backup.kvb`` copy of a segment,
  temporaries named as rayk names its own) at the top of ``disk_dir``;
* snapshots for ``LLM.load_cache``: planted junk (a dangling link, a FIFO, a directory,
  ``report.tmp``), a header bomb, NaN blocks;
* GGUF metadata: an array-count bomb (``tokenizer.ggml.token_type`` claiming 10**8 entries), a
  layer count of 10**8, ``head_count`` 0, a context length of 10**9;
* config.json: ``num_hidden_layers`` 10**8, ``num_attention_heads`` 0, a shard index naming
  ``../../etc/passwd``;
* text: a 100 MB prompt, a chat template rendering ``'A' * 10**9``, nested ``range(100000)``
  loops;
* pools: ``num_device_blocks=10**9``, ``host_blocks=10**9``;
* the conversion cache: an entry with changed weights, an entry whose file is a link out of it,
  and a poisoned entry whose digest was recomputed to match (an engine on it spills KV to a
  shared ``disk_dir``; a clean engine there must not be served that KV).

Each row passes four checks:

* **bounded**: the child ended before ``--timeout-s``, under the memory limit, the attack took
  at most ``--max-attack-s`` and grew the peak RSS by at most ``--max-rss-growth-mib``;
* **as expected**: refused with a ``ValueError`` / ``TypeError`` where the input must be
  refused, served where rayk must skip the hostile entries and go on;
* **untouched**: a sentinel directory outside rayk's directories, which the planted links point
  into, is unchanged (every file's bytes, mode and mtime; no entry added) after the child, and
  so is every file the attack planted that is not rayk's to delete (a user's files, the links
  themselves, FIFOs, directories);
* **correct tokens**: afterwards, in the same child, the engine that suffered the attack (or,
  where the attack was refused at construction, a new one on the clean model) generates the
  prompt's greedy tokens, equal to the reference.

The ``baseline`` row runs the same steps on a clean ``disk_dir``: what an engine start costs
without any attack. The process exits 1 if any row fails a check. JSON goes to ``--out``
(default ``benchmarks/results/hostile.json``).

    python benchmarks/hostile.py                      # every attack, about a minute on 2 cores
    python benchmarks/hostile.py --quick              # one or two per class (tests/test_hostile_bench.py)
    python benchmarks/hostile.py --attacks gguf_array_count_bomb,text_prompt_100mb
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "hostile.json"
VOCAB_SIZE = 320
BLOCK_SIZE = 16
MAX_MODEL_LEN = 256
PROMPT_TOKENS = 40  # two full blocks: what the disk tier and snapshots hold
MAX_TOKENS = 8
DEVICE_BLOCKS = 64
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
OLD = 10**6  # seconds since the epoch: a file last written in 1970 looks long stale
INTEGRITY_KEY_ENV = "RAYK_HOSTILE_INTEGRITY_KEY"
REFUSALS = ("ValueError", "TypeError")


# -- the parent: models, reference, sentinel -----------------------------------------------------


def write_tokenizer(directory: Path) -> None:
    """A small byte-level BPE trained on a few sentences, so string prompts and chat work."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(["The quick brown fox jumps over the lazy dog.", "rayk caches blocks."] * 20, trainer)
    tokenizer.save(str(directory / "tokenizer.json"))


def write_model(directory: Path) -> None:
    """A tiny random Llama (GQA, default RoPE, so that its GGUF copy is the same model) with a
    tokenizer and a chat template; weights large enough that greedy tokens vary."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.5,
        bos_token_id=None,
        eos_token_id=None,
    )
    LlamaForCausalLM(config).eval().save_pretrained(directory)
    write_tokenizer(directory)
    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))


_GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def write_gguf(path: Path, model_dir: Path, token_types: int = 0, **metadata) -> None:
    """The Llama in ``model_dir`` as a GGUF file, laid out as llama.cpp's converter does (q/k
    rows permuted); ``metadata`` replaces a field (``block_count=10**8``), and ``token_types``
    writes a ``tokenizer.ggml.token_type`` array of that many entries."""
    import gguf
    import numpy as np
    from safetensors.torch import load_file

    config = json.loads((model_dir / "config.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config["hidden_size"] // heads
    fields = {
        "block_count": config["num_hidden_layers"],
        "context_length": config["max_position_embeddings"],
        "embedding_length": config["hidden_size"],
        "feed_forward_length": config["intermediate_size"],
        "head_count": heads,
        "head_count_kv": kv_heads,
        "key_length": head_dim,
        "value_length": head_dim,
        "rope_freq_base": config.get("rope_theta", config.get("rope_parameters", {}).get("rope_theta", 10000.0)),
        "layer_norm_rms_eps": config["rms_norm_eps"],
        "vocab_size": config["vocab_size"],
    } | metadata
    writer = gguf.GGUFWriter(str(path), "llama")
    for name, value in fields.items():
        getattr(writer, f"add_{name}")(value)
    if token_types:
        writer.add_token_types([1] * token_types)
    for name, tensor in load_file(str(model_dir / "model.safetensors")).items():
        values = tensor.float().numpy()
        if name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        elif name == "lm_head.weight":
            gguf_name = "output.weight"
        else:
            _, _, layer, *rest = name.split(".")
            module = ".".join(rest[:-1])
            gguf_name = f"blk.{layer}.{_GGUF_LAYER_NAMES[module]}.{rest[-1]}"
            if module in ("self_attn.q_proj", "self_attn.k_proj"):
                n = heads if module == "self_attn.q_proj" else kv_heads
                values = values.reshape(n, 2, values.shape[0] // n // 2, *values.shape[1:]).swapaxes(1, 2).reshape(values.shape)
        writer.add_tensor(gguf_name, np.ascontiguousarray(values))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def reference_tokens(model_dir: Path, prompt: list[int]) -> list[int]:
    """transformers' greedy continuation of the prompt: what every engine must produce."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        ids = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False)
    return ids[0, len(prompt) :].tolist()


def fingerprint(path: Path) -> dict:
    """What must not change about a path: its type, mode, mtime, size, a link's target, a
    regular file's sha256 (never opened through a link, never a FIFO)."""
    info = path.lstat()
    mark = {"mode": stat.filemode(info.st_mode), "mtime_ns": info.st_mtime_ns}
    if stat.S_ISLNK(info.st_mode):
        mark["target"] = os.readlink(path)
    elif stat.S_ISREG(info.st_mode):
        mark["size"] = info.st_size
        mark["sha256"] = sha256_head(path)
    return mark


def sha256_head(path: Path, limit: int = 16 << 20) -> str:
    """sha256 of the file's first ``limit`` bytes (all of a sentinel file; the head of a bomb)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while limit > 0 and (chunk := f.read(min(limit, 1 << 20))):
            digest.update(chunk)
            limit -= len(chunk)
    return digest.hexdigest()


def tree(root: Path) -> dict[str, dict]:
    """``fingerprint`` of every entry under ``root`` (links not followed), by relative path."""
    marks = {}
    for directory, names, files in os.walk(root):
        for name in names + files:
            path = Path(directory) / name
            marks[str(path.relative_to(root))] = fingerprint(path)
    return marks


def plant_sentinel(outside: Path) -> None:
    """Files outside every rayk directory: the targets of the links the attacks plant."""
    (outside / "trap").mkdir(parents=True)  # a link at segment_dir points here
    (outside / "precious.txt").write_text("the user's precious file\n")
    (outside / "ssh").mkdir()
    (outside / "ssh" / "id_ed25519").write_bytes(os.urandom(64))
    (outside / "ssh" / "id_ed25519").chmod(0o600)


def tree_changes(before: dict, after: dict) -> list[str]:
    changes = [f"removed {p}" for p in before if p not in after] + [f"added {p}" for p in after if p not in before]
    return changes + [f"changed {p}" for p in before if p in after and before[p] != after[p]]


# -- the child: one attack -----------------------------------------------------------------------


def current_rss() -> int:
    """Resident bytes now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Resets the peak RSS (``VmHWM``) to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Peak resident bytes since the last reset (or since the process started)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class Attack:
    """What one child does. ``run(ctx)`` prepares the input, calls ``ctx.attack`` once with the
    step that confronts rayk, then ``ctx.serve``."""

    name: str
    what: str
    expected: str  # "refused" or "served"
    run: Callable[[Context], None]


@dataclass
class Context:
    work: Path  # the scratch directory of the whole run (model, reference, sentinel)
    own: Path  # this attack's directory
    prompt: list[int]
    reference: list[int]
    result: dict = field(default_factory=dict)
    detail: dict = field(default_factory=dict)
    planted: dict = field(default_factory=dict)  # path -> fingerprint, for what must survive

    @property
    def model_dir(self) -> Path:
        return self.work / "model"

    @property
    def gguf(self) -> Path:
        return self.work / "model.gguf"

    @property
    def outside(self) -> Path:
        return self.work / "outside"

    def engine(self, model: Path | None = None, **options):
        import rayk

        options.setdefault("conversion_cache_dir", str(self.own / "conversion"))  # never ~/.cache/rayk
        options.setdefault("num_device_blocks", DEVICE_BLOCKS)
        return rayk.LLM(str(model or self.model_dir), device="cpu", block_size=BLOCK_SIZE, max_model_len=MAX_MODEL_LEN, **options)

    def params(self):
        import rayk

        return rayk.SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)

    def attack(self, step: Callable[[], object]):
        """Runs the attack's step, timed and with its peak RSS growth; a ValueError or TypeError
        (or anything else, which fails the row) is recorded as the refusal. Returns what the
        step returned, or None when it raised."""
        exact = reset_peak_rss()
        before, start = current_rss(), time.perf_counter()
        value, outcome, error = None, "served", None
        try:
            value = step()
        except Exception as refusal:  # noqa: BLE001 -- the refusal is the measurement
            outcome, error = "refused", f"{type(refusal).__name__}: {str(refusal).replace(str(self.work), '<tmp>')}"
            self.result["error_type"] = type(refusal).__name__
        self.result.update(
            outcome=outcome,
            error=error,
            attack_s=time.perf_counter() - start,
            rss_growth_mib=max(0, peak_rss() - before) / 2**20,
            peak_rss_exact=exact,
        )
        return value

    def serve(self, llm=None) -> None:
        """The reference prompt's greedy tokens from ``llm`` (None: a new engine on the clean model)."""
        llm = llm or self.engine()
        [output] = llm.generate(self.prompt, self.params())
        self.record(output)

    def record(self, output) -> None:
        """The reference prompt's output, as the row's tokens."""
        self.result.update(tokens=output.token_ids, tokens_correct=output.token_ids == self.reference, num_cached_tokens=output.num_cached_tokens)

    def keep(self, *paths: Path) -> None:
        """Records paths that rayk must leave exactly as they are."""
        for path in paths:
            self.planted[str(path)] = fingerprint(path)

    def disk_stats(self, llm) -> None:
        disk = llm.stats()["disk_tier"]
        keys = ("cached_blocks", "rejected", "skipped_entries", "foreign_files", "write_errors", "degraded_reason")
        self.detail["disk_tier"] = {k: disk[k] for k in keys if disk.get(k)}

    def finish(self) -> dict:
        changed = []
        for path, mark in self.planted.items():
            try:
                if fingerprint(Path(path)) != mark:
                    changed.append(f"changed {path}")
            except FileNotFoundError:
                changed.append(f"removed {path}")
        return self.result | {"planted": len(self.planted), "planted_changed": changed, "detail": self.detail}


def run_child(args) -> int:
    """``--attack NAME``: one attack under the memory limit; prints its JSON on stdout."""
    limit = int(args.memory_limit_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    report, sys.stdout = sys.stdout, sys.stderr  # rayk's and the libraries' prints stay off the report
    work = Path(args.work_dir)
    reference = json.loads((work / "reference.json").read_text())
    ctx = Context(work, work / "attacks" / args.attack, reference["prompt"], reference["tokens"])
    ctx.own.mkdir(parents=True)
    import rayk.llm  # noqa: F401 -- torch and rayk's modules loaded before, not during, the attack

    ATTACKS[args.attack].run(ctx)
    print(json.dumps(ctx.finish()), file=report, flush=True)
    return 0


# -- the attacks: the disk tier ------------------------------------------------------------------


def _warm_disk(ctx: Context, disk: Path) -> Path:
    """An engine on ``disk`` computes the prompt and moves its blocks to disk; returns the
    engine's ``segment_dir`` holding that segment."""
    llm = ctx.engine(disk_dir=str(disk))
    llm.generate(ctx.prompt, ctx.params())
    llm.offload(ctx.prompt, "disk")
    segment_dir = llm.engine.disk.segment_dir
    llm.close()
    return segment_dir


def _restart_on(ctx: Context, disk: Path, hits_expected: bool) -> None:
    """The attack on a planted directory: an engine starts on it, serves the prompt (with disk
    hits when ``hits_expected``), then clears its disk cache and closes (rayk's delete paths)."""
    llm = ctx.attack(lambda: ctx.engine(disk_dir=str(disk)))
    if llm is None:
        return
    ctx.serve(llm)
    ctx.disk_stats(llm)
    if hits_expected and not ctx.result["num_cached_tokens"]:
        ctx.result["tokens_correct"] = False
        ctx.detail["problem"] = "the sound segment beside the planted entries was not served"
    llm.reset_prefix_cache()
    llm.close()


def baseline(ctx: Context) -> None:
    disk = ctx.own / "disk"
    _warm_disk(ctx, disk)
    _restart_on(ctx, disk, hits_expected=True)


def disk_link_at_segment_dir(ctx: Context) -> None:
    disk = ctx.own / "disk"
    segment_dir = _warm_disk(ctx, disk)  # the name is predictable: fingerprint and layout
    shutil.rmtree(segment_dir)
    segment_dir.symlink_to(ctx.outside / "trap", target_is_directory=True)
    ctx.keep(segment_dir)
    llm = ctx.attack(lambda: ctx.engine(disk_dir=str(disk)))
    if llm is None:
        return
    llm.generate(ctx.prompt, ctx.params())
    llm.offload(ctx.prompt, "disk")  # blocks the tier must drop, not write through the link
    ctx.serve(llm)
    ctx.disk_stats(llm)
    llm.reset_prefix_cache()
    llm.close()


def disk_link_at_write_name(ctx: Context) -> None:
    import secrets
    import types

    from rayk.cache import disk_tier

    predicted = iter(["cd" * 12, "ce" * 12])  # the attacker guessed the writer's next two names
    disk_tier.secrets = types.SimpleNamespace(token_hex=lambda n: next(predicted, None) or secrets.token_hex(n))
    llm = ctx.engine(disk_dir=str(ctx.own / "disk"))
    segment_dir = llm.engine.disk.segment_dir
    temporary, segment = segment_dir / f".{'cd' * 12}.tmp", segment_dir / f"seg-{'ce' * 12}.kvb"
    temporary.symlink_to(ctx.outside / "precious.txt")
    segment.symlink_to(ctx.outside / "precious.txt")
    ctx.keep(temporary)  # the segment's link is replaced by the rename: that is the point

    def write_twice():
        second = [(t + 1) % VOCAB_SIZE for t in ctx.prompt]
        for prompt in (ctx.prompt, second):
            llm.generate(prompt, ctx.params())
            llm.offload(prompt, "disk")
            llm.engine.disk.flush()

    ctx.attack(write_twice)
    ctx.detail["segment_name_now"] = "a regular file" if segment.is_file() and not segment.is_symlink() else "a link"
    ctx.serve(llm)
    ctx.disk_stats(llm)
    llm.reset_prefix_cache()
    llm.close()


def disk_dangling_links(ctx: Context) -> None:
    disk = ctx.own / "disk"
    segment_dir = _warm_disk(ctx, disk)
    elsewhere = ctx.own / "elsewhere"
    elsewhere.mkdir()
    [real] = segment_dir.glob("*.kvb")
    shutil.copyfile(real, elsewhere / real.name)  # a sound segment, reachable only through a link
    links = {
        f"seg-{'ee' * 12}.kvb": ctx.outside / "missing",
        f".{'ee' * 12}.tmp": ctx.outside / "missing",
        f"seg-{'ef' * 12}.kvb": ctx.outside / "precious.txt",
        f"seg-{'eg' * 12}.kvb": elsewhere / real.name,
    }
    for name, target in links.items():
        (segment_dir / name).symlink_to(target)
    ctx.keep(*(segment_dir / name for name in links), elsewhere / real.name)
    _restart_on(ctx, disk, hits_expected=True)


def disk_directory_named_like_segment(ctx: Context) -> None:
    disk = ctx.own / "disk"
    segment_dir = _warm_disk(ctx, disk)
    planted = [segment_dir / f"seg-{'dd' * 12}.kvb", segment_dir / f".{'dd' * 12}.tmp"]
    for directory in planted:
        directory.mkdir()
        os.utime(directory, (OLD, OLD))
    ctx.keep(*planted)
    _restart_on(ctx, disk, hits_expected=True)


def disk_fifo_at_start(ctx: Context) -> None:
    disk = ctx.own / "disk"
    segment_dir = _warm_disk(ctx, disk)
    planted = [segment_dir / f"seg-{'ff' * 12}.kvb", segment_dir / f".{'ff' * 12}.tmp"]
    for fifo in planted:
        os.mkfifo(fifo)
        os.utime(fifo, (OLD, OLD))
    ctx.keep(*planted)
    _restart_on(ctx, disk, hits_expected=True)


def disk_fifo_swapped_in(ctx: Context) -> None:
    llm = ctx.engine(disk_dir=str(ctx.own / "disk"))
    llm.generate(ctx.prompt, ctx.params())
    llm.offload(ctx.prompt, "disk")  # the prompt's blocks are now only on disk
    llm.engine.disk.flush()
    fifos = list(llm.engine.disk.segment_dir.glob("*.kvb"))
    for segment in fifos:  # swapped in while the engine runs: the next read meets a FIFO
        segment.unlink()
        os.mkfifo(segment)
    ctx.detail["fifos"] = len(fifos)
    ctx.attack(lambda: llm.generate(ctx.prompt, ctx.params()))
    ctx.serve(llm)
    ctx.disk_stats(llm)
    llm.close()


def disk_sparse_header_bomb(ctx: Context) -> None:
    from rayk.cache.block_codec import MAGIC

    disk = ctx.own / "disk"
    segment_dir = _warm_disk(ctx, disk)
    with (segment_dir / f"seg-{'bb' * 12}.kvb").open("wb") as f:
        f.write(MAGIC + (0xFFFFFFFF).to_bytes(4, "little"))  # a 4 GiB header
        f.truncate(5 << 30)  # sparse: 5 GiB claimed, a few KiB on disk (rayk's name and magic: it may delete it)
    _restart_on(ctx, disk, hits_expected=True)


def _forged_batch(ctx: Context, llm, values: str = "nan"):
    """A block batch of the prompt's full blocks under their true keys (so every check on keys
    passes) holding NaN (``values`` "nan") or finite noise ("noise": only a seal tells it from
    the real KV), its checksums computed over that payload."""
    import torch

    from rayk.cache.block_codec import encode
    from rayk.cache.block_pool import BlockRecord
    from rayk.hashing import token_bytes

    layout, hasher = llm.engine.kv_cache.layout, llm.engine.kv_cache_manager.hasher
    keys = llm.block_hashes(ctx.prompt)
    parents = [hasher.root(), *keys[:-1]]
    records = [BlockRecord(i, k, p, i, token_bytes(ctx.prompt[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE])) for i, (k, p) in enumerate(zip(keys, parents))]
    shape = (2, layout.num_layers, len(records), layout.block_size, layout.num_kv_heads, layout.head_dim)
    kv = torch.full(shape, float("nan")) if values == "nan" else torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 5
    return encode(records, kv.to(layout.dtype), hasher.fingerprint, layout)


def disk_nan_segment(ctx: Context) -> None:
    disk = ctx.own / "disk"
    llm = ctx.engine(disk_dir=str(disk))
    (llm.engine.disk.segment_dir / f"seg-{'aa' * 12}.kvb").write_bytes(_forged_batch(ctx, llm).tobytes())
    llm.close()
    llm = ctx.attack(lambda: ctx.engine(disk_dir=str(disk)))
    ctx.detail["indexed_at_start"] = len(llm.engine.disk)
    ctx.serve(llm)  # the NaN blocks are looked up, read and refused: recomputed, never served
    ctx.disk_stats(llm)
    if not llm.stats()["disk_tier"]["rejected"]:
        ctx.result["tokens_correct"] = False
        ctx.detail["problem"] = "the NaN blocks were never read and refused"
    llm.close()


def disk_foreign_files(ctx: Context) -> None:
    from rayk.cache.block_codec import MAGIC

    disk = ctx.own / "disk"
    segment_dir = _warm_disk(ctx, disk)
    [real] = segment_dir.glob("*.kvb")
    foreign = {
        "notes.tmp": b"my notes",
        ".notes.tmp": b"hidden notes",
        f".{'33' * 12}.tmp": MAGIC + b"named as rayk names its temporaries, but not in its directory",
        "report.tmp": MAGIC + b"a report",
        "backup.kvb": real.read_bytes(),  # the user's copy of a sound segment
        "old.kvb": MAGIC + b"damaged",
    }
    for name, data in foreign.items():
        (disk / name).write_bytes(data)
        os.utime(disk / name, (OLD, OLD))
    ctx.keep(*(disk / name for name in foreign))
    _restart_on(ctx, disk, hits_expected=True)


# -- snapshots -----------------------------------------------------------------------------------


def _snapshot(ctx: Context, **options) -> tuple[Path, list[Path], int]:
    """A snapshot of the prompt's blocks (by an engine with ``options``), with a user's files at
    its top beforehand; returns its path, the directories holding its segments, and how many
    blocks it holds."""
    from rayk.cache.block_codec import MAGIC

    snapshot = ctx.own / "snapshot"
    snapshot.mkdir()
    for name, data in {"report.tmp": b"the user's report", f".{'44' * 12}.tmp": MAGIC + b"named as rayk names its temporaries"}.items():
        (snapshot / name).write_bytes(data)
        os.utime(snapshot / name, (OLD, OLD))
        ctx.keep(snapshot / name)
    llm = ctx.engine(**options)
    llm.generate(ctx.prompt, ctx.params())
    saved = llm.save_cache(str(snapshot))
    llm.close()
    homes = sorted({p.parent for p in snapshot.rglob("*.kvb")})
    return snapshot, homes, saved


def _load_snapshot(ctx: Context, snapshot: Path, expect_hits: bool, **options) -> None:
    llm = ctx.engine(**options)
    loaded = ctx.attack(lambda: llm.load_cache(str(snapshot)))
    ctx.detail["loaded_blocks"] = loaded
    ctx.serve(llm)
    if expect_hits and not ctx.result["num_cached_tokens"]:
        ctx.result["tokens_correct"] = False
        ctx.detail["problem"] = "the snapshot's sound blocks were not served"
    llm.close()


def snapshot_planted_junk(ctx: Context) -> None:
    snapshot, homes, saved = _snapshot(ctx)
    ctx.detail["saved_blocks"] = saved
    for home in homes:
        (home / f"seg-{'ee' * 12}.kvb").symlink_to(ctx.outside / "missing")
        (home / f"seg-{'ef' * 12}.kvb").symlink_to(ctx.outside / "precious.txt")
        os.mkfifo(home / f"seg-{'ff' * 12}.kvb")
        (home / f"seg-{'dd' * 12}.kvb").mkdir()
        (home / "report.tmp").write_bytes(b"another report")
        os.utime(home / "report.tmp", (OLD, OLD))
        ctx.keep(*(home / n for n in (f"seg-{'ee' * 12}.kvb", f"seg-{'ef' * 12}.kvb", f"seg-{'ff' * 12}.kvb", f"seg-{'dd' * 12}.kvb", "report.tmp")))
    _load_snapshot(ctx, snapshot, expect_hits=True)


def snapshot_header_bomb(ctx: Context) -> None:
    from rayk.cache.block_codec import MAGIC

    snapshot, homes, _ = _snapshot(ctx)
    for home in homes:
        with (home / f"seg-{'bb' * 12}.kvb").open("wb") as f:
            f.write(MAGIC + (0xFFFFFFFF).to_bytes(4, "little"))
            f.truncate(5 << 30)
        ctx.keep(home / f"seg-{'bb' * 12}.kvb")  # a snapshot is read, never written
    _load_snapshot(ctx, snapshot, expect_hits=False)


def snapshot_nan_payload(ctx: Context) -> None:
    snapshot, homes, _ = _snapshot(ctx)
    llm = ctx.engine()
    for home in homes:
        for segment in home.glob("*.kvb"):
            segment.unlink()
        (home / f"seg-{'aa' * 12}.kvb").write_bytes(_forged_batch(ctx, llm).tobytes())
    llm.close()
    _load_snapshot(ctx, snapshot, expect_hits=False)
    if ctx.detail.get("loaded_blocks"):
        ctx.result["tokens_correct"] = False
        ctx.detail["problem"] = "NaN blocks were loaded"


def _sealed(ctx: Context) -> dict:
    """Engine options with an integrity key (``INTEGRITY_KEY_ENV``, set in this child)."""
    os.environ[INTEGRITY_KEY_ENV] = "the hostile benchmark's deployment secret"
    return {"integrity_key_env": INTEGRITY_KEY_ENV}


def disk_forged_segment(ctx: Context) -> None:
    sealed = _sealed(ctx)
    disk = ctx.own / "disk"
    llm = ctx.engine(disk_dir=str(disk), **sealed)
    (llm.engine.disk.segment_dir / f"seg-{'ab' * 12}.kvb").write_bytes(_forged_batch(ctx, llm, "noise").tobytes())
    llm.close()
    llm = ctx.attack(lambda: ctx.engine(disk_dir=str(disk), **sealed))
    ctx.detail["indexed_at_start"] = len(llm.engine.disk)
    ctx.serve(llm)
    ctx.disk_stats(llm)
    if ctx.detail["indexed_at_start"] or ctx.result["num_cached_tokens"]:
        ctx.result["tokens_correct"] = False
        ctx.detail["problem"] = "the forged segment was indexed or served"
    llm.close()


def snapshot_forged_payload(ctx: Context) -> None:
    sealed = _sealed(ctx)
    snapshot, homes, _ = _snapshot(ctx, **sealed)
    llm = ctx.engine(**sealed)
    for home in homes:
        for segment in home.glob("*.kvb"):
            segment.unlink()
        (home / f"seg-{'ac' * 12}.kvb").write_bytes(_forged_batch(ctx, llm, "noise").tobytes())
    llm.close()
    _load_snapshot(ctx, snapshot, expect_hits=False, **sealed)


# -- model files ---------------------------------------------------------------------------------


def _refused_model(ctx: Context, path: Path) -> None:
    ctx.attack(lambda: ctx.engine(path))
    ctx.serve()


def _gguf_attack(**metadata) -> Callable[[Context], None]:
    def run(ctx: Context) -> None:
        path = ctx.own / "model.gguf"
        write_gguf(path, ctx.model_dir, **metadata)
        llm = ctx.attack(lambda: ctx.engine(path))
        ctx.serve(llm or ctx.engine(ctx.gguf))

    return run


def gguf_array_count_bomb(ctx: Context) -> None:
    import gguf

    path = ctx.own / "model.gguf"
    write_gguf(path, ctx.model_dir, token_types=2)
    data = bytearray(path.read_bytes())
    key = b"tokenizer.ggml.token_type"
    at = data.index(key) + len(key)
    assert struct.unpack_from("<I", data, at)[0] == gguf.GGUFValueType.ARRAY
    struct.pack_into("<Q", data, at + 8, 10**8)  # the array's count; it holds 2 entries
    path.write_bytes(bytes(data))
    _refused_model(ctx, path)


def _config_attack(index: dict | None = None, **changes) -> Callable[[Context], None]:
    def run(ctx: Context) -> None:
        model = ctx.own / "model"
        shutil.copytree(ctx.model_dir, model)
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps(config | changes))
        if index is not None:
            (model / "model.safetensors.index.json").write_text(json.dumps(index))
        _refused_model(ctx, model)

    return run


# -- text ----------------------------------------------------------------------------------------


def text_prompt_100mb(ctx: Context) -> None:
    llm = ctx.engine()
    prompt = "A" * 10**8  # built before the attack: its 100 MB are the attacker's, not rayk's
    ctx.attack(lambda: llm.generate(prompt, ctx.params()))
    prompt = None  # its 100 MB freed before serving
    ctx.serve(llm)


def _template_attack(template: str) -> Callable[[Context], None]:
    def run(ctx: Context) -> None:
        model = ctx.own / "model"
        shutil.copytree(ctx.model_dir, model)
        (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
        llm = ctx.engine(model)
        ctx.attack(lambda: llm.chat([{"role": "user", "content": "hi"}], ctx.params()))
        ctx.serve(llm)

    return run


# -- pools ---------------------------------------------------------------------------------------


def _pool_attack(**options) -> Callable[[Context], None]:
    def run(ctx: Context) -> None:
        llm = ctx.attack(lambda: ctx.engine(**options))
        ctx.serve(llm)

    return run


# -- the conversion cache ------------------------------------------------------------------------


def _cached_entry(ctx: Context) -> tuple[Path, Path]:
    """The clean GGUF model loaded once, so that its converted copy is in a cache of this
    attack's own; returns the cache and the entry."""
    import torch

    from rayk.model.loader import load_model

    cache = ctx.own / "conversion"
    loaded = load_model(ctx.gguf, torch.float32, torch.device("cpu"), cache)
    loaded.cache_write.join()
    [entry] = [p for p in cache.iterdir() if p.is_dir()]
    return cache, entry


def _poison(entry: Path, recompute_digest: bool) -> None:
    """Changes one weight in the entry, as someone with write access to it would; with
    ``recompute_digest`` the recorded digest is made to match."""
    from safetensors.torch import load_file, save_file

    from rayk.model import gguf_cache
    from rayk.model.architecture import DecoderArchitecture

    weights = load_file(str(entry / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] * -3
    save_file(weights, str(entry / "model.safetensors"))
    (entry / "model.safetensors").chmod(0o600)
    if recompute_digest:
        meta = json.loads((entry / "meta.json").read_text())
        arch = DecoderArchitecture(**{**meta["architecture"], "eos_token_ids": tuple(meta["architecture"]["eos_token_ids"])})
        meta["content_digest"] = gguf_cache.content_digest(arch, weights, None)
        (entry / "meta.json").write_text(json.dumps(meta))


class _Warnings:
    """Collects the conversion cache's warnings (what rayk says when it refuses an entry)."""

    def __enter__(self):
        import logging

        self.messages: list[str] = []
        self.handler = logging.Handler(logging.WARNING)
        self.handler.emit = lambda record: self.messages.append(record.getMessage()[:160])
        logging.getLogger("rayk.model.gguf_cache").addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        import logging

        logging.getLogger("rayk.model.gguf_cache").removeHandler(self.handler)


def conversion_cache_tampered(ctx: Context) -> None:
    cache, entry = _cached_entry(ctx)
    _poison(entry, recompute_digest=False)
    with _Warnings() as warnings:
        llm = ctx.attack(lambda: ctx.engine(ctx.gguf, conversion_cache_dir=str(cache)))
    ctx.detail["warnings"] = warnings.messages
    if llm is not None:
        ctx.serve(llm)
        if not warnings.messages:
            ctx.result["tokens_correct"] = False
            ctx.detail["problem"] = "no warning: the tampered entry was not noticed"


def conversion_cache_symlinked_entry(ctx: Context) -> None:
    cache, entry = _cached_entry(ctx)
    elsewhere = ctx.own / "elsewhere.safetensors"
    _poison(entry, recompute_digest=True)  # even with a matching digest: the link alone disqualifies it
    (entry / "model.safetensors").rename(elsewhere)
    (entry / "model.safetensors").symlink_to(elsewhere)
    ctx.keep(elsewhere)
    with _Warnings() as warnings:
        llm = ctx.attack(lambda: ctx.engine(ctx.gguf, conversion_cache_dir=str(cache)))
    ctx.detail["warnings"] = warnings.messages
    if llm is not None:
        ctx.serve(llm)


def conversion_cache_planted_kv(ctx: Context) -> None:
    cache, entry = _cached_entry(ctx)
    _poison(entry, recompute_digest=True)  # passes every check of the entry: only the fingerprint differs
    shared = ctx.own / "shared-disk"
    poisoned = ctx.engine(ctx.gguf, conversion_cache_dir=str(cache), disk_dir=str(shared))
    [output] = poisoned.generate(ctx.prompt, ctx.params())
    poisoned.offload(ctx.prompt, "disk")
    poisoned.close()
    ctx.detail["poisoned_engine_tokens_differ"] = output.token_ids != ctx.reference
    clean = ctx.engine(ctx.gguf, conversion_cache_dir=None, disk_dir=str(shared))
    first = ctx.attack(lambda: clean.generate(ctx.prompt, ctx.params()))  # its first request on the shared disk_dir
    ctx.disk_stats(clean)
    if first is not None:
        ctx.record(first[0])
        if first[0].num_cached_tokens:
            ctx.result["tokens_correct"] = False
            ctx.detail["problem"] = "the clean engine was served the poisoned engine's KV"
    clean.close()


ATTACKS: dict[str, Attack] = {
    a.name: a
    for a in [
        Attack("baseline", "no attack: an engine restarts on its disk_dir and serves from it", "served", baseline),
        Attack("disk_link_at_segment_dir", "a link at <disk_dir>/rayk-kv-<hex> to a directory outside", "served", disk_link_at_segment_dir),
        Attack("disk_link_at_write_name", "links at the writer's next temporary and segment names (guessed)", "served", disk_link_at_write_name),
        Attack("disk_dangling_links", "dangling *.kvb / *.tmp links, a link out, a link to a sound segment", "served", disk_dangling_links),
        Attack("disk_directory_named_like_segment", "directories named like a segment and a temporary", "served", disk_directory_named_like_segment),
        Attack("disk_fifo_at_start", "FIFOs named like a segment and a temporary at start", "served", disk_fifo_at_start),
        Attack("disk_fifo_swapped_in", "the segments replaced by FIFOs while the engine runs", "served", disk_fifo_swapped_in),
        Attack("disk_sparse_header_bomb", "a sparse 5 GiB segment whose header claims 4 GiB", "served", disk_sparse_header_bomb),
        Attack("disk_forged_segment", "with an integrity key: a segment of finite forged KV under the prompt's true keys, checksums recomputed", "served", disk_forged_segment),
        Attack("disk_nan_segment", "a segment of NaN blocks under the prompt's true keys, checksums recomputed", "served", disk_nan_segment),
        Attack("disk_foreign_files", "notes.tmp, backup.kvb, old.kvb, rayk-named *.tmp at the top of disk_dir", "served", disk_foreign_files),
        Attack("snapshot_planted_junk", "load_cache: a dangling link, a link out, a FIFO, a directory, report.tmp", "served", snapshot_planted_junk),
        Attack("snapshot_header_bomb", "load_cache: a sparse segment whose header claims 4 GiB", "refused", snapshot_header_bomb),
        Attack("snapshot_nan_payload", "load_cache: NaN blocks under the prompt's true keys", "served", snapshot_nan_payload),
        Attack("snapshot_forged_payload", "load_cache with an integrity key: finite forged KV under the true keys, checksums recomputed", "refused", snapshot_forged_payload),
        Attack("gguf_array_count_bomb", "GGUF: tokenizer.ggml.token_type claims 10**8 entries, holds 2", "refused", gguf_array_count_bomb),
        Attack("gguf_layer_count", "GGUF: block_count 10**8", "refused", _gguf_attack(block_count=10**8)),
        Attack("gguf_head_count_zero", "GGUF: head_count 0", "refused", _gguf_attack(head_count=0)),
        Attack("gguf_context_length", "GGUF: context_length 10**9", "refused", _gguf_attack(context_length=10**9)),
        Attack("config_layer_count", "config.json: num_hidden_layers 10**8", "refused", _config_attack(num_hidden_layers=10**8)),
        Attack("config_heads_zero", "config.json: num_attention_heads 0", "refused", _config_attack(num_attention_heads=0)),
        Attack("config_shard_escape", "shard index: a weight in ../../etc/passwd", "refused", _config_attack({"weight_map": {"model.embed_tokens.weight": "../../etc/passwd"}})),
        Attack("text_prompt_100mb", "a prompt of 10**8 characters", "refused", text_prompt_100mb),
        Attack("text_template_huge_output", "a chat template rendering 'A' * 10**9", "refused", _template_attack("{{ 'A' * 10**9 }}")),
        Attack("text_template_nested_loops", "a chat template of nested range(100000) loops", "refused", _template_attack("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}")),
        Attack("pool_device_blocks", "num_device_blocks=10**9", "refused", _pool_attack(num_device_blocks=10**9)),
        Attack("pool_host_blocks", "host_blocks=10**9", "refused", _pool_attack(host_blocks=10**9)),
        Attack("conversion_cache_tampered", "a conversion-cache entry with changed weights", "served", conversion_cache_tampered),
        Attack("conversion_cache_symlinked_entry", "an entry whose weights file is a link out of it", "served", conversion_cache_symlinked_entry),
        Attack("conversion_cache_planted_kv", "a poisoned entry with a matching digest spills KV to a shared disk_dir", "served", conversion_cache_planted_kv),
    ]
}
QUICK = [
    "disk_fifo_at_start",
    "disk_nan_segment",
    "disk_foreign_files",
    "snapshot_planted_junk",
    "snapshot_forged_payload",
    "gguf_array_count_bomb",
    "config_shard_escape",
    "text_prompt_100mb",
    "pool_device_blocks",
    "conversion_cache_tampered",
]


# -- the parent: run every attack and judge it ---------------------------------------------------


def run_attack(name: str, args, work: Path, sentinel: dict) -> dict:
    """One attack in a fresh child; its report, the parent's measurements and the four checks."""
    command = [sys.executable, str(Path(__file__).resolve()), "--attack", name, "--work-dir", str(work), "--memory-limit-gib", str(args.memory_limit_gib)]
    start = time.perf_counter()
    try:
        child = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout_s, check=False)
        returncode, stdout, stderr = child.returncode, child.stdout, child.stderr
    except subprocess.TimeoutExpired as expired:  # the child is killed
        returncode, stdout = None, ""
        stderr = expired.stderr.decode(errors="replace") if isinstance(expired.stderr, bytes) else expired.stderr or ""
    wall_s = time.perf_counter() - start
    attack = ATTACKS[name]
    row = {"attack": name, "what": attack.what, "expected": attack.expected, "child_wall_s": wall_s, "returncode": returncode}
    report = None
    if returncode == 0 and stdout.strip():
        try:
            report = json.loads(stdout.strip().splitlines()[-1])
        except json.JSONDecodeError:
            report = None
    outside_changes = tree_changes(sentinel, tree(work / "outside"))
    if report is None or "outcome" not in report:  # no report, or the attack's step never ran
        why = f"timed out after {args.timeout_s:.0f} s" if returncode is None else f"child exited {returncode}"
        row.update(outcome="crashed", error=why, stderr_tail=stderr[-2000:], outside_changes=outside_changes)
        row["checks"] = {"bounded": False, "as_expected": False, "untouched": False, "correct_tokens": False}
        row["passed"] = False
        return row
    row.update(report)
    row["outside_changes"] = outside_changes
    refused_cleanly = report["outcome"] == "refused" and report.get("error_type") in REFUSALS
    row["checks"] = {
        "bounded": report["attack_s"] <= args.max_attack_s and report["rss_growth_mib"] <= args.max_rss_growth_mib,
        "as_expected": refused_cleanly if attack.expected == "refused" else report["outcome"] == "served",
        "untouched": not outside_changes and not report["planted_changed"],
        "correct_tokens": bool(report.get("tokens_correct")),
    }
    row["passed"] = all(row["checks"].values())
    return row


def outcome_text(row: dict) -> str:
    if row["outcome"] == "refused":
        text = f"refused: {row['error'][:100]}"
    elif row["outcome"] == "served":
        detail = row.get("detail", {})
        disk = detail.get("disk_tier", {})
        notes = [f"{k.replace('_', ' ')} {v}" for k, v in disk.items() if k in ("skipped_entries", "rejected", "foreign_files", "write_errors")]
        if "degraded_reason" in disk and not notes:
            notes.append("disk tier degraded")
        if "loaded_blocks" in detail:
            notes.append(f"loaded {detail['loaded_blocks']} blocks")
        if detail.get("warnings"):
            notes.append(f"{len(detail['warnings'])} warning, entry rebuilt")
        if row.get("num_cached_tokens"):
            notes.append(f"{row['num_cached_tokens']} tokens cached")
        text = "served" + (f" ({', '.join(notes)})" if notes else "")
    else:
        text = f"{row['outcome']}: {row['error']}"
    return text.replace("|", "\\|").replace("\n", " ")


def print_table(rows: list[dict], args) -> None:
    yes = {True: "yes", False: "**NO**"}
    print(f"\n| attack | outcome | attack s | peak RSS +MiB | bounded (<= {args.max_attack_s:g} s, <= {args.max_rss_growth_mib:g} MiB) | untouched | correct tokens | result |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        checks = row["checks"]
        seconds = f"{row['attack_s']:.3f}" if "attack_s" in row else f"({row['child_wall_s']:.1f} wall)"
        growth = f"{row['rss_growth_mib']:.1f}" if "rss_growth_mib" in row else "-"
        print(
            f"| {row['attack']} | {outcome_text(row)} | {seconds} | {growth} | {yes[checks['bounded']]} | {yes[checks['untouched']]} "
            f"| {yes[checks['correct_tokens']]} | {'PASS' if row['passed'] else '**FAIL**'} |"
        )


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog="attacks:\n" + "\n".join(f"  {a.name:36} {a.what}" for a in ATTACKS.values()))
    parser.add_argument("--attacks", default=None, help="comma-separated attack names (default: all)")
    parser.add_argument("--quick", action="store_true", help=f"one or two attacks per class ({len(QUICK)} in all)")
    parser.add_argument("--timeout-s", type=float, default=60.0, help="wall-clock limit of each attack's child process (default 60)")
    parser.add_argument("--memory-limit-gib", type=float, default=4.0, help="RLIMIT_AS of each child, in GiB (default 4)")
    parser.add_argument("--max-attack-s", type=float, default=10.0, help="the most seconds the attack's step may take (default 10)")
    parser.add_argument("--max-rss-growth-mib", type=float, default=128.0, help="the most the attack's step may grow the peak RSS, in MiB (default 128)")
    parser.add_argument("--out", default=str(RESULTS), help="the JSON result")
    parser.add_argument("--attack", default=None, help=argparse.SUPPRESS)  # the child's mode
    parser.add_argument("--work-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    for name in ("timeout_s", "memory_limit_gib", "max_attack_s", "max_rss_growth_mib"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.attack is not None:
        if args.attack not in ATTACKS or args.work_dir is None:
            parser.error("--attack needs a known attack and --work-dir")
        return args
    if args.quick and args.attacks:
        parser.error("--quick and --attacks are exclusive")
    args.selected = QUICK if args.quick else list(ATTACKS) if args.attacks is None else [a.strip() for a in args.attacks.split(",") if a.strip()]
    unknown = [a for a in args.selected if a not in ATTACKS]
    if unknown or not args.selected:
        parser.error(f"unknown attacks {unknown}; known: {', '.join(ATTACKS)}")
    return args


def main() -> int:
    args = parse_args()
    if args.attack is not None:
        return run_child(args)
    wall = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rayk-hostile-") as scratch:
        work = Path(scratch)
        import torch
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        write_model(work / "model")
        write_gguf(work / "model.gguf", work / "model")
        prompt = torch.randint(0, VOCAB_SIZE, (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(15)).tolist()
        reference = reference_tokens(work / "model", prompt)
        (work / "reference.json").write_text(json.dumps({"prompt": prompt, "tokens": reference}))
        plant_sentinel(work / "outside")
        sentinel = tree(work / "outside")
        setup_s = time.perf_counter() - wall
        print(f"built the model and the reference in {setup_s:.1f} s; {len(args.selected)} attacks", flush=True)
        rows = []
        for name in args.selected:
            row = run_attack(name, args, work, sentinel)
            rows.append(row)
            print(f"{name}: {'PASS' if row['passed'] else 'FAIL'} ({row['child_wall_s']:.1f} s)", flush=True)
        outside_changes = tree_changes(sentinel, tree(work / "outside"))
    print_table(rows, args)
    failed = [r["attack"] for r in rows if not r["passed"]]
    result = {
        "config": {k: v for k, v in vars(args).items() if k not in ("attack", "work_dir")},
        "environment": {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count()},
        "reference": {"prompt": prompt, "tokens": reference},
        "attacks": rows,
        "sentinel_unchanged": not outside_changes,
        "sentinel_changes": outside_changes,
        "failed": failed,
        "passed": not failed and not outside_changes,
        "setup_s": setup_s,
        "wall_s": time.perf_counter() - wall,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{len(rows) - len(failed)} of {len(rows)} attacks passed every check in {result['wall_s']:.0f} s; wrote {out}")
    if not result["passed"]:
        print(f"FAILED: {failed or ''}{' sentinel changed: ' + str(outside_changes) if outside_changes else ''}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
