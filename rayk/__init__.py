"""rayk: a distributed KV-cache system for LLM inference.

``rayk.LLM`` serves a model in one process with a paged, prefix-cached KV pool.
"""

from rayk.llm import LLM
from rayk.model.loader import DEFAULT_MODEL, default_model_path
from rayk.outputs import RequestOutput
from rayk.sampling_params import SamplingParams

__all__ = ["DEFAULT_MODEL", "LLM", "RequestOutput", "SamplingParams", "default_model_path"]
