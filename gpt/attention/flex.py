"""Variants written as FlexAttention-style score_mod / mask_mod functions.

    score_mod(score, b, h, q_idx, kv_idx) -> score   change a pre-softmax score
    mask_mod(b, h, q_idx, kv_idx) -> bool            False hides the key from the query

q_idx and kv_idx are *positions* (the slots q_pos / k_pos of the contract), so a mod written
for training works unchanged against a static cache. Causality and the key-padding mask
are always applied on top. Write mods with tensor operations (torch.where, not `if`): the
same function runs element-wise inside FlexAttention and on broadcast index grids in the
dense path.

Two ways to run the same variant:
- "flex": torch.nn.attention.flex_attention. Compiled, about as fast as SDPA on a CPU, but
  it has no backward there; eager it is several times slower.
- "dense": materialise the scores (or only the boolean mask) for the positions at hand and
  use SDPA or the math path. Differentiable everywhere.
backend="auto" (the default) picks flex inside torch.compile when no gradient is needed
(the compiled decode step) and dense otherwise (training, eager evaluation).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from gpt.attention import Attention, at_least_fp32, causal_mask, register_attention, repeat_kv

ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]
MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
BACKENDS = ("auto", "flex", "dense")


class ModAttention(Attention):
    """Softmax attention changed by `score_mod` and/or `mask_mod`; subclasses override either."""

    def __init__(self, config, backend: str = "auto", **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        if backend not in BACKENDS:
            raise TypeError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}")
        self.backend = backend

    # the identity mods; a subclass overrides what it changes
    def score_mod(self, score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return score

    def mask_mod(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return kv_idx <= q_idx

    @property
    def has_score_mod(self) -> bool:
        return type(self).score_mod is not ModAttention.score_mod

    @property
    def has_mask_mod(self) -> bool:
        return type(self).mask_mod is not ModAttention.mask_mod

    def use_flex(self, q: Tensor) -> bool:
        if self.backend == "flex":
            if torch.is_grad_enabled() and q.requires_grad and q.device.type == "cpu":
                raise RuntimeError("FlexAttention has no backward on the CPU; train with backend='auto' or 'dense'")
            return True
        return self.backend == "auto" and torch.compiler.is_compiling() and not torch.is_grad_enabled()

    def forward(self, q, k, v, q_pos, k_pos, key_padding_mask=None, return_weights=False):
        if self.use_flex(q) and not return_weights:
            return self.flex_forward(q, k, v, q_pos, k_pos, key_padding_mask)
        return self.dense_forward(q, k, v, q_pos, k_pos, key_padding_mask, return_weights)

    # -- the dense path ---------------------------------------------------------------
    def dense_forward(self, q, k, v, q_pos, k_pos, key_padding_mask=None, return_weights=False):
        b, h = q.shape[:2]
        # broadcastable index grids: (B,1,1,1), (1,H,1,1), (1,1,Tq,1), (1,1,1,Tk)
        bi = torch.arange(b, device=q.device).view(b, 1, 1, 1)
        hi = torch.arange(h, device=q.device).view(1, h, 1, 1)
        qi, ki = q_pos.view(1, 1, -1, 1), k_pos.view(1, 1, 1, -1)
        allowed = causal_mask(q_pos, k_pos, key_padding_mask)
        if self.has_mask_mod:
            allowed = allowed & self.mask_mod(bi, hi, qi, ki)
        p = self.config.dropout if self.training else 0.0
        if not self.has_score_mod and not return_weights:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p, enable_gqa=h != k.size(1))
        n_rep = h // k.size(1)
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        s = at_least_fp32(q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
        if self.has_score_mod:
            s = self.score_mod(s, bi, hi, qi, ki)
        w = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
        out = F.dropout(w, p, self.training).to(v.dtype) @ v
        return (out, w.to(q.dtype)) if return_weights else out

    # -- the FlexAttention path -------------------------------------------------------
    def flex_forward(self, q, k, v, q_pos, k_pos, key_padding_mask=None):
        from torch.nn.attention.flex_attention import flex_attention

        def score_mod(score, b, h, q_idx, kv_idx):
            qp, kp = q_pos[q_idx], k_pos[kv_idx]
            allowed = kp <= qp
            if key_padding_mask is not None:
                allowed = (allowed & key_padding_mask[b, kv_idx]) | (kp == qp)  # as causal_mask
            if self.has_mask_mod:
                allowed = allowed & self.mask_mod(b, h, qp, kp)
            if self.has_score_mod:
                score = self.score_mod(score, b, h, qp, kp)
            return torch.where(allowed, score, float("-inf"))

        # Compiled flex needs q as its own contiguous 4-D buffer. .contiguous() is not enough:
        # without RoPE a one-token q is already contiguous, stays a view of the 2-D projection,
        # and inductor's CPU flex template then fails ("expected 4, got 2"; torch 2.13).
        q = q.clone(memory_format=torch.contiguous_format)
        return flex_attention(q, k, v, score_mod=score_mod, enable_gqa=q.size(1) != k.size(1))


def register_mods(name: str, score_mod: ScoreMod | None = None, mask_mod: MaskMod | None = None) -> type[ModAttention]:
    """Register a variant made of plain functions, e.g.

    register_mods("tanh30", score_mod=lambda s, b, h, q, kv: 30 * torch.tanh(s / 30))
    """
    if score_mod is None and mask_mod is None:
        raise TypeError(f"register_mods({name!r}) needs a score_mod, a mask_mod or both")
    body: dict[str, Any] = {"__doc__": f"score_mod / mask_mod variant {name!r}"}
    if score_mod is not None:
        body["score_mod"] = lambda self, score, b, h, q_idx, kv_idx: score_mod(score, b, h, q_idx, kv_idx)
    if mask_mod is not None:
        body["mask_mod"] = lambda self, b, h, q_idx, kv_idx: mask_mod(b, h, q_idx, kv_idx)
    cls = type(f"Mods_{name}", (ModAttention,), body)
    return register_attention(name)(cls)
