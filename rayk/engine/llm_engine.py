"""The single-process engine: add requests at any time, drive it one ``step()`` at a time.

It owns the model, the device KV pool and the scheduler. ``add_request`` validates everything
before any state changes, so a bad request raises and the engine keeps serving the others.
After every step the tiers' KV events are handed to subscribers as one numbered batch, and\n``step()`` returns what every request produced in it, for streaming.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time
from collections.abc import Sequence

import torch

from rayk.cache.block_codec import DecodedBatch
from rayk.cache.events import EventSequencer, KVEventSubscriber
from rayk.cache.factory import build_tiered_cache
from rayk.cache.memory_profile import memory_profile
from rayk.cache.memory_controller import MemoryController
from rayk.cache.paged_kv import KV_LAYOUT, KVLayout
from rayk.config import EngineConfig
from rayk.engine.model_runner import ModelRunner
from rayk.engine.request import Request
from rayk.engine.scheduler import Scheduler
from rayk.hashing import BlockHash, check_cache_salt, model_fingerprint
from rayk.model.architecture import TORCH_DTYPES
from rayk.model.attention import FLASH_ATTN_BLOCK_SIZE_MULTIPLE, flash_attn_available
from rayk.model.tokenizer import IncrementalDetokenizer
from rayk.model.loader import load_model
from rayk.outputs import CompletionDelta
from rayk.sampling_params import SamplingParams



class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        model_config, cache_config = config.model, config.cache
        self.device = _resolve_device(model_config.device)
        loaded = load_model(model_config.model, _resolve_dtype(model_config.dtype, self.device), self.device, model_config.conversion_cache_dir)
        self.model, self.arch, self.tokenizer = loaded.model, loaded.arch, loaded.tokenizer
        self.dtype = self.model.model.embed_tokens.weight.dtype
        self.attention_backend = _resolve_backend(model_config.attention_backend, self.device, self.dtype, cache_config.block_size)
        self.max_model_len = _resolve_max_model_len(model_config.max_model_len, self.arch.max_position_embeddings)
        block_size = cache_config.block_size
        layout = KVLayout(self.arch.num_layers, block_size, self.arch.num_kv_heads, self.arch.head_dim, self.dtype)
        self.fingerprint = model_fingerprint(
            {
                "architecture": _architecture_fields(self.arch),
                "weights": loaded.weights_identity,
                "dtype": str(self.dtype),
                "block_size": block_size,
                "kv_layout": KV_LAYOUT,
            }
        )
        num_blocks = cache_config.num_device_blocks or self._default_num_blocks(layout)
        self.cache = build_tiered_cache(cache_config, layout, self.fingerprint, self.device, num_blocks)
        self.kv_cache, self.pool, self.host, self.disk = self.cache.kv_cache, self.cache.pool, self.cache.host, self.cache.disk
        self.kv_cache_manager = self.cache.manager
        # Pins and budgets leave room for one max_model_len sequence, or half the pool when the pool
        # is smaller than two such sequences: a small pool must still leave something to pin.
        min_device_blocks = min(math.ceil(self.max_model_len / block_size), num_blocks // 2)
        self.memory = MemoryController(self.kv_cache_manager, min_device_blocks=min_device_blocks)
        self.scheduler = Scheduler(config.scheduler, self.kv_cache_manager)
        self.runner = ModelRunner(self.model, self.kv_cache, self.kv_cache_manager, self.attention_backend)
        self._subscribers: list[KVEventSubscriber] = []
        self._event_sequencer = EventSequencer()
        self.closed = False
        # Objects with before_step(engine, batch) and after_step(engine, batch, start_s, end_s).
        self.step_observers: list = []
        self._request_ids = (str(i) for i in itertools.count())
        self._requests: dict[str, Request] = {}
        self.num_finished_requests = 0
        self.num_generated_tokens = 0
        self.num_steps = 0

    # -- requests -----------------------------------------------------------------------------

    def validate_request(
        self, prompt: str | Sequence[int], params: SamplingParams, index: int | None = None, cache_salt: str | bytes | None = None
    ) -> list[int]:
        """The prompt's token ids, or a ValueError/TypeError naming what is wrong. Changes nothing."""
        self.check_open()
        where = "prompt" if index is None else f"prompts[{index}]"
        token_ids = request_token_ids(prompt, params, self.tokenizer, self.arch.vocab_size, self.max_model_len, where, cache_salt)
        blocks = math.ceil((len(token_ids) + params.max_tokens) / self.pool.block_size)
        pinned = self.pool.pinned
        # The prompt's own pinned blocks serve it; only other pins take room from it.
        own_pins = sum(1 for k in self.kv_cache_manager.hasher.hash_blocks(token_ids, cache_salt) if k in pinned) if pinned else 0
        usable = self.pool.num_blocks - len(pinned) + own_pins - len(self.kv_cache_manager.reserved["device"])
        if blocks > usable:
            raise ValueError(
                f"{where} with max_tokens {params.max_tokens} needs {blocks} KV blocks; the device pool has "
                f"num_device_blocks={self.pool.num_blocks}, of which {usable} are usable (the rest pinned or set aside)"
            )
        return token_ids

    def _prompt_token_ids(self, prompt: str | Sequence[int], where: str, cache_salt: str | bytes | None) -> list[int]:
        return prompt_token_ids(prompt, self.tokenizer, self.arch.vocab_size, where, cache_salt)

    def block_hashes(self, prompt: str | Sequence[int], cache_salt: str | bytes | None = None) -> list[bytes]:
        """The keys of a prompt's full blocks, as the cache names them (any length of prompt)."""
        token_ids = self._prompt_token_ids(prompt, "prompt", cache_salt)
        return self.kv_cache_manager.hasher.hash_blocks(token_ids, cache_salt)

    def add_request(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams,
        *,
        cache_salt: str | None = None,
        request_id: str | None = None,
        remote: DecodedBatch | None = None,
    ) -> str:
        token_ids = self.validate_request(prompt, params, cache_salt=cache_salt)
        return self.add_validated_request(token_ids, params, cache_salt=cache_salt, request_id=request_id, remote=remote)

    def add_validated_request(
        self,
        token_ids: list[int],
        params: SamplingParams,
        *,
        cache_salt: str | None = None,
        request_id: str | None = None,
        remote: DecodedBatch | None = None,
    ) -> str:
        """Queues a request checked by ``validate_request``. ``remote`` holds blocks pulled from a
        peer for it: its prefix lookup finds them after its own tiers (``rayk.cache.tier_chain``)."""
        self.check_open()
        if request_id is None:
            request_id = next(i for i in self._request_ids if i not in self._requests)
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(params.seed)
        detokenizer = IncrementalDetokenizer(self.tokenizer, token_ids) if self.tokenizer is not None else None
        if params.stop and detokenizer is None:
            raise ValueError("stop strings need a tokenizer; this model has none (use stop_token_ids)")
        request = Request(request_id, token_ids, params, self.arch.eos_token_ids, cache_salt, generator=generator, detokenizer=detokenizer)
        self._requests[request_id] = request
        if remote is not None and remote.records:
            self.cache.chain.stage_remote(request_id, remote.records, remote.blocks)
        self.scheduler.add(request)
        return request_id

    def abort_request(self, request_id: str) -> None:
        if self.scheduler.abort(request_id) is not None:
            del self._requests[request_id]

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- stepping -----------------------------------------------------------------------------

    def step(self) -> list[CompletionDelta]:
        """Runs one batch; returns what each request produced in it, one delta per request that
        sampled a token. A finished request's delta carries its final ``RequestOutput``."""
        self.check_open()
        start = time.perf_counter()
        batch = self.scheduler.schedule()
        finished = []
        deltas = []
        if len(batch):
            for observer in self.step_observers:
                observer.before_step(self, batch)
            sampled = self.runner.run(batch)
            self.num_generated_tokens += sum(t is not None for t in sampled)
            finished = self.scheduler.update(batch, sampled)
            self.num_steps += 1
            for observer in self.step_observers:
                observer.after_step(self, batch, start, time.perf_counter())
            for request, token in zip(batch.requests, sampled):
                if token is not None and not request.finished:
                    new_tokens, new_text = request.take_delta(None)
                    deltas.append(CompletionDelta(request.request_id, new_tokens, new_text))
        self.publish_events()
        for request in finished:
            del self._requests[request.request_id]
            self.num_finished_requests += 1
            text = self._final_text(request)
            new_tokens, new_text = request.take_delta(text)
            deltas.append(CompletionDelta(request.request_id, new_tokens, new_text, request.to_output(text)))
        return deltas

    def subscribe(self, subscriber: KVEventSubscriber) -> None:
        """Calls ``subscriber(batch)`` with a ``KVEventBatch`` after every step that changed a tier."""
        self._subscribers.append(subscriber)

    def unsubscribe(self, subscriber: KVEventSubscriber) -> None:
        self._subscribers.remove(subscriber)

    def publish_events(self) -> None:
        """Hands the tiers' pending events to subscribers as one batch (every step does; call it
        after changing the cache between steps)."""
        events = self.cache.chain.drain_events()
        if not events:
            return
        batch = self._event_sequencer.batch(events)
        for subscriber in self._subscribers:
            try:
                subscriber(batch)
            except Exception:
                # A subscriber's failure must not lose the step's outputs or stall the engine.
                logging.getLogger(__name__).exception("KV event subscriber %r failed", subscriber)

    def inventory(self) -> tuple[int, dict[str, list[BlockHash]]]:
        """Every key each tier holds, and the ``seq`` of the last event batch it includes (-1 if
        none): events up to that batch are in it, later batches follow it. For a directory that
        restarted or lost a batch."""
        self.publish_events()
        return self._event_sequencer.next_seq - 1, self.cache.chain.inventory()

    def close(self) -> None:
        """Stops the engine: unfinished requests are dropped, every cached block is written to
        the disk tier (when there is one), and every later call raises. Closing twice is a no-op."""
        if self.closed:
            return
        for request_id in list(self._requests):
            self.abort_request(request_id)
        if self.disk is not None:
            self.cache.chain.spill_to_disk()
            self.disk.close()
        self.closed = True

    def check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this rayk engine is closed; create a new one to generate again")

    def _final_text(self, request: Request) -> str | None:
        """The text cut at its stop string, or else all generated tokens decoded at once (which
        also flushes a character still incomplete in the incremental text)."""
        if request.detokenizer is None:
            return None
        if request.stopped_on_string:
            return request.text
        return self.tokenizer.decode(request.token_ids[len(request.prompt_token_ids) :])

    # -- introspection ------------------------------------------------------------------------

    def stats(self) -> dict:
        pool, layout, kv = self.pool, self.kv_cache.layout, self.kv_cache_manager
        allocated_slots = pool.num_used_blocks * pool.block_size
        return {
            "device": str(self.device),
            "attention_backend": self.attention_backend,
            "device_pool": {
                "num_blocks": pool.num_blocks,
                "block_size": pool.block_size,
                "used_blocks": pool.num_used_blocks,
                "free_blocks": pool.num_free_blocks,
                "cached_blocks": pool.num_cached_blocks,
                "evictions": pool.num_evictions,
                "bytes_per_token": layout.bytes_per_token,
                "bytes_per_block": layout.bytes_per_block,
                "total_bytes": self.kv_cache.num_bytes,
                "unused_slots": kv.num_unused_slots,
                "internal_fragmentation": kv.num_unused_slots / allocated_slots if allocated_slots else 0.0,
            },
            "prefix_cache": {
                "query_tokens": kv.num_query_tokens,
                "hit_tokens": kv.num_hit_tokens,
                "miss_tokens": kv.num_query_tokens - kv.num_hit_tokens,
                "hit_rate": kv.num_hit_tokens / kv.num_query_tokens if kv.num_query_tokens else 0.0,
                "hit_tokens_by_tier": dict(kv.hit_tokens_by_tier),
            },
            "host_tier": None
            if self.host is None
            else {
                "num_blocks": self.host.pool.num_blocks,
                "cached_blocks": self.host.pool.num_cached_blocks,
                "total_bytes": self.host.pool.num_blocks * self.host.pool.bytes_per_block,
                "stored_blocks": self.host.num_stored,
                "loaded_blocks": self.host.num_loaded,
                "evictions": self.host.pool.num_evictions,
            },
            "disk_tier": None
            if self.disk is None
            else {
                "directory": str(self.disk.directory),
                "cached_blocks": len(self.disk),
                "used_bytes": self.disk.num_bytes,
                "max_bytes": self.disk.max_bytes,
                "stored_blocks": self.disk.num_stored,
                "loaded_blocks": self.disk.num_loaded,
                "evictions": self.disk.num_evictions,
                "rejected": self.disk.num_rejected,
                "segments": self.disk.num_segments,
                **self.disk.health(),  # degraded, its reason, and the fault counts
            },
            "scheduler": {
                "waiting": len(self.scheduler.waiting),
                "running": len(self.scheduler.running),
                "preemptions": self.scheduler.num_preemptions,
                "steps": self.num_steps,
            },
            "requests": {"finished": self.num_finished_requests, "generated_tokens": self.num_generated_tokens},
        }

    def memory_profile(self) -> dict:
        """Per tier: bytes, physical and logical blocks, fragmentation, overheads, hit rates,
        and sampled block lifecycles (see rayk.cache.memory_profile)."""
        return memory_profile(self.kv_cache_manager)

    def _default_num_blocks(self, layout: KVLayout) -> int:
        cache_config = self.config.cache
        per_sequence = math.ceil(self.max_model_len / layout.block_size)
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = int(total * cache_config.gpu_memory_utilization) - (total - free)
        else:
            wanted = self.config.scheduler.max_num_seqs * per_sequence * layout.bytes_per_block
            budget = min(wanted, cache_config.cpu_kv_cache_bytes)
        num_blocks = budget // layout.bytes_per_block
        if num_blocks < per_sequence:
            raise ValueError(
                f"the KV pool would hold {num_blocks} blocks, fewer than one max_model_len sequence needs ({per_sequence}); "
                "lower max_model_len or raise the memory budget"
            )
        return num_blocks


def request_token_ids(
    prompt: str | Sequence[int], params: SamplingParams, tokenizer, vocab_size: int, max_model_len: int, where: str, cache_salt: str | bytes | None
) -> list[int]:
    """``prompt_token_ids``, after checking ``params`` is a SamplingParams, and checking that the
    prompt and its ``max_tokens`` fit in ``max_model_len``: the checks of a request that need no
    pool, for engines and drivers alike."""
    if not isinstance(params, SamplingParams):
        raise TypeError(f"sampling params for {where} must be a rayk.SamplingParams, got {type(params).__name__}")
    token_ids = prompt_token_ids(prompt, tokenizer, vocab_size, where, cache_salt, max_model_len)
    total = len(token_ids) + params.max_tokens
    if total > max_model_len:
        raise ValueError(f"{where} has {len(token_ids)} tokens and max_tokens is {params.max_tokens}: {total} exceeds max_model_len {max_model_len}")
    return token_ids


def prompt_token_ids(
    prompt: str | Sequence[int], tokenizer, vocab_size: int, where: str = "prompt", cache_salt: str | bytes | None = None, max_tokens: int | None = None
) -> list[int]:
    """A prompt's token ids (a string is encoded with ``tokenizer``), or a ValueError/TypeError
    naming ``where`` and what is wrong: the one check of prompts, for engines and drivers alike.
    A string longer than ``max_tokens`` tokens could hold is refused before it is tokenized
    (``rayk.model.tokenizer.text_limit``)."""
    check_cache_salt(cache_salt)
    if isinstance(prompt, str):
        if tokenizer is None:
            raise TypeError(f"{where} is a string, but the model has no tokenizer.json: pass token ids")
        try:
            token_ids = tokenizer.encode(prompt, max_tokens=max_tokens)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
    elif isinstance(prompt, Sequence) and not isinstance(prompt, (bytes, bytearray)):
        token_ids = list(prompt)
        for token in token_ids:
            if isinstance(token, bool) or not isinstance(token, int):
                raise TypeError(f"{where} must hold ints (token ids), found {type(token).__name__} {token!r}")
    else:
        raise TypeError(f"{where} must be a string or a list of token ids, got {type(prompt).__name__}")
    if not token_ids:
        raise ValueError(f"{where} is empty: a prompt needs at least one token")
    bad = next((t for t in token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(f"{where} holds token id {bad}, outside the vocabulary [0, {vocab_size})")
    return token_ids


def _architecture_fields(arch) -> dict:
    """Everything about the architecture that shapes KV, as plain values (token ids excluded)."""
    fields = dataclasses.asdict(arch)
    for name in ("torch_dtype", "eos_token_ids"):
        fields.pop(name)
    return fields


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available on this machine")
    return torch.device(device)


def _resolve_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    """None keeps the checkpoint's dtype (CUDA); the CPU computes in float32 unless told otherwise."""
    if dtype != "auto":
        return TORCH_DTYPES[dtype]
    return None if device.type == "cuda" else torch.float32


def _resolve_backend(backend: str, device: torch.device, dtype: torch.dtype, block_size: int) -> str:
    problems = []
    if device.type != "cuda" or not flash_attn_available():
        problems.append("CUDA and the flash-attn package (pip install 'rayk[gpu]')")
    if dtype not in (torch.float16, torch.bfloat16):
        problems.append(f"dtype float16 or bfloat16 (got {str(dtype).removeprefix('torch.')})")
    if block_size % FLASH_ATTN_BLOCK_SIZE_MULTIPLE:
        problems.append(f"block_size % {FLASH_ATTN_BLOCK_SIZE_MULTIPLE} == 0 (got block_size={block_size})")
    if backend == "auto":
        return "torch" if problems else "flash_attn"
    if backend == "flash_attn" and problems:
        raise ValueError("attention_backend='flash_attn' needs " + " and ".join(problems))
    return backend


def _resolve_max_model_len(max_model_len: int | None, max_positions: int) -> int:
    if max_model_len is None:
        return max_positions
    if max_model_len > max_positions:
        raise ValueError(f"max_model_len must be <= the model's max_position_embeddings ({max_positions}), got {max_model_len}")
    return max_model_len
