"""How to sample one request's tokens (vLLM's ``SamplingParams``, the subset rayk serves)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    """``temperature`` 0 (or below 1e-5) is greedy. ``top_k`` -1 (or 0) keeps every token;
    ``top_p`` is in (0, 1].

    ``seed`` gives the request its own random stream, so its draws do not depend on what it is
    batched with (in float32 the logits do not either; in half precision they may differ in the
    last bits between batch shapes).
    Generation stops at ``max_tokens`` new tokens, at any of ``stop_token_ids``, at the
    model's end-of-sequence token unless ``ignore_eos``, or when the output text contains one of
    the ``stop`` strings (the text then ends before it; the token ids keep the token that
    completed it).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 64
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
            raise TypeError(f"temperature must be a number, got {type(self.temperature).__name__}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 and finite (0 is greedy), got {self.temperature}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)):
            raise TypeError(f"top_p must be a number, got {type(self.top_p).__name__}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            raise TypeError(f"top_k must be an int, got {type(self.top_k).__name__}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 (all tokens) or >= 0, got {self.top_k}")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int):
            raise TypeError(f"max_tokens must be an int, got {type(self.max_tokens).__name__}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.seed is not None:
            if isinstance(self.seed, bool) or not isinstance(self.seed, int):
                raise TypeError(f"seed must be an int or None, got {type(self.seed).__name__}")
            if not -(2**63) <= self.seed < 2**64:
                raise ValueError(f"seed must be in [-2**63, 2**64), got {self.seed}")
        stop = self.stop_token_ids
        if not isinstance(stop, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in stop):
            raise TypeError(f"stop_token_ids must be a sequence of ints, got {stop!r}")
        object.__setattr__(self, "stop_token_ids", tuple(stop))
        strings = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(strings, (list, tuple)) or not all(isinstance(t, str) for t in strings):
            raise TypeError(f"stop must be a string or a sequence of strings, got {self.stop!r}")
        if not all(strings):
            raise ValueError(f"stop strings must not be empty, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(strings))
        if not isinstance(self.ignore_eos, bool):
            raise TypeError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")

    @property
    def greedy(self) -> bool:
        # Below 1e-5 dividing logits by the temperature overflows; the argmax is the limit anyway.
        return self.temperature < 1e-5 or self.top_k == 1
