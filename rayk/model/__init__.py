"""Layer 4: Llama / Qwen3 decoders over the paged KV cache, their loader and the sampler."""
