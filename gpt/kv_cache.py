"""A static, preallocated KV cache: fixed shapes, so a compiled decode step is captured once."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class KVCache(nn.Module):
    """Keys and values of every layer position, (max_batch, n_kv_heads, max_seq_len, head_dim).

    Slots are written in place at `input_pos`; reads return the whole buffer, and the
    attention mask (k_pos <= q_pos) hides slots that are not written yet.
    """

    def __init__(
        self,
        max_batch_size: int,
        n_kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_len, head_dim)
        # non-persistent: a cache is runtime state, never part of a checkpoint
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, Hkv, T, D) at slots input_pos; return the full caches for batch B.

        input_pos (T,) puts every row's tokens in the same slots; (B, T) gives each row its own
        slots (continuous batching: rows are sequences of different lengths).
        """
        b = k.size(0)
        k_out, v_out = self.k_cache[:b], self.v_cache[:b]
        if input_pos.dim() == 2:
            # index_put_ on the buffer itself (not scatter_): inductor stores in place, where a
            # compiled scatter_ copied the whole cache every step
            rows = torch.arange(b, device=k.device).view(b, 1, 1)
            heads = torch.arange(k.size(1), device=k.device).view(1, -1, 1)
            index = (rows, heads, input_pos[:, None, :])
            k_out.index_put_(index, k.to(k_out.dtype))
            v_out.index_put_(index, v.to(v_out.dtype))
        else:
            k_out.index_copy_(2, input_pos, k.to(k_out.dtype))
            v_out.index_copy_(2, input_pos, v.to(v_out.dtype))
        return k_out, v_out
