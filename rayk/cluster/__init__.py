"""Layers 5–6: the cache workers, the coordinator, and their pure parts (prefix directory, routing)."""
