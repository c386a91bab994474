"""Attention sinks as a learned logit (Xiao et al., 2024; the form used by gpt-oss).

Each head has one extra logit that joins the softmax's denominator but carries no value,
so a head can put weight "nowhere" instead of dumping it on the first token.
"""

from __future__ import annotations

import torch
from torch import nn

from gpt.attention.base import register_attention
from gpt.attention.softmax import SoftmaxAttention


@register_attention("sinks")
class SinkAttention(SoftmaxAttention):
    """kwargs: window (int or None, default None): also restrict each query to the last
    `window` positions, as gpt-oss does in alternate layers. Parameter: sinks (n_heads,)."""

    head_local = False  # one parameter per head, over all heads (gpt.tp does not slice it)

    def __init__(self, config, window: int | None = None) -> None:
        super().__init__(config)
        if window is not None and int(window) < 1:
            raise TypeError(f"window={window} must be a positive integer or null")
        self.window = None if window is None else int(window)
        # zero: the sink starts as one more key with score 0
        self.sinks = nn.Parameter(torch.zeros(config.n_heads))

    def mask_mod(self, b, h, q_idx, kv_idx):
        return kv_idx <= q_idx if self.window is None else q_idx - kv_idx < self.window

    def normalize(self, s):
        sink = self.sinks.to(s.dtype).view(1, -1, 1, 1).expand(s.size(0), -1, s.size(2), 1)
        return torch.softmax(torch.cat([s, sink], dim=-1), dim=-1)[..., :-1]
