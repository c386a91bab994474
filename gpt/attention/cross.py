"""Cross-attention on the registry: queries from one sequence, keys and values from another.

    xattn = CrossAttention(config, source_dim=512)          # any registered config.attention
    y = xattn(x, source, source_mask)                       # x (B, T, dim), source (B, S, source_dim)
    kv = xattn.source_kv(source); y = xattn(x, kv=kv, source_mask=source_mask)   # K/V computed once

For an encoder-decoder block, an adapter on image features, a retrieval memory... The
variant is called in "cross" mode (see gpt/attention/__init__.py): every query sees every
real source token, only `source_mask` (B, S; True = real token) removes keys, and queries
and keys keep their own positions 0..T-1 and 0..S-1. No positional encoding is applied here;
add one to x and source beforehand if you want it. Each source row needs one real token.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gpt.attention import build_attention
from gpt.config import ModelConfig


class CrossAttention(nn.Module):
    """Projections around the mixing step of `config.attention` (heads, GQA and kwargs from config)."""

    def __init__(self, config: ModelConfig, source_dim: int | None = None) -> None:
        super().__init__()
        source_dim = source_dim or config.dim
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.wq = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.wk = nn.Linear(source_dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wv = nn.Linear(source_dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)
        with torch.random.fork_rng(devices=[]):  # as SelfAttention: the variant shifts no shared draw
            self.mix = build_attention(config, mode="cross")

    def source_kv(self, source: Tensor) -> tuple[Tensor, Tensor]:
        """The source's keys and values, (B, n_kv_heads, S, head_dim) each: computed once per source."""
        b, s, _ = source.shape
        k = self.wk(source).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(source).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return k, v

    def forward(
        self,
        x: Tensor,
        source: Tensor | None = None,
        source_mask: Tensor | None = None,
        return_weights: bool = False,
        kv: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """x (B, T, dim), source (B, S, source_dim) or its kv = source_kv(source), source_mask (B, S)
        bool -> (B, T, dim) [and the (B, n_heads, T, S) weights with return_weights=True]."""
        b, t, _ = x.shape
        k, v = kv if kv is not None else self.source_kv(source)
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        q_pos, k_pos = torch.arange(t, device=x.device), torch.arange(k.size(2), device=x.device)
        out = self.mix(q, k, v, q_pos, k_pos, source_mask, return_weights, mode="cross")
        weights = None
        if return_weights:
            out, weights = out
        out = self.wo(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))
        return (out, weights) if return_weights else out
