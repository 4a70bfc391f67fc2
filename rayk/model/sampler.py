"""Choosing each sequence's next token from its logits.

Greedy rows (temperature 0, or top_k 1) take the argmax, all at once. Other rows are scaled by
their temperature, cut to top-k and then to the smallest set whose probability reaches top-p, and
drawn from their own ``torch.Generator`` when the request has a seed, so a seeded request samples
the same draws whatever it is batched with.
"""

from __future__ import annotations

import torch

from rayk.sampling_params import SamplingParams


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """``logits``: [batch, vocab] float32; returns one token id per row."""
    tokens = logits.argmax(dim=-1).tolist()
    for row, p in enumerate(params):
        if not p.greedy:
            tokens[row] = _sample_row(logits[row], p, generators[row])
    return tokens


def _sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        # Exactly k tokens stay, ties at the k-th broken by topk's order.
        kept = torch.topk(logits, params.top_k).indices
        logits = torch.full_like(logits, float("-inf")).index_copy_(0, kept, logits[kept])
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already reach top_p; the first always stays.
        drop = (cumulative - sorted_logits.softmax(-1)) >= params.top_p
        logits = logits.index_fill(0, order[drop], float("-inf"))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))
