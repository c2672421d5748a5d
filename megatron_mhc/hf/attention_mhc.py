"""Attention of the Hugging Face mHC model (`modeling_mhc.py`): Megatron's self-attention with
grouped KV heads and its multi-latent attention (MLA), with RoPE as Megatron applies it and a KV
cache through transformers' `Cache`. Plain PyTorch; copied beside the weights by the exporter."""

import torch
from torch import nn
from transformers.cache_utils import Cache

from .configuration_mhc import MHCConfig

# Megatron's attention_mask_func fills masked scores with this value before the softmax.
_MASKED_SCORE = -10000.0


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the first `rotary_dim` channels of x [b, heads, s, d] (Megatron's non-interleaved
    rotation); the rest pass through."""
    rotary_dim = cos.shape[-1]
    rotated, passed = x[..., :rotary_dim], x[..., rotary_dim:]
    rotated = rotated * cos + _rotate_half(rotated) * sin
    return torch.cat((rotated, passed), dim=-1)


class MHCRotaryEmbedding(nn.Module):
    """cos and sin [b, 1, s, dim] of the positions, computed in fp32 as Megatron does (`dim`:
    the rotated channels of a head, `rotary_dim`, or MLA's `qk_rope_head_dim`)."""

    def __init__(self, dim: int, theta: float):
        super().__init__()
        self.dim, self.theta = dim, theta
        self.register_buffer("inv_freq", self.inverse_frequencies(), persistent=False)

    def inverse_frequencies(self) -> torch.Tensor:
        exponents = torch.arange(0, self.dim, 2, dtype=torch.float32) / self.dim
        return 1.0 / (self.theta**exponents)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        freqs = position_ids[..., None].float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos().to(dtype), emb.sin().to(dtype)


class MHCAttention(nn.Module):
    """Self-attention with grouped KV heads; `cache_index` is this layer's slot in the KV cache
    (its ordinal among the attention layers)."""

    def __init__(self, config: MHCConfig, cache_index: int):
        super().__init__()
        self.cache_index = cache_index
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden, q_size = config.hidden_size, config.num_attention_heads * config.head_dim
        kv_size = config.num_key_value_heads * config.head_dim
        self.q_proj = nn.Linear(hidden, q_size, bias=config.attention_bias)
        self.k_proj = nn.Linear(hidden, kv_size, bias=config.attention_bias)
        self.v_proj = nn.Linear(hidden, kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(q_size, hidden, bias=config.linear_bias)

    def forward(self, x, rope, mask, cache: Cache | None):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = _apply_rope(q, *rope), _apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v, self.cache_index)
        groups = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return self.o_proj(_attend(q, k, v, mask, self.head_dim**-0.5))


def _attend(q, k, v, mask, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v for [b, heads, s, d] -> [b, s, heads * d_v]."""
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, _MASKED_SCORE)
    probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    return (probs @ v).transpose(1, 2).flatten(2)


class MHCLatentAttention(nn.Module):
    """Megatron's multi-latent attention (DeepSeek-V2/V3's names): queries through a low-rank
    `q_a_proj`, `q_a_layernorm`, `q_b_proj` (or one `q_proj`); keys and values from a shared
    latent (`kv_a_proj_with_mqa`, `kv_a_layernorm`, `kv_b_proj`) plus one RoPE key part shared
    by the heads. Megatron rotates the RoPE parts with their channels de-interleaved first."""

    def __init__(self, config: MHCConfig, cache_index: int):
        super().__init__()
        self.cache_index = cache_index
        self.num_heads = config.num_attention_heads
        self.nope_dim, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_dim, self.kv_lora_rank = config.v_head_dim, config.kv_lora_rank
        self.scale = config.mla_softmax_scale
        hidden, heads = config.hidden_size, config.num_attention_heads
        q_size = heads * (self.nope_dim + self.rope_dim)
        if config.q_lora_rank:
            self.q_a_proj = nn.Linear(hidden, config.q_lora_rank, bias=False)
            self.q_a_layernorm = _latent_norm(config, config.q_lora_rank)
            self.q_b_proj = nn.Linear(config.q_lora_rank, q_size, bias=False)
        else:
            self.q_proj = nn.Linear(hidden, q_size, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, self.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = _latent_norm(config, self.kv_lora_rank)
        self.kv_b_proj = nn.Linear(
            self.kv_lora_rank, heads * (self.nope_dim + self.v_dim), bias=False
        )
        self.o_proj = nn.Linear(heads * self.v_dim, hidden, bias=config.linear_bias)

    def forward(self, x, rope, mask, cache: Cache | None):
        b, s, _ = x.shape
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(b, s, self.num_heads, -1).transpose(1, 2)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], -1)
        kv = self.kv_b_proj(self.kv_a_layernorm(latent))
        k_nope, v = (
            kv.view(b, s, self.num_heads, -1)
            .transpose(1, 2)
            .split([self.nope_dim, self.v_dim], dim=-1)
        )
        q_rope = _apply_rope(_deinterleaved(q_rope), *rope)
        k_rope = _apply_rope(_deinterleaved(k_rope[:, None]), *rope)
        q = torch.cat((q_nope, q_rope), dim=-1)
        k = torch.cat((k_nope, k_rope.expand(-1, self.num_heads, -1, -1)), dim=-1)
        if cache is not None:
            k, v = cache.update(k, v, self.cache_index)
        return self.o_proj(_attend(q, k, v, mask, self.scale))


def _latent_norm(config: MHCConfig, width: int) -> nn.Module:
    """An RMSNorm of the latent (Megatron's MLA with qk_layernorm), else none."""
    if config.mla_latent_norms:
        return nn.RMSNorm(width, eps=config.norm_eps)
    return nn.Identity()


def _deinterleaved(x: torch.Tensor) -> torch.Tensor:
    """Channels (x0, x1, x2, x3, ...) as (x0, x2, ..., x1, x3, ...): Megatron's MLA RoPE."""
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)
