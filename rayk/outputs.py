"""What a finished request returns (vLLM's ``RequestOutput``, flattened to one completion)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RequestOutput:
    """One request's result.

    ``num_cached_tokens`` counts prompt tokens served from the prefix cache (whole blocks) rather
    than computed; ``cached_tokens_by_tier`` splits them by where they were found ("device",
    "host", "disk", "remote"). ``finish_reason`` is "stop" (EOS or a stop token) or "length" (max_tokens).
    ``ttft_s`` is seconds from arrival to the first generated token; ``latency_s`` to the last.
    """

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    num_cached_tokens: int
    cached_tokens_by_tier: dict[str, int]
    finish_reason: str | None
    ttft_s: float | None
    latency_s: float | None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class ClusterRequestOutput(RequestOutput):
    """A ``RequestOutput`` served by a cluster, with the id of the ``worker`` that served it."""

    worker: str


@dataclass
class CompletionDelta:
    """What one request produced in one engine step, for streaming.

    ``new_token_ids`` are the tokens sampled in the step; ``new_text`` the text they completed
    (None without a tokenizer). Text that could still turn out to begin a stop string, or an
    incomplete character, is held back until it is certain, so the ``new_text`` of a request's
    deltas add up to its ``output.text``. ``output`` is the final ``RequestOutput``, set only on the
    request's last delta (when ``finished``).
    """

    request_id: str
    new_token_ids: list[int]
    new_text: str | None
    output: RequestOutput | None = None

    @property
    def finished(self) -> bool:
        return self.output is not None
