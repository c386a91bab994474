"""Standard softmax attention: the fast "sdpa" variant and the readable "math" reference."""

from __future__ import annotations

from gpt.attention.base import register_attention
from gpt.attention.softmax import SoftmaxAttention


@register_attention("math")
class MathAttention(SoftmaxAttention):
    """softmax(q kᵀ / √d + mask) v, written out (gpt.attention.softmax). The reference every
    other variant is checked against."""

    kernels = False


@register_attention("sdpa")
class SDPAttention(SoftmaxAttention):
    """F.scaled_dot_product_attention: fused kernels (flash / memory-efficient) where available.

    With return_weights it runs the written-out steps: fused kernels never form the weights.
    """
