"""Sigmoid attention (Ramapuram et al., 2024, "Theory, analysis, and best practices for sigmoid
self-attention"): weights sigmoid(score + b) instead of a softmax, with b = -log(n).

Without the bias the weights of a long row sum to about n/2 and training blows up; -log(n)
starts each row near a total weight of one. n is fixed (max_seq_len by default), not the
number of visible keys, so cached decoding gives exactly the full forward's numbers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gpt.attention import Attention, at_least_fp32, causal_mask, register_attention, repeat_kv


@register_attention("sigmoid")
class SigmoidAttention(Attention):
    """kwargs: bias (float, default -log(max_seq_len))."""

    def __init__(self, config, bias: float | None = None) -> None:
        super().__init__(config)
        self.bias = -math.log(config.max_seq_len) if bias is None else float(bias)

    def forward(self, q, k, v, q_pos, k_pos, key_padding_mask=None, return_weights=False):
        n_rep = q.size(1) // k.size(1)
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        s = at_least_fp32(q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1)) + self.bias
        # sigmoid(-inf) = 0: hidden keys get no weight and no gradient
        w = torch.sigmoid(s.masked_fill(~causal_mask(q_pos, k_pos, key_padding_mask), float("-inf")))
        p = self.config.dropout if self.training else 0.0
        out = F.dropout(w, p, self.training).to(v.dtype) @ v
        return (out, w.to(q.dtype)) if return_weights else out
