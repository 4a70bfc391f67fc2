"""Layer 2: the KV block pool of a device, its tensor, per-request block tables and KV events."""
