"""The Triton KV store kernel writes exactly what ``index_copy_`` writes (interpreter on the CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import torch
    from rayk.model.store_kvcache import store_kvcache_torch, store_kvcache_triton

    torch.manual_seed(0)
    for tokens, heads, dim in [(7, 2, 16), (1, 4, 8), (33, 1, 64)]:
        blocks, block_size = 6, 8
        key, value = torch.randn(tokens, heads, dim), torch.randn(tokens, heads, dim)
        slots = torch.randperm(blocks * block_size)[:tokens]
        caches = [torch.zeros(blocks, block_size, heads, dim) for _ in range(4)]
        store_kvcache_torch(key, value, caches[0], caches[1], slots)
        store_kvcache_triton(key, value, caches[2], caches[3], slots)
        assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3]), (tokens, heads, dim)
        assert caches[2].count_nonzero() == tokens * heads * dim
    print("ok")
    """
)


def test_triton_store_kernel_matches_index_copy_under_the_interpreter():
    # TRITON_INTERPRET is read when the kernel is decorated, so the check runs in its own process.
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
