"""Variants written as FlexAttention-style score_mod / mask_mod functions.

    score_mod(score, b, h, q_idx, kv_idx) -> score   change a pre-softmax score
    mask_mod(b, h, q_idx, kv_idx) -> bool            False hides the key from the query

They are the hooks of the softmax skeleton (gpt.attention.softmax), which says what q_idx and
kv_idx are and how to write a mod. A variant made of mods alone runs two ways:
- "flex": torch.nn.attention.flex_attention. Compiled, about as fast as SDPA on a CPU, but
  it has no backward there; eager it is several times slower.
- "dense": materialise the scores (or only the boolean mask) for the positions at hand and
  use SDPA or the written-out path. Differentiable everywhere.
backend="auto" (the default) picks flex inside torch.compile when no gradient is needed
(the compiled decode step) and dense otherwise (training, eager evaluation).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from gpt.attention.base import register_attention
from gpt.attention.softmax import SoftmaxAttention

ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]
MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
BACKENDS = ("auto", "flex", "dense")


class ModAttention(SoftmaxAttention):
    """Softmax attention changed by `score_mod` and/or `mask_mod`, with a choice of backend."""

    def __init__(self, config, backend: str = "auto", **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        if backend not in BACKENDS:
            raise TypeError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}")
        if backend == "flex" and not self.only_mods:
            raise TypeError(f"backend='flex' runs only score_mod / mask_mod; {type(self).__name__} changes more")
        self.backend = backend


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
