"""The KV tensor of one device, in flash_attn's paged layout.

One allocation of shape ``[2, num_layers, num_blocks, block_size, num_kv_heads, head_dim]``;
``key_cache(l)`` and ``value_cache(l)`` are contiguous ``[num_blocks, block_size, num_kv_heads,
head_dim]`` views of it, exactly what ``flash_attn_with_kvcache(..., block_table=...)`` takes.

Blocks leave and enter many per call: ``gather``/``scatter`` move a ``[2, num_layers, n,
block_size, kv_heads, head_dim]`` tensor. Outside a pool (disk, snapshots, peers) blocks take
the one format of ``rayk.cache.block_codec``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

KV_LAYOUT = "flash_attn_paged:[2,layers,blocks,block_size,kv_heads,head_dim]"


@dataclass(frozen=True)
class KVLayout:
    """The shape and dtype of one pool's blocks; ``bytes_per_block`` counts K and V of all layers."""

    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size

    def to_metadata(self) -> dict:
        return {
            "layout": KV_LAYOUT,
            "num_layers": self.num_layers,
            "block_size": self.block_size,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "dtype": str(self.dtype).removeprefix("torch."),
        }


class PagedKVCache:
    """Preallocated K and V blocks for every layer of one model on one device."""

    def __init__(self, layout: KVLayout, num_blocks: int, device: torch.device | str = "cpu"):
        self.layout = layout
        self.num_blocks = num_blocks
        self.kv = torch.zeros(
            (2, layout.num_layers, num_blocks, layout.block_size, layout.num_kv_heads, layout.head_dim),
            dtype=layout.dtype,
            device=device,
        )

    @property
    def device(self) -> torch.device:
        return self.kv.device

    @property
    def num_bytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def key_cache(self, layer: int) -> torch.Tensor:
        return self.kv[0, layer]

    def value_cache(self, layer: int) -> torch.Tensor:
        return self.kv[1, layer]

    def gather(self, block_ids: Sequence[int], out: torch.Tensor | None = None) -> torch.Tensor:
        """A ``[2, num_layers, n, block_size, kv_heads, head_dim]`` tensor of the given blocks:
        ``out`` filled, or a new one."""
        index = torch.as_tensor(block_ids, dtype=torch.long, device=self.device)
        if out is None:
            return self.kv.index_select(2, index)
        return torch.index_select(self.kv, 2, index, out=out)

    def scatter(self, block_ids: Sequence[int], blocks: torch.Tensor) -> None:
        """Writes ``blocks`` (as ``gather`` returns them, on any device) into ``block_ids``, in order."""
        index = torch.as_tensor(block_ids, dtype=torch.long, device=self.device)
        # Synchronous: a caller may reuse the source as soon as this returns.
        self.kv.index_copy_(2, index, blocks.to(self.device))
