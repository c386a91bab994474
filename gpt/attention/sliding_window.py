"""Sliding-window attention (Longformer, Mistral): each query sees only the last `window` positions."""

from __future__ import annotations

from gpt.attention.base import register_attention
from gpt.attention.flex import ModAttention


@register_attention("sliding_window")
class SlidingWindowAttention(ModAttention):
    """kwargs: window (int, default 128) = how many positions a query sees, itself included;
    backend ("auto" | "flex" | "dense", see gpt.attention.flex)."""

    def __init__(self, config, window: int = 128, backend: str = "auto") -> None:
        super().__init__(config, backend=backend)
        if int(window) < 1:
            raise TypeError(f"window={window} must be a positive integer")
        self.window = int(window)

    def mask_mod(self, b, h, q_idx, kv_idx):
        return q_idx - kv_idx < self.window
