"""rayk: a distributed KV-cache system for LLM inference.

``rayk.LLM`` serves a model in one process with a paged, prefix-cached KV pool, with no Ray.
``rayk.Cluster`` starts a deployment of cache workers and a routing coordinator on Ray, and
``rayk.connect`` attaches to a running one. Each is imported when first used: a process that
only needs a part of rayk (the coordinator actor, the ``rayk`` command's parser) does not pay
for importing torch or Ray.
"""

import importlib

from rayk.outputs import ClusterRequestOutput, CompletionDelta, RequestOutput
from rayk.overload import Overloaded
from rayk.sampling_params import SamplingParams

__all__ = [
    "DEFAULT_MODEL",
    "LLM",
    "Cluster",
    "ClusterRequestOutput",
    "CompletionDelta",
    "Overloaded",
    "RequestOutput",
    "SamplingParams",
    "connect",
    "default_model_path",
]


_LAZY = {"LLM": "rayk.llm", "DEFAULT_MODEL": "rayk.model.loader", "default_model_path": "rayk.model.loader", "Cluster": "rayk.client", "connect": "rayk.client"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rayk' has no attribute {name!r}")
