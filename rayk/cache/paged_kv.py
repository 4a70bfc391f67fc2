"""The KV tensor of one device, in flash_attn's paged layout.

One allocation of shape ``[2, num_layers, num_blocks, block_size, num_kv_heads, head_dim]``;
``key_cache(l)`` and ``value_cache(l)`` are contiguous ``[num_blocks, block_size, num_kv_heads,
head_dim]`` views of it, exactly what ``flash_attn_with_kvcache(..., block_table=...)`` takes.

Blocks leave and enter many per call: ``gather``/``scatter`` move a ``[2, num_layers, n,
block_size, kv_heads, head_dim]`` tensor, and ``export_blocks``/``import_blocks`` wrap the same
path as raw bytes plus a metadata dict of plain values, the form blocks take between processes
(peers, through Ray's object store).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
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

    def blocks_from_bytes(self, payload: np.ndarray | bytes, num_blocks: int) -> torch.Tensor:
        """A ``[2, num_layers, num_blocks, ...]`` CPU tensor over a copy of raw block bytes."""
        raw = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        if raw.numel() != self.bytes_per_block * num_blocks:
            raise ValueError(f"payload has {raw.numel()} bytes, {num_blocks} blocks need {self.bytes_per_block * num_blocks}")
        return raw.view(self.dtype).view(2, self.num_layers, num_blocks, self.block_size, self.num_kv_heads, self.head_dim)

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

    def gather(self, block_ids: Sequence[int]) -> torch.Tensor:
        """A new ``[2, num_layers, n, block_size, kv_heads, head_dim]`` tensor of the given blocks."""
        return self.kv.index_select(2, torch.as_tensor(block_ids, dtype=torch.long, device=self.device))

    def scatter(self, block_ids: Sequence[int], blocks: torch.Tensor) -> None:
        """Writes ``blocks`` (as ``gather`` returns them, on any device) into ``block_ids``, in order."""
        index = torch.as_tensor(block_ids, dtype=torch.long, device=self.device)
        # Synchronous: a caller may reuse the source as soon as this returns.
        self.kv.index_copy_(2, index, blocks.to(self.device))

    def export_blocks(self, block_ids: Sequence[int]) -> tuple[np.ndarray, dict]:
        """Copies the given blocks out as one contiguous uint8 buffer plus its metadata.

        The buffer holds ``[2, num_layers, len(block_ids), block_size, kv_heads, head_dim]`` in
        the pool's dtype, blocks in the order given.
        """
        blocks = self.gather(block_ids).cpu().contiguous()
        metadata = self.layout.to_metadata() | {"num_blocks": len(block_ids)}
        return blocks.view(torch.uint8).numpy().reshape(-1), metadata

    def import_blocks(self, block_ids: Sequence[int], payload: np.ndarray | bytes, metadata: dict) -> None:
        """Writes blocks exported by a pool of the same layout into ``block_ids``, in order."""
        expected = self.layout.to_metadata() | {"num_blocks": len(block_ids)}
        if metadata != expected:
            mismatched = sorted(k for k in expected.keys() | metadata.keys() if metadata.get(k) != expected.get(k))
            raise ValueError(f"blocks do not fit this pool: metadata differs in {mismatched}")
        self.scatter(block_ids, self.layout.blocks_from_bytes(payload, len(block_ids)))
