"""Standard softmax attention: the fast "sdpa" variant and the readable "math" reference."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from gpt.attention import Attention, at_least_fp32, causal_mask, register_attention, repeat_kv


@register_attention("math")
class MathAttention(Attention):
    """softmax(q kᵀ / √d + mask) v, written out. The reference every other variant is checked against."""

    def scores(self, q: Tensor, k: Tensor) -> Tensor:
        """Pre-softmax scores (B, Hq, Tq, Tk). Variants that only change the scores override this."""
        return (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))

    def forward(self, q, k, v, q_pos, k_pos, key_padding_mask=None, return_weights=False):
        n_rep = q.size(1) // k.size(1)
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        # softmax in fp32: bf16 scores lose the small differences that matter after exp
        s = at_least_fp32(self.scores(q, k))
        s = s.masked_fill(~causal_mask(q_pos, k_pos, key_padding_mask), float("-inf"))
        w = torch.softmax(s, dim=-1)
        p = self.config.dropout if self.training else 0.0
        out = F.dropout(w, p, self.training).to(v.dtype) @ v
        return (out, w.to(q.dtype)) if return_weights else out


@register_attention("sdpa")
class SDPAttention(Attention):
    """F.scaled_dot_product_attention: fused kernels (flash / memory-efficient) where available."""

    def forward(self, q, k, v, q_pos, k_pos, key_padding_mask=None, return_weights=False):
        if return_weights:
            # fused kernels never form the weights; the math path gives the same numbers
            return MathAttention.forward(self, q, k, v, q_pos, k_pos, key_padding_mask, True)  # type: ignore[arg-type]
        p = self.config.dropout if self.training else 0.0
        gqa = q.size(1) != k.size(1)
        if key_padding_mask is None and q.size(2) == k.size(2) and self._is_plain_prefix(q_pos, k_pos):
            # training / full forward: let the kernel build the causal mask itself
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, enable_gqa=gqa)
        # a query against a static cache: is_causal would align the mask top-left, which is
        # wrong when Tq < Tk, so pass the mask explicitly
        mask = causal_mask(q_pos, k_pos, key_padding_mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, enable_gqa=gqa)

    @staticmethod
    def _is_plain_prefix(q_pos: Tensor, k_pos: Tensor) -> bool:
        # Positions are built by the model: without a cache they are both arange(T), and this is
        # the same tensor object. Comparing identity keeps this a trace-time decision (no sync).
        return q_pos is k_pos

    scores = MathAttention.scores
