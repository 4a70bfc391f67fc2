"""Continuous batching: which requests run this step, and how many of their tokens.

Every step has a budget of ``max_num_batched_tokens``. Running requests come first, in admission
order: each gets the tokens it still lacks KV for (one for decode, a chunk of its prompt while
prefilling). Then waiting requests are admitted while the budget, ``max_num_seqs`` and free
blocks allow; an admitted request starts at its cached prefix, so only the uncached suffix is
prefilled. A waiting request whose next uncached block another request is computing waits
for it, so a burst that shares a new prefix computes it once (in-batch prefix caching).

When a running request cannot get a block, the most recently admitted running request is
preempted by recompute: its blocks are freed (they stay cached, so its re-admission usually hits
them) and it returns to the head of the waiting queue. No request is admitted in a step that
preempted. A request that fits the pool alone always makes progress, because the engine refuses
requests that would not.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from rayk.cache.kv_cache_manager import KVCacheManager
from rayk.config import SchedulerConfig
from rayk.engine.request import Request


@dataclass
class ScheduledBatch:
    """The requests of one step and how many new tokens each computes (parallel lists)."""

    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)

    def add(self, request: Request, num_tokens: int) -> None:
        self.requests.append(request)
        self.num_new_tokens.append(num_tokens)

    def __len__(self) -> int:
        return len(self.requests)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache_manager: KVCacheManager):
        self.config = config
        self.kv_cache_manager = kv_cache_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_tokens = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.kv_cache_manager.allocate_slots(request.request_id, request.num_computed_tokens + num_tokens):
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is request:
                    break
            else:
                batch.add(request, num_tokens)
                budget -= num_tokens
                i += 1
        # Admission is first come, first served, except that a request waiting for blocks another
        # request is computing steps aside (it will hit them once they are published).
        deferred: list[Request] = []
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            hit = self.kv_cache_manager.find_prefix(request.request_id, request.token_ids, request.cache_salt)
            if self.kv_cache_manager.waits_for_in_flight(request.request_id, hit):
                deferred.append(self.waiting.popleft())
                continue
            num_tokens = min(request.num_tokens - hit.num_tokens, budget)
            first_admission = request.num_cached_tokens is None
            by_tier = self.kv_cache_manager.admit(request.request_id, hit.num_tokens + num_tokens, hit, count_stats=first_admission)
            if by_tier is None:
                break
            self.waiting.popleft()
            request.num_computed_tokens = hit.num_tokens
            if first_admission:
                request.num_cached_tokens = hit.num_tokens
                request.cached_tokens_by_tier = by_tier
            self.running.append(request)
            batch.add(request, num_tokens)
            budget -= num_tokens
        self.waiting.extendleft(reversed(deferred))
        return batch

    def update(self, batch: ScheduledBatch, sampled: list[int | None]) -> list[Request]:
        """Records a step's results; returns the requests that finished (their blocks are freed)."""
        finished = []
        for request, num_tokens, token in zip(batch.requests, batch.num_new_tokens, sampled):
            request.num_computed_tokens += num_tokens
            self.kv_cache_manager.cache_blocks(request.request_id, request.token_ids, request.num_computed_tokens)
            if token is None:
                continue
            request.append_token(token)
            if request.finished:
                self.kv_cache_manager.free(request.request_id)
                finished.append(request)
        if finished:
            self.running = [r for r in self.running if not r.finished]
        return finished

    def abort(self, request_id: str) -> Request | None:
        for queue in (self.waiting, self.running):
            for request in queue:
                if request.request_id == request_id:
                    queue.remove(request)
                    self.kv_cache_manager.free(request_id)
                    request.finish_reason = "abort"
                    return request
        return None

    def _preempt(self, request: Request) -> None:
        self.kv_cache_manager.free(request.request_id)
        request.num_computed_tokens = 0
        self.waiting.appendleft(request)
        self.num_preemptions += 1
