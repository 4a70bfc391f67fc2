"""Attention over the paged KV cache, for a flattened batch of sequences.

A step's batch is flat: sequence ``b`` contributes ``query_lens[b]`` new tokens (a prefill chunk,
or 1 for decode) and, after they are stored, has ``context_lens[b]`` tokens in the cache, laid out
through its row of ``block_tables``. New tokens' K/V are written into the cache first, then every
query attends to its sequence's cached keys causally (query ``i`` sees keys
``0 .. context_len - query_len + i``).

Two backends give the same numbers:

* ``flash_attn``: ``flash_attn_varlen_func(..., block_table=)`` when any sequence has several new
  tokens, ``flash_attn_with_kvcache(..., block_table=)`` for pure decode. CUDA only; flash-attn 2
  needs ``block_size % 256 == 0`` for paged KV.
* ``torch``: gathers each sequence's blocks through the block table (one ``index_select`` of
  whole blocks per group, layer and tensor) and calls ``scaled_dot_product_attention`` on a
  padded group of sequences. Decoding sequences form one group; prefilling sequences form
  another when padding them to one shape wastes at most half of it, else one group each, so a
  long prefill chunk never pads the decodes beside it. The groups' masks and indices are built
  once per step and shared by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from rayk.model.store_kvcache import store_kvcache

FLASH_ATTN_BLOCK_SIZE_MULTIPLE = 256


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@dataclass
class AttentionGroup:
    """Sequences attended together, padded to one shape."""

    rows: torch.Tensor | None  # [group tokens] their rows in the step's flat batch; None: every row
    block_ids: torch.Tensor  # [sequences * max_blocks] their block tables, flat; padding is block 0
    query_rows: torch.Tensor | None  # [group tokens] each token's row in the padded queries; None if unpadded
    mask: torch.Tensor  # [sequences, 1, max_query_len, max_blocks * block_size] bool, True = attend


@dataclass
class AttentionMetadata:
    backend: str
    slot_mapping: torch.Tensor  # [tokens] int64
    context_lens: torch.Tensor  # [batch] int32
    cu_query_lens: torch.Tensor  # [batch + 1] int32
    cu_context_lens: torch.Tensor  # [batch + 1] int32
    block_tables: torch.Tensor  # [batch, max_blocks] int32, padded with 0
    max_query_len: int
    max_context_len: int
    torch_groups: list[AttentionGroup] | None = None


def build_attention_metadata(
    query_lens: list[int],
    context_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    device: torch.device,
    backend: str,
) -> AttentionMetadata:
    """Everything attention needs for one step; host lists in, device tensors out."""
    batch = len(query_lens)
    max_blocks = max(len(t) for t in block_tables)
    table = np.zeros((batch, max_blocks), dtype=np.int32)
    for b, blocks in enumerate(block_tables):
        table[b, : len(blocks)] = blocks
    q_lens = np.asarray(query_lens, dtype=np.int32)
    ctx_lens = np.asarray(context_lens, dtype=np.int32)
    # The new tokens of sequence b sit at positions context_len - query_len .. context_len - 1.
    owners = np.repeat(np.arange(batch), q_lens)
    starts = np.cumsum(q_lens) - q_lens
    positions = np.arange(len(owners)) - starts[owners] + (ctx_lens - q_lens)[owners]
    slot_mapping = table[owners, positions // block_size].astype(np.int64) * block_size + positions % block_size
    max_query_len, max_context_len = int(q_lens.max()), int(ctx_lens.max())
    groups = None
    if backend == "torch":
        groups = _torch_groups(table, q_lens, ctx_lens, starts, block_size, device)
    return AttentionMetadata(
        backend=backend,
        slot_mapping=torch.from_numpy(slot_mapping).to(device),
        context_lens=torch.from_numpy(ctx_lens).to(device),
        cu_query_lens=torch.from_numpy(np.concatenate(([0], np.cumsum(q_lens))).astype(np.int32)).to(device),
        cu_context_lens=torch.from_numpy(np.concatenate(([0], np.cumsum(ctx_lens))).astype(np.int32)).to(device),
        block_tables=torch.from_numpy(table).to(device),
        max_query_len=max_query_len,
        max_context_len=max_context_len,
        torch_groups=groups,
    )


def _torch_groups(table, q_lens, ctx_lens, starts, block_size, device) -> list[AttentionGroup]:
    decoding = np.flatnonzero(q_lens == 1)
    prefilling = np.flatnonzero(q_lens > 1)
    members = [decoding] if len(decoding) else []
    if len(prefilling):
        padded = len(prefilling) * q_lens[prefilling].max() * ctx_lens[prefilling].max()
        if padded <= 2 * int((q_lens[prefilling].astype(np.int64) * ctx_lens[prefilling]).sum()):
            members.append(prefilling)
        else:
            members.extend(prefilling[i : i + 1] for i in range(len(prefilling)))
    whole_batch = len(members) == 1
    return [_torch_group(table, q_lens, ctx_lens, starts, seqs, block_size, device, whole_batch) for seqs in members]


def _torch_group(table, q_lens, ctx_lens, starts, seqs, block_size, device, whole_batch) -> AttentionGroup:
    q_lens, ctx_lens, starts = q_lens[seqs], ctx_lens[seqs], starts[seqs]
    num_blocks = -(-int(ctx_lens.max()) // block_size)
    max_q = int(q_lens.max())
    key_pos = np.arange(num_blocks * block_size)
    # The last key query i may see: causal within the sequence, and never past its context.
    last_key = (ctx_lens - q_lens)[:, None] + np.arange(max_q)[None, :]
    mask = (key_pos[None, None, :] <= last_key[:, :, None]) & (key_pos[None, None, :] < ctx_lens[:, None, None])
    owners = np.repeat(np.arange(len(seqs)), q_lens)
    offsets = np.arange(len(owners)) - (np.cumsum(q_lens) - q_lens)[owners]
    rows = None if whole_batch else torch.from_numpy(starts[owners] + offsets).to(device)
    query_rows = None if max_q == 1 else torch.from_numpy(owners * max_q + offsets).to(device)
    return AttentionGroup(
        rows=rows,
        block_ids=torch.from_numpy(table[seqs, :num_blocks].reshape(-1).astype(np.int64)).to(device),
        query_rows=query_rows,
        mask=torch.from_numpy(mask[:, None]).to(device),
    )


def paged_attention(q, k, v, key_cache, value_cache, metadata: AttentionMetadata, scale: float) -> torch.Tensor:
    """Stores ``k``/``v`` ([tokens, kv_heads, dim]) and returns attention of ``q`` ([tokens, heads, dim])."""
    store_kvcache(k, v, key_cache, value_cache, metadata.slot_mapping)
    if metadata.backend == "flash_attn":
        return _flash_attention(q, key_cache, value_cache, metadata, scale)
    groups = metadata.torch_groups
    if len(groups) == 1 and groups[0].rows is None:
        return _torch_attention(q, key_cache, value_cache, groups[0], scale)
    out = torch.empty_like(q)
    for group in groups:
        out[group.rows] = _torch_attention(q[group.rows], key_cache, value_cache, group, scale)
    return out


def _torch_attention(q, key_cache, value_cache, plan: AttentionGroup, scale: float) -> torch.Tensor:
    """Attention of one group's queries ``q`` ([group tokens, heads, dim])."""
    tokens, heads, dim = q.shape
    batch, _, max_q, max_k = plan.mask.shape
    kv_heads = key_cache.shape[2]
    keys = key_cache.index_select(0, plan.block_ids).view(batch, max_k, kv_heads, dim).transpose(1, 2)
    values = value_cache.index_select(0, plan.block_ids).view(batch, max_k, kv_heads, dim).transpose(1, 2)
    if plan.query_rows is None:
        queries = q.view(batch, 1, heads, dim)
    else:
        queries = q.new_zeros((batch * max_q, heads, dim))
        queries[plan.query_rows] = q
        queries = queries.view(batch, max_q, heads, dim)
    out = F.scaled_dot_product_attention(
        queries.transpose(1, 2), keys, values, attn_mask=plan.mask, scale=scale, enable_gqa=heads != kv_heads
    )
    out = out.transpose(1, 2).reshape(batch * max_q, heads, dim)
    return out if plan.query_rows is None else out[plan.query_rows]


def _flash_attention(q, key_cache, value_cache, metadata: AttentionMetadata, scale: float) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

    q = q.contiguous()  # q is a view into the fused projection's output
    if metadata.max_query_len == 1:
        out = flash_attn_with_kvcache(
            q.unsqueeze(1),
            key_cache,
            value_cache,
            cache_seqlens=metadata.context_lens,
            block_table=metadata.block_tables,
            softmax_scale=scale,
            causal=True,
        )
        return out.squeeze(1)
    return flash_attn_varlen_func(
        q,
        key_cache,
        value_cache,
        cu_seqlens_q=metadata.cu_query_lens,
        cu_seqlens_k=metadata.cu_context_lens,
        max_seqlen_q=metadata.max_query_len,
        max_seqlen_k=metadata.max_context_len,
        softmax_scale=scale,
        causal=True,
        block_table=metadata.block_tables,
    )
