"""Cross-attention on the registry: queries from one sequence, keys and values from another.

    xattn = CrossAttention(config, source_dim=512)          # any registered config.attention
    y = xattn(x, source, source_mask)                       # x (B, T, dim), source (B, S, source_dim)

For an encoder-decoder block, an adapter on image features, a retrieval memory... Every
query sees every real source token: the source is placed at positions 0..S-1 and all
queries at position S, so the causal test of a variant (k_pos <= q_pos) hides nothing and
only `source_mask` (B, S; True = real token) removes keys. A position-aware variant (ALiBi,
sliding_window) therefore sees the source as lying just before the queries. No positional
encoding is applied here; add one to x and source beforehand if you want it. Each source row
needs at least one real token.
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
        self.mix = build_attention(config)

    def forward(
        self, x: Tensor, source: Tensor, source_mask: Tensor | None = None, return_weights: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """x (B, T, dim), source (B, S, source_dim), source_mask (B, S) bool -> (B, T, dim)
        [and the (B, n_heads, T, S) weights with return_weights=True]."""
        b, t, _ = x.shape
        s = source.size(1)
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(source).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(source).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        k_pos = torch.arange(s, device=x.device)
        q_pos = torch.full((t,), s, device=x.device)  # after every source token: nothing is "future"
        out = self.mix(q, k, v, q_pos, k_pos, source_mask, return_weights)
        weights = None
        if return_weights:
            out, weights = out
        out = self.wo(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))
        return (out, weights) if return_weights else out
