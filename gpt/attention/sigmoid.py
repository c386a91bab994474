"""Sigmoid attention (Ramapuram et al., 2024, "Theory, analysis, and best practices for sigmoid
self-attention"): weights sigmoid(score + b) instead of a softmax, with b = -log(n).

Without the bias the weights of a long row sum to about n/2 and training blows up; -log(n)
starts each row near a total weight of one. n is fixed (max_seq_len by default), not the
number of visible keys, so cached decoding gives exactly the full forward's numbers.
"""

from __future__ import annotations

import math

import torch

from gpt.attention.base import register_attention
from gpt.attention.softmax import SoftmaxAttention


@register_attention("sigmoid")
class SigmoidAttention(SoftmaxAttention):
    """kwargs: bias (float, default -log(max_seq_len))."""

    def __init__(self, config, bias: float | None = None) -> None:
        super().__init__(config)
        self.bias = -math.log(config.max_seq_len) if bias is None else float(bias)

    def normalize(self, s):
        # sigmoid(-inf) = 0: hidden keys get no weight and no gradient
        return torch.sigmoid(s + self.bias)
