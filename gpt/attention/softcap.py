"""Soft-capped scores (Gemma 2, Grok): cap·tanh(score/cap) keeps logits in (-cap, cap)."""

from __future__ import annotations

import torch

from gpt.attention.base import register_attention
from gpt.attention.flex import ModAttention


@register_attention("softcap")
class SoftcapAttention(ModAttention):
    """kwargs: cap (float, default 50.0, Gemma 2's value); backend (see gpt.attention.flex)."""

    def __init__(self, config, cap: float = 50.0, backend: str = "auto") -> None:
        super().__init__(config, backend=backend)
        if not float(cap) > 0:
            raise TypeError(f"cap={cap} must be positive")
        self.cap = float(cap)

    def score_mod(self, score, b, h, q_idx, kv_idx):
        return self.cap * torch.tanh(score / self.cap)
