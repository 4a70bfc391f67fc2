"""Runs one scheduled step through the model and samples the requests that reached their end."""

from __future__ import annotations

import torch

from rayk.cache.kv_cache_manager import KVCacheManager
from rayk.cache.paged_kv import PagedKVCache
from rayk.engine.scheduler import ScheduledBatch
from rayk.model.attention import build_attention_metadata
from rayk.model.decoder import CausalLM
from rayk.model.sampler import sample


class ModelRunner:
    def __init__(self, model: CausalLM, kv_cache: PagedKVCache, kv_cache_manager: KVCacheManager, attention_backend: str):
        self.model = model
        self.kv_cache = kv_cache
        self.kv_cache_manager = kv_cache_manager
        self.device = kv_cache.device
        self.block_size = kv_cache.layout.block_size
        self.attention_backend = attention_backend

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> list[int | None]:
        """Computes the batch's new tokens; returns a sampled token for each request whose KV now
        covers all its tokens, and None for a request still part-way through its prompt."""
        input_ids: list[int] = []
        positions: list[int] = []
        context_lens: list[int] = []
        block_tables: list[list[int]] = []
        sample_rows: list[int] = []
        needs_sample: list[bool] = []
        for request, num_new in zip(batch.requests, batch.num_new_tokens):
            start = request.num_computed_tokens
            end = start + num_new
            input_ids.extend(request.token_ids[start:end])
            positions.extend(range(start, end))
            context_lens.append(end)
            block_tables.append(self.kv_cache_manager.block_ids(request.request_id))
            needs_sample.append(end == request.num_tokens)
            if needs_sample[-1]:
                sample_rows.append(len(input_ids) - 1)
        metadata = build_attention_metadata(
            batch.num_new_tokens, context_lens, block_tables, self.block_size, self.device, self.attention_backend
        )
        hidden = self.model(
            torch.tensor(input_ids, dtype=torch.long, device=self.device),
            torch.tensor(positions, dtype=torch.long, device=self.device),
            self.kv_cache,
            metadata,
        )
        if not sample_rows:
            return [None] * len(batch)
        sampling = [r for r, s in zip(batch.requests, needs_sample) if s]
        logits = self.model.compute_logits(hidden[torch.tensor(sample_rows, device=self.device)])
        tokens = iter(sample(logits, [r.params for r in sampling], [r.generator for r in sampling]))
        return [next(tokens) if s else None for s in needs_sample]
