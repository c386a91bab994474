"""Differential attention (Ye et al., 2024, "Differential Transformer").

Each head splits its query and key into two halves and takes the difference of their two
softmax maps, which cancels attention noise common to both:

    A = softmax(q1 k1ᵀ/√d) - λ · softmax(q2 k2ᵀ/√d),   out = RMSNorm(A v) · (1 - λ_init)

with λ = exp(λq1·λk1) - exp(λq2·λk2) + λ_init learned per layer. The values keep the full
head_dim. The paper's per-head norm (GroupNorm) is an RMSNorm over each head's output here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gpt.attention import Attention, at_least_fp32, causal_mask, register_attention, repeat_kv


@register_attention("differential")
class DifferentialAttention(Attention):
    """kwargs: lambda_init (float, default 0.8: the paper's value for deep layers; it uses
    0.8 - 0.6·exp(-0.3·(layer - 1)) per layer). Parameters: lambda_q1, lambda_k1, lambda_q2,
    lambda_k2 (head_dim / 2 each). head_dim must be even."""

    def __init__(self, config, lambda_init: float = 0.8) -> None:
        super().__init__(config)
        if config.head_dim % 2:
            raise TypeError(f"head_dim={config.head_dim} must be even (queries and keys are split in two)")
        self.lambda_init = float(lambda_init)
        half = config.head_dim // 2
        # small random start as in the paper's code: λ starts near lambda_init
        for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
            setattr(self, name, nn.Parameter(0.1 * torch.randn(half)))
        self.norm_eps = config.norm_eps

    def forward(self, q, k, v, q_pos, k_pos, key_padding_mask=None, return_weights=False):
        n_rep = q.size(1) // k.size(1)
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        half = q.size(-1) // 2
        hidden = ~causal_mask(q_pos, k_pos, key_padding_mask)
        maps = []
        for sl in (slice(0, half), slice(half, None)):
            s = at_least_fp32(q[..., sl] @ k[..., sl].transpose(-2, -1)) / math.sqrt(half)
            maps.append(torch.softmax(s.masked_fill(hidden, float("-inf")), dim=-1))
        lam = (
            torch.exp(torch.dot(self.lambda_q1, self.lambda_k1))
            - torch.exp(torch.dot(self.lambda_q2, self.lambda_k2))
            + self.lambda_init
        )
        w = maps[0] - lam.to(maps[0].dtype) * maps[1]
        p = self.config.dropout if self.training else 0.0
        out = F.dropout(w, p, self.training).to(v.dtype) @ v
        out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + self.norm_eps) * (1 - self.lambda_init)
        return (out, w.to(q.dtype)) if return_weights else out
