"""Attention sinks as a learned logit (Xiao et al., 2024; the form used by gpt-oss).

Each head has one extra logit that joins the softmax's denominator but carries no value,
so a head can put weight "nowhere" instead of dumping it on the first token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gpt.attention import Attention, at_least_fp32, causal_mask, register_attention, repeat_kv


@register_attention("sinks")
class SinkAttention(Attention):
    """kwargs: window (int or None, default None): also restrict each query to the last
    `window` positions, as gpt-oss does in alternate layers. Parameter: sinks (n_heads,)."""

    def __init__(self, config, window: int | None = None) -> None:
        super().__init__(config)
        if window is not None and int(window) < 1:
            raise TypeError(f"window={window} must be a positive integer or null")
        self.window = None if window is None else int(window)
        # zero: the sink starts as one more key with score 0
        self.sinks = nn.Parameter(torch.zeros(config.n_heads))

    def forward(self, q, k, v, q_pos, k_pos, key_padding_mask=None, return_weights=False):
        n_rep = q.size(1) // k.size(1)
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        s = at_least_fp32(q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
        allowed = causal_mask(q_pos, k_pos, key_padding_mask)
        if self.window is not None:
            allowed = allowed & (q_pos[:, None] - k_pos[None, :] < self.window)
        s = s.masked_fill(~allowed, float("-inf"))
        sink = self.sinks.to(s.dtype).view(1, -1, 1, 1).expand(s.size(0), -1, s.size(2), 1)
        w = torch.softmax(torch.cat([s, sink], dim=-1), dim=-1)[..., :-1]
        p = self.config.dropout if self.training else 0.0
        out = F.dropout(w, p, self.training).to(v.dtype) @ v
        return (out, w.to(q.dtype)) if return_weights else out
