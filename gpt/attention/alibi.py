"""ALiBi (Press et al., 2022): no positional embedding; a per-head linear penalty on distance.

score(q, k) - m_h · (q_pos - k_pos), with slopes m_h a geometric sequence. Use it with
ModelConfig(pos_encoding="none"); it still runs next to RoPE if you want both.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gpt.attention.base import register_attention
from gpt.attention.flex import ModAttention


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """The paper's slopes: 2^(-8/n), 2^(-16/n), ... for n a power of two; otherwise those of the
    nearest smaller power of two followed by every other slope of the next one."""

    def geometric(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_heads).is_integer():
        return torch.tensor(geometric(n_heads))
    low = 2 ** math.floor(math.log2(n_heads))
    return torch.tensor(geometric(low) + geometric(2 * low)[0::2][: n_heads - low])


@register_attention("alibi")
class ALiBiAttention(ModAttention):
    """kwargs: backend (see gpt.attention.flex). Slopes follow n_heads."""

    head_local = False  # the slope is a function of the global head index

    def __init__(self, config, backend: str = "auto") -> None:
        super().__init__(config, backend=backend)
        self.n_heads = config.n_heads

    def slope(self, h: Tensor) -> Tensor:
        """alibi_slopes(n_heads)[h], computed from h: inductor's FlexAttention lowering failed on
        indexing a slopes buffer here (torch 2.13 CPU), arithmetic on h compiles."""
        low = 2 ** math.floor(math.log2(self.n_heads))
        first = torch.exp2(-8.0 * (h + 1) / low)  # the slopes of `low` heads
        rest = torch.exp2(-4.0 * (2 * (h - low) + 1) / low)  # every other slope of 2*low heads
        return torch.where(h < low, first, rest)

    def score_mod(self, score, b, h, q_idx, kv_idx):
        return score - self.slope(h) * (q_idx - kv_idx)
