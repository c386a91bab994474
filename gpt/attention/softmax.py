"""One skeleton for softmax-style attention: scores -> mask -> weights -> mix.

    scores   s = q kᵀ / √d (in fp32 at least), then score_mod(s, b, h, q_idx, kv_idx)
    mask     causal (k_pos <= q_pos) & key padding & mask_mod(b, h, q_idx, kv_idx); hidden -> -inf
    weights  normalize(s): a softmax over the keys
    mix      combine(w, v): dropout(w) @ v

A variant overrides only the step it changes:

    score_mod(score, b, h, q_idx, kv_idx) -> score   change a pre-softmax score        alibi, softcap
    mask_mod(b, h, q_idx, kv_idx) -> bool            False hides the key from the query sliding_window, sinks
    normalize(s) -> weights                          replace the softmax               sigmoid, sinks
    weights(q, k, allowed, idx) -> weights           how weights come from q and k     differential (two maps)
    combine(w, v) -> out                             how the values are mixed          differential (head norm)

score_mod and mask_mod have FlexAttention's signature; q_idx and kv_idx are *positions* (the
slots q_pos / k_pos of the contract), so a mod written for training works unchanged against
a static cache. The key-padding mask is always applied on top, and causality in causal mode.
The mode of the call decides what positions the mods see:
    causal          q_idx, kv_idx as they are
    bidirectional   the pair ordered (later, earlier): max and min of the two positions, so a
                    mod written for causal attention acts as its symmetric form (ALiBi's
                    penalty on |i - j|, a window of |i - j| < w on both sides)
    cross           both 0: positions of two different sequences have no distance, so
                    position mods are neutral and score-only mods (softcap) still apply Write mods with
tensor operations (torch.where, not `if`): the same function runs element-wise inside
FlexAttention and on broadcast index grids in the written-out path, idx = (b (B,1,1,1),
h (1,H,1,1), q_idx (1,1,Tq,1), kv_idx (1,1,1,Tk)).

What a variant overrides decides how it can run:
- written out: the steps above on the materialised (B, H, Tq, Tk) scores. Always possible,
  differentiable everywhere, and the only path that returns the weights.
- F.scaled_dot_product_attention, when at most mask_mod is changed (the mask goes in as a
  boolean; without one, padding or a cache, the kernel builds the causal mask itself).
- FlexAttention, when at most score_mod / mask_mod are changed and `backend` allows it
  (gpt.attention.flex.ModAttention takes backend="auto" | "flex" | "dense").
MathAttention sets kernels = False: always written out, the reference the others are checked against.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from gpt.attention.base import MODES, Attention, at_least_fp32, causal_mask, repeat_kv

Grids = tuple[Tensor, Tensor, Tensor, Tensor]


class SoftmaxAttention(Attention):
    """Softmax attention as overridable steps; with no override it is plain causal attention."""

    modes = MODES

    #: False: never a fused kernel, always the written-out steps
    kernels: bool = True
    #: the steps act per head; a variant whose mods read the global head index or a per-head
    #: parameter sets False (tensor parallelism would hand it local head numbers)
    head_local: bool = True
    #: "dense" never calls FlexAttention; "auto" does inside torch.compile without gradients; "flex" always
    backend: str = "dense"

    # -- the steps a variant may override ---------------------------------------------------
    def score_mod(self, score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return score

    def mask_mod(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return kv_idx <= q_idx

    def normalize(self, s: Tensor) -> Tensor:
        """Masked scores (-inf where hidden) -> weights."""
        return torch.softmax(s, dim=-1)

    def weights(self, q: Tensor, k: Tensor, allowed: Tensor, idx: Grids) -> Tensor:
        """(B, H, Tq, Tk) weights from q and k (kv heads already repeated), the boolean mask and
        the mods' arguments (idx, as the call's mode gives them)."""
        # softmax in fp32: bf16 scores lose the small differences that matter after exp
        s = at_least_fp32(q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
        if self.has_score_mod:
            s = self.score_mod(s, *idx)
        return self.normalize(s.masked_fill(~allowed, float("-inf")))

    def combine(self, w: Tensor, v: Tensor) -> Tensor:
        p = self.config.dropout if self.training else 0.0
        return F.dropout(w, p, self.training).to(v.dtype) @ v

    # -- what the overrides allow -------------------------------------------------------------
    def _changes(self, step: str) -> bool:
        return getattr(type(self), step) is not getattr(SoftmaxAttention, step)

    @property
    def has_score_mod(self) -> bool:
        return self._changes("score_mod")

    @property
    def has_mask_mod(self) -> bool:
        return self._changes("mask_mod")

    @property
    def only_mods(self) -> bool:
        """True when the variant is softmax attention changed by score_mod / mask_mod at most."""
        return not any(self._changes(step) for step in ("normalize", "weights", "combine"))

    def use_flex(self, q: Tensor) -> bool:
        if self.backend == "flex":
            if torch.is_grad_enabled() and q.requires_grad and q.device.type == "cpu":
                raise RuntimeError("FlexAttention has no backward on the CPU; train with backend='auto' or 'dense'")
            return True
        return self.backend == "auto" and torch.compiler.is_compiling() and not torch.is_grad_enabled()

    # -- the forward ------------------------------------------------------------------------------
    def forward(self, q, k, v, q_pos, k_pos, key_padding_mask=None, return_weights=False, mode="causal"):
        if self.kernels and self.only_mods and not return_weights:
            if self.use_flex(q):
                return self.flex_forward(q, k, v, q_pos, k_pos, key_padding_mask, mode)
            if not self.has_score_mod:
                return self.sdpa_forward(q, k, v, q_pos, k_pos, key_padding_mask, mode)
        n_rep = q.size(1) // k.size(1)
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        idx = mod_grids(index_grids(q, q_pos, k_pos), mode)
        w = self.weights(q, k, self.mask(q_pos, k_pos, key_padding_mask, idx, mode), idx)
        out = self.combine(w, v)
        return (out, w.to(q.dtype)) if return_weights else out

    def mask(
        self, q_pos: Tensor, k_pos: Tensor, key_padding_mask: Tensor | None, idx: Grids, mode: str = "causal"
    ) -> Tensor:
        """Boolean (1 or B, 1 or H, Tq, Tk), True = may attend; idx are the mods' arguments."""
        if mode == "causal":
            allowed = causal_mask(q_pos, k_pos, key_padding_mask)
            return allowed & self.mask_mod(*idx) if self.has_mask_mod else allowed
        if key_padding_mask is not None:
            allowed = key_padding_mask[:, None, None, :]
        else:
            allowed = torch.ones(1, 1, q_pos.size(-1), k_pos.size(-1), dtype=torch.bool, device=q_pos.device)
        if self.has_mask_mod:
            allowed = allowed & self.mask_mod(*idx)
        if mode == "bidirectional":
            # as causal_mask: a query always sees its own slot, so a padding query whose window holds
            # no real key has no all-masked row (NaN, which the next layer would read through v)
            _, _, qi, ki = idx
            allowed = allowed | (qi == ki)
        return allowed

    def sdpa_forward(self, q, k, v, q_pos, k_pos, key_padding_mask=None, mode="causal"):
        p = self.config.dropout if self.training else 0.0
        gqa = q.size(1) != k.size(1)
        if mode != "causal" and not self.has_mask_mod and key_padding_mask is None:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p, enable_gqa=gqa)
        # Without a cache the model passes q_pos and k_pos as the same arange(T) tensor: an
        # identity test keeps this a trace-time decision (no sync). Then the kernel may build
        # the causal mask itself; against a static cache is_causal would align the mask
        # top-left, which is wrong when Tq < Tk, so the mask goes in explicitly.
        if (
            mode == "causal"
            and not self.has_mask_mod
            and key_padding_mask is None
            and q.size(2) == k.size(2)
            and q_pos is k_pos
        ):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, enable_gqa=gqa)
        idx = mod_grids(index_grids(q, q_pos, k_pos), mode)
        mask = self.mask(q_pos, k_pos, key_padding_mask, idx, mode)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, enable_gqa=gqa)

    def flex_forward(self, q, k, v, q_pos, k_pos, key_padding_mask=None, mode="causal"):
        from torch.nn.attention.flex_attention import flex_attention

        def score_mod(score, b, h, q_idx, kv_idx):
            qp = q_pos[b, q_idx] if q_pos.dim() == 2 else q_pos[q_idx]
            kp = k_pos[b, kv_idx] if k_pos.dim() == 2 else k_pos[kv_idx]
            if mode == "causal":
                allowed = kp <= qp
                if key_padding_mask is not None:
                    allowed = (allowed & key_padding_mask[b, kv_idx]) | (kp == qp)  # as causal_mask
            else:
                allowed = key_padding_mask[b, kv_idx] if key_padding_mask is not None else qp >= 0
                same = qp == kp
                qp, kp = (torch.maximum(qp, kp), torch.minimum(qp, kp)) if mode == "bidirectional" else (qp * 0, kp * 0)
            if self.has_mask_mod:
                allowed = allowed & self.mask_mod(b, h, qp, kp)
            if mode == "bidirectional":
                allowed = allowed | same  # as mask(): a query always sees its own slot
            if self.has_score_mod:
                score = self.score_mod(score, b, h, qp, kp)
            return torch.where(allowed, score, float("-inf"))

        # Compiled flex needs q as its own contiguous 4-D buffer. .contiguous() is not enough:
        # without RoPE a one-token q is already contiguous, stays a view of the 2-D projection,
        # and inductor's CPU flex template then fails ("expected 4, got 2"; torch 2.13).
        q = q.clone(memory_format=torch.contiguous_format)
        return flex_attention(q, k, v, score_mod=score_mod, enable_gqa=q.size(1) != k.size(1))


def index_grids(q: Tensor, q_pos: Tensor, k_pos: Tensor) -> Grids:
    """The mods' arguments for the written-out path: b, h, q_idx, kv_idx as broadcastable grids
    (q_idx is (B, 1, Tq, 1) when every row has its own positions)."""
    b, h = q.shape[:2]
    bi = torch.arange(b, device=q.device).view(b, 1, 1, 1)
    hi = torch.arange(h, device=q.device).view(1, h, 1, 1)
    qi = q_pos[:, None, :, None] if q_pos.dim() == 2 else q_pos.view(1, 1, -1, 1)
    ki = k_pos[:, None, None, :] if k_pos.dim() == 2 else k_pos.view(1, 1, 1, -1)
    return bi, hi, qi, ki


def mod_grids(idx: Grids, mode: str) -> Grids:
    """The positions the mods see in `mode` (see the module docstring)."""
    b, h, qi, ki = idx
    if mode == "bidirectional":
        return b, h, torch.maximum(qi, ki), torch.minimum(qi, ki)
    if mode == "cross":
        return b, h, torch.zeros_like(qi), torch.zeros_like(ki)
    return idx
