"""Causal linear attention (Katharopoulos et al., 2020, "Transformers are RNNs").

    out_t = φ(q_t) · Σ_{j≤t} φ(k_j) v_jᵀ  /  φ(q_t) · Σ_{j≤t} φ(k_j)

with a positive feature map φ instead of exp(q·k). The two sums are a fixed-size state
(D×D and D per kv head), so decoding keeps that state instead of a growing KV cache: this
variant sets replaces_kv_cache and owns its (static-shaped) state.

Training and the first chunk use the quadratic form above (masked φ(q)φ(k)ᵀ, exact and
simple); a chunk at input_pos adds the state of everything before it, then folds itself in.
Tokens must arrive in order; a chunk starting at position 0 starts a new sequence.

Bidirectional and cross calls use the non-causal form, linear in the length: every query
reads the same sums over all (real) keys, out = φ(q)·(Σ φ(k) vᵀ) / φ(q)·Σ φ(k).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from gpt.attention.base import MODES, Attention, at_least_fp32, register_attention, repeat_kv

FEATURE_MAPS = {
    "elu": lambda x: F.elu(x) + 1.0,  # the paper's choice: positive, smooth, linear for x > 0
    "relu": F.relu,
}


@register_attention("linear")
class LinearAttention(Attention):
    """kwargs: feature_map ("elu" | "relu", default "elu"); eps (float, default 1e-6) keeps the
    normaliser away from zero."""

    replaces_kv_cache = True
    head_local = True  # one running state per kv head
    modes = MODES

    def __init__(self, config, feature_map: str = "elu", eps: float = 1e-6) -> None:
        super().__init__(config)
        if feature_map not in FEATURE_MAPS:
            raise TypeError(f"feature_map={feature_map!r} is not one of {', '.join(FEATURE_MAPS)}")
        self.feature_map, self.phi, self.eps = feature_map, FEATURE_MAPS[feature_map], float(eps)
        # Σ φ(k) vᵀ (B, Hkv, D, D) and Σ φ(k) (B, Hkv, D): runtime state, never saved
        self.register_buffer("state", None, persistent=False)
        self.register_buffer("normalizer", None, persistent=False)

    def setup_cache(self, max_batch_size, max_seq_len, dtype, device) -> None:
        # sums over the whole sequence lose too much in bf16: keep the state in fp32 at least
        dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        c = self.config
        self.state = torch.zeros(max_batch_size, c.n_kv_heads, c.head_dim, c.head_dim, dtype=dtype, device=device)
        self.normalizer = torch.zeros(max_batch_size, c.n_kv_heads, c.head_dim, dtype=dtype, device=device)

    def clear_cache(self) -> None:
        self.state = self.normalizer = None

    def forward(
        self, q, k, v, q_pos, k_pos, key_padding_mask=None, return_weights=False, input_pos=None, mode="causal"
    ):
        n_rep = q.size(1) // k.size(1)
        fq, fk, vf = self.phi(at_least_fp32(q)), self.phi(at_least_fp32(k)), at_least_fp32(v)
        if key_padding_mask is not None:
            fk = fk * key_padding_mask[:, None, :, None]  # padding keys add nothing to any sum
        if mode != "causal":
            return self._non_causal(q, fq, fk, vf, n_rep, return_weights)
        a = fq @ repeat_kv(fk, n_rep).transpose(-2, -1)  # (B, Hq, Tq, Tk)
        if q_pos.dim() == 2:  # a position per row (continuous batching): k_pos is then (B, Tk) too
            a = a * (k_pos[:, None, None, :] <= q_pos[:, None, :, None])
        else:
            a = a * (k_pos[None, :] <= q_pos[:, None])
        num, den = a @ repeat_kv(vf, n_rep), a.sum(-1, keepdim=True)
        if input_pos is not None and self.state is not None:
            if return_weights:
                raise ValueError("linear attention returns weights only for a forward without the cache")
            num, den = self._add_state(fq, fk, vf, input_pos, num, den, n_rep)
        out = (num / (den + self.eps)).to(q.dtype)
        return (out, (a / (den + self.eps)).to(q.dtype)) if return_weights else out

    def _non_causal(self, q: Tensor, fq: Tensor, fk: Tensor, vf: Tensor, n_rep: int, return_weights: bool):
        # the (D x D) sum first: O(T D^2), never the (Tq, Tk) matrix (unless the weights are asked for)
        fk, vf = repeat_kv(fk, n_rep), repeat_kv(vf, n_rep)
        den = fq @ fk.sum(2)[..., None]  # (B, H, Tq, 1)
        out = ((fq @ (fk.transpose(-2, -1) @ vf)) / (den + self.eps)).to(q.dtype)
        if not return_weights:
            return out
        return out, ((fq @ fk.transpose(-2, -1)) / (den + self.eps)).to(q.dtype)

    def _add_state(self, fq: Tensor, fk: Tensor, vf: Tensor, input_pos: Tensor, num, den, n_rep: int):
        b = fq.size(0)
        # a chunk at position 0 starts a new sequence (per row when every row has its own
        # positions); a tensor op, not an `if`, keeps the graph whole
        if input_pos.dim() == 2:
            keep = (input_pos[:, 0] > 0).to(self.state.dtype)
            s, z = self.state[:b] * keep.view(b, 1, 1, 1), self.normalizer[:b] * keep.view(b, 1, 1)
        else:
            keep = (input_pos[0] > 0).to(self.state.dtype)
            s, z = self.state[:b] * keep, self.normalizer[:b] * keep
        num = num + fq @ repeat_kv(s, n_rep).to(fq.dtype)
        den = den + (fq * repeat_kv(z, n_rep).to(fq.dtype)[:, :, None, :]).sum(-1, keepdim=True)
        self.state[:b].copy_(s + fk.transpose(-2, -1) @ vf)
        self.normalizer[:b].copy_(z + fk.sum(2))
        return num, den
