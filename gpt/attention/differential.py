"""Differential attention (Ye et al., 2024, "Differential Transformer").

Each head splits its query and key into two halves and takes the difference of their two
softmax maps, which cancels attention noise common to both:

    A = softmax(q1 k1ᵀ/√d) - λ · softmax(q2 k2ᵀ/√d),   out = RMSNorm(A v) · (1 - λ_init)

with λ = exp(λq1·λk1) - exp(λq2·λk2) + λ_init learned per layer. The values keep the full
head_dim. The paper's per-head norm (GroupNorm) is an RMSNorm over each head's output here.
"""

from __future__ import annotations

import torch
from torch import nn

from gpt.attention.base import register_attention
from gpt.attention.softmax import SoftmaxAttention


@register_attention("differential")
class DifferentialAttention(SoftmaxAttention):
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

    def weights(self, q, k, allowed, idx):
        # each half is a softmax map of its own, scaled by 1/√(head_dim/2)
        half = q.size(-1) // 2
        a1 = super().weights(q[..., :half], k[..., :half], allowed, idx)
        a2 = super().weights(q[..., half:], k[..., half:], allowed, idx)
        lam = (
            torch.exp(torch.dot(self.lambda_q1, self.lambda_k1))
            - torch.exp(torch.dot(self.lambda_q2, self.lambda_k2))
            + self.lambda_init
        )
        return a1 - lam.to(a1.dtype) * a2

    def combine(self, w, v):
        out = super().combine(w, v)
        return out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + self.norm_eps) * (1 - self.lambda_init)
