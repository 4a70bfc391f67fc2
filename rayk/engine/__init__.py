"""The single-process engine: requests, continuous-batching scheduler, model runner."""
