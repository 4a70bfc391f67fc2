"""A Llama-family decoder over the paged KV cache: Llama 2/3 and Qwen3 (per-head q/k RMSNorm).

Inputs are flat: ``input_ids`` and ``positions`` are [tokens] for the whole step's batch; the
``AttentionMetadata`` says which rows belong to which sequence. Q/K/V and gate/up projections are
fused into one matmul each; the loader concatenates the checkpoint's separate weights.
"""

from __future__ import annotations

import torch
from torch import nn

from rayk.cache.paged_kv import PagedKVCache
from rayk.model.architecture import DecoderArchitecture
from rayk.model.attention import AttentionMetadata, paged_attention
from rayk.model.layers import GatedMLP, RMSNorm, RotaryEmbedding, rotate


class DecoderAttention(nn.Module):
    def __init__(self, arch: DecoderArchitecture):
        super().__init__()
        self.num_heads = arch.num_heads
        self.num_kv_heads = arch.num_kv_heads
        self.head_dim = arch.head_dim
        self.q_size = arch.num_heads * arch.head_dim
        self.kv_size = arch.num_kv_heads * arch.head_dim
        self.scale = arch.head_dim**-0.5
        self.qkv_proj = nn.Linear(arch.hidden_size, self.q_size + 2 * self.kv_size, bias=arch.attention_bias)
        self.o_proj = nn.Linear(self.q_size, arch.hidden_size, bias=arch.attention_bias)
        if arch.qk_norm:
            self.q_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps)
            self.k_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps)
        self.qk_norm = arch.qk_norm

    def forward(self, cos_sin, hidden, key_cache, value_cache, metadata: AttentionMetadata):
        tokens = hidden.shape[0]
        qkv = self.qkv_proj(hidden)
        qk = qkv[:, : self.q_size + self.kv_size].view(tokens, self.num_heads + self.num_kv_heads, self.head_dim)
        v = qkv[:, self.q_size + self.kv_size :].view(tokens, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            qk = torch.cat((self.q_norm(q), self.k_norm(k)), dim=1)
        # q and k sit side by side in the fused projection: one rotation serves both.
        q, k = rotate(qk, *cos_sin).split([self.num_heads, self.num_kv_heads], dim=1)
        out = paged_attention(q, k, v, key_cache, value_cache, metadata, self.scale)
        return self.o_proj(out.reshape(tokens, self.q_size))


class DecoderLayer(nn.Module):
    def __init__(self, arch: DecoderArchitecture):
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.self_attn = DecoderAttention(arch)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.mlp = GatedMLP(arch.hidden_size, arch.intermediate_size, arch.mlp_bias)

    def forward(self, cos_sin, hidden, key_cache, value_cache, metadata):
        hidden = hidden + self.self_attn(cos_sin, self.input_layernorm(hidden), key_cache, value_cache, metadata)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class DecoderModel(nn.Module):
    def __init__(self, arch: DecoderArchitecture):
        super().__init__()
        # An explicit (uninitialized) weight skips Embedding's normal_ init: on the meta device the
        # loader builds on, that init imports torch._dynamo, 1.3 s of every cold start.
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size, _weight=torch.empty(arch.vocab_size, arch.hidden_size))
        self.rotary = RotaryEmbedding(arch.head_dim, arch.rope_theta, arch.rope_scaling)
        self.layers = nn.ModuleList(DecoderLayer(arch) for _ in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)


class CausalLM(nn.Module):
    """Hidden states for every new token (``forward``) and float32 logits for chosen rows.

    Built on the meta device by the loader, which then assigns every weight; the constructor's
    own values are never used."""

    def __init__(self, arch: DecoderArchitecture):
        super().__init__()
        self.arch = arch
        self.model = DecoderModel(arch)
        if not arch.tie_word_embeddings:
            self.lm_head = nn.Linear(arch.hidden_size, arch.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: PagedKVCache, metadata: AttentionMetadata):
        hidden = self.model.embed_tokens(input_ids)
        cos_sin = self.model.rotary.cos_sin(positions, hidden.dtype)
        for i, layer in enumerate(self.model.layers):
            hidden = layer(cos_sin, hidden, kv_cache.key_cache(i), kv_cache.value_cache(i), metadata)
        return self.model.norm(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.model.embed_tokens.weight if self.arch.tie_word_embeddings else self.lm_head.weight
        return torch.nn.functional.linear(hidden, weight).float()
