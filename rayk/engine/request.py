"""One generation request's state as it moves through the scheduler."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from rayk.model.tokenizer import IncrementalDetokenizer
from rayk.outputs import RequestOutput
from rayk.sampling_params import SamplingParams


@dataclass(eq=False)
class Request:
    """``token_ids`` is the prompt followed by the tokens generated so far.

    ``num_computed_tokens`` of them have KV in the cache; the rest are computed in coming steps.
    Preemption resets it to 0 (the request is recomputed, usually from its own cached blocks).
    ``num_cached_tokens`` is the prefix-cache hit at first admission, and
    ``cached_tokens_by_tier`` where those tokens came from.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    cache_salt: str | None = None
    arrival_time: float = field(default_factory=time.perf_counter)
    generator: torch.Generator | None = None
    detokenizer: IncrementalDetokenizer | None = None
    token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0
    num_cached_tokens: int | None = None
    cached_tokens_by_tier: dict[str, int] | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    finish_reason: str | None = None
    stopped_on_string: bool = False
    num_streamed_tokens: int = 0
    num_streamed_chars: int = 0

    def __post_init__(self):
        self.token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append_token(self, token: int) -> None:
        """Adds a sampled token and decides whether the request is done."""
        now = time.perf_counter()
        if self.first_token_time is None:
            self.first_token_time = now
        self.token_ids.append(token)
        params = self.params
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids):
            self.finish_reason = "stop"
        elif self._text_hits_stop_string(token):
            self.finish_reason = "stop"
            self.stopped_on_string = True
        elif self.num_output_tokens >= params.max_tokens:
            self.finish_reason = "length"
        if self.finish_reason is not None:
            self.finish_time = now

    def _text_hits_stop_string(self, token: int) -> bool:
        """Extends the text; on a stop string, cuts the text before it and says so."""
        if self.detokenizer is None:
            return False
        detokenizer = self.detokenizer
        new_text = detokenizer.add(token)
        if not new_text or not self.params.stop:
            return False
        # Only the new text, with one stop string's length before it, can hold a new match.
        start = max(0, len(detokenizer.text) - len(new_text) - max(map(len, self.params.stop)) + 1)
        hits = [i for i in (detokenizer.text.find(s, start) for s in self.params.stop) if i >= 0]
        if not hits:
            return False
        detokenizer.text = detokenizer.text[: min(hits)]
        return True

    @property
    def text(self) -> str | None:
        return None if self.detokenizer is None else self.detokenizer.text

    def take_delta(self, final_text: str | None) -> tuple[list[int], str | None]:
        """The tokens and text not streamed yet. ``final_text`` is the request's whole text once it
        has finished; until then the last characters that could begin a stop string are held back."""
        new_tokens = self.token_ids[len(self.prompt_token_ids) + self.num_streamed_tokens :]
        self.num_streamed_tokens += len(new_tokens)
        if self.detokenizer is None:
            return new_tokens, None
        visible = final_text
        if visible is None:
            visible = self.detokenizer.text
            hold = max(map(len, self.params.stop), default=1) - 1
            visible = visible[: max(0, len(visible) - hold)]
        new_text = visible[self.num_streamed_chars :]
        self.num_streamed_chars = max(self.num_streamed_chars, len(visible))
        return new_tokens, new_text

    def to_output(self, text: str | None) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt_token_ids=list(self.prompt_token_ids),
            token_ids=self.token_ids[len(self.prompt_token_ids) :],
            text=text,
            num_cached_tokens=self.num_cached_tokens or 0,
            cached_tokens_by_tier=dict(self.cached_tokens_by_tier or {}),
            finish_reason=self.finish_reason,
            ttft_s=None if self.first_token_time is None else self.first_token_time - self.arrival_time,
            latency_s=None if self.finish_time is None else self.finish_time - self.arrival_time,
        )
