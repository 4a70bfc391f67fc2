"""rayk: a distributed KV-cache system for LLM inference.

``rayk.LLM`` serves a model in one process with a paged, prefix-cached KV pool, with no Ray.
``rayk.Cluster`` starts a deployment of cache workers and a routing coordinator on Ray, and
``rayk.connect`` attaches to a running one (both import Ray only when first used).
"""

from rayk.llm import LLM
from rayk.model.loader import DEFAULT_MODEL, default_model_path
from rayk.outputs import ClusterRequestOutput, CompletionDelta, RequestOutput
from rayk.sampling_params import SamplingParams

__all__ = [
    "DEFAULT_MODEL",
    "LLM",
    "Cluster",
    "ClusterRequestOutput",
    "CompletionDelta",
    "RequestOutput",
    "SamplingParams",
    "connect",
    "default_model_path",
]


def __getattr__(name: str):
    if name in ("Cluster", "connect"):
        from rayk import client

        return getattr(client, name)
    raise AttributeError(f"module 'rayk' has no attribute {name!r}")
