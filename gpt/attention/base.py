"""The attention contract's code: the Attention base class, the registry and the helpers variants share.

The contract itself is described in gpt/attention/__init__.py; variants import from here, so the
package's __init__ (which imports every built-in variant) is imported by nobody inside it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from gpt.errors import ConfigError
from gpt.kv_cache import KVCache

if TYPE_CHECKING:
    from gpt.config import ModelConfig

_REGISTRY: dict[str, type[Attention]] = {}

#: causal: decoder self-attention; bidirectional: encoder self-attention; cross: queries and keys
#: from two sequences, each with its own positions (k_pos indexes the source)
MODES = ("causal", "bidirectional", "cross")


class Attention(nn.Module):
    """Base class of the mixing step. Subclasses implement forward() per the contract above."""

    #: True when the variant keeps its own decode state instead of reading a growing KV cache.
    replaces_kv_cache: bool = False
    #: True when every head mixes only its own q, k, v (no parameter or step looks across heads or at
    #: the global head index), so tensor parallelism may give each rank a slice of the heads (gpt.tp).
    #: False by default: a plug-in must say so; the softmax skeleton and linear attention set True.
    head_local: bool = False
    #: the modes forward handles; the model refuses to build the variant for any other. A forward
    #: that is only ever causal needs no `mode` argument (it is passed only when not "causal").
    modes: tuple[str, ...] = ("causal",)

    def __init__(self, config: ModelConfig, **kwargs: Any) -> None:
        super().__init__()
        if kwargs:
            raise TypeError(
                f"attention {type(self).__name__} takes no attention_kwargs, got {', '.join(sorted(kwargs))}"
            )
        self.config = config
        self.kv_cache: KVCache | None = None  # allocated by setup_cache

    def setup_cache(
        self, max_batch_size: int, max_seq_len: int, dtype: torch.dtype, device: torch.device | str | None
    ) -> None:
        """Allocate the decode state: by default a static KV cache of max_seq_len slots.

        A variant with replaces_kv_cache=True keeps its own state instead and overrides this
        and clear_cache. attend then calls its forward with only this call's keys and values
        (k_pos == q_pos, the key-padding mask sliced to them) plus `input_pos=` (None for a
        forward without the cache), and the variant carries what decoding needs from one
        call to the next itself.
        """
        if self.replaces_kv_cache:
            raise NotImplementedError(f"{type(self).__name__} sets replaces_kv_cache but does not define setup_cache")
        c = self.config
        self.kv_cache = KVCache(max_batch_size, c.n_kv_heads, max_seq_len, c.head_dim, dtype, device)

    def clear_cache(self) -> None:
        """Drop the decode state allocated by setup_cache."""
        self.kv_cache = None

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        q_pos: Tensor,
        k_pos: Tensor,
        input_pos: Tensor | None,
        key_padding_mask: Tensor | None = None,
        return_weights: bool = False,
        mode: str = "causal",
    ) -> Tensor | tuple[Tensor, Tensor]:
        """What the model calls: keep the decode state for this call's k, v, then mix.

        k, v are this call's keys and values (B, Hkv, Tq, D); input_pos (Tq,) or (B, Tq) their
        cache slots, None for a forward without the cache; k_pos and key_padding_mask cover the
        keys forward will see (the whole cache once one is set up). Only causal calls decode
        through a cache: bidirectional and cross calls go straight to forward with `mode=`.
        """
        if mode != "causal":
            return self(q, k, v, q_pos, k_pos, key_padding_mask, return_weights, mode=mode)
        if self.replaces_kv_cache:
            if input_pos is not None and key_padding_mask is not None:
                if input_pos.dim() == 2:
                    key_padding_mask = key_padding_mask.gather(1, input_pos)
                else:
                    key_padding_mask = key_padding_mask[:, input_pos]
            return self(q, k, v, q_pos, q_pos, key_padding_mask, return_weights, input_pos=input_pos)
        if self.kv_cache is not None and input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
        return self(q, k, v, q_pos, k_pos, key_padding_mask, return_weights)

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        q_pos: Tensor,
        k_pos: Tensor,
        key_padding_mask: Tensor | None = None,
        return_weights: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        raise NotImplementedError


def register_attention(name: str) -> Callable[[type[Attention]], type[Attention]]:
    """Class decorator: make a variant available as ModelConfig(attention=name)."""

    def deco(cls: type[Attention]) -> type[Attention]:
        if not (isinstance(cls, type) and issubclass(cls, Attention)):
            raise TypeError(f"register_attention({name!r}) expects a subclass of gpt.attention.Attention")
        _REGISTRY[name] = cls
        return cls

    return deco


def available() -> list[str]:
    return sorted(_REGISTRY)


def get_attention(name: str) -> type[Attention]:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown attention {name!r}; available: {', '.join(available())}")
    return _REGISTRY[name]


def check_mode(cls: type[Attention], mode: str, name: str | None = None) -> None:
    """ConfigError unless the variant class claims `mode` (its `modes` class attribute)."""
    if mode not in MODES:
        raise ConfigError(f"unknown attention mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode not in cls.modes:
        raise ConfigError(
            f"attention {name or cls.__name__!r} does not support {mode} attention (it claims modes "
            f"{', '.join(cls.modes)}); choose another attention or add {mode!r} to its modes"
        )


def build_attention(config: ModelConfig, mode: str = "causal") -> Attention:
    """The variant of config.attention, for calls in `mode` (refused at build time if it does not claim it)."""
    cls = get_attention(config.attention)
    check_mode(cls, mode, config.attention)
    try:
        return cls(config, **config.attention_kwargs)
    except TypeError as e:
        raise ConfigError(
            f"attention {config.attention!r} rejected attention_kwargs {config.attention_kwargs}: {e}"
        ) from None


# -- helpers shared by variants --------------------------------------------------------


def causal_mask(q_pos: Tensor, k_pos: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
    """Boolean mask, True = may attend, shaped (1, 1, Tq, Tk) or (B, 1, Tq, Tk) with padding.

    q_pos is (Tq,), or (B, Tq) when every row has its own positions (then the mask is
    (B, 1, Tq, Tk)); k_pos is (Tk,), or (B, Tk) alongside a (B, Tq) q_pos.
    A query always sees its own slot, even a padding slot, so that no row is fully
    masked: softmax over an all-masked row is NaN, and NaN in pad rows would poison
    NaN checks even though no real token ever reads them.
    """
    if q_pos.dim() == 2:
        kp = k_pos[:, None, :] if k_pos.dim() == 2 else k_pos[None, None, :]
        allowed = kp <= q_pos[:, :, None]  # (B, Tq, Tk)
        if key_padding_mask is not None:
            allowed = (allowed & key_padding_mask[:, None, :]) | (kp == q_pos[:, :, None])
        return allowed[:, None]
    allowed = k_pos[None, :] <= q_pos[:, None]  # (Tq, Tk)
    if key_padding_mask is None:
        return allowed[None, None]
    same = k_pos[None, :] == q_pos[:, None]
    return ((allowed[None] & key_padding_mask[:, None, :]) | same[None])[:, None]


def attention_mask(
    q_pos: Tensor, k_pos: Tensor, key_padding_mask: Tensor | None = None, mode: str = "causal"
) -> Tensor | None:
    """causal_mask in causal mode; otherwise only the key padding, (B, 1, 1, Tk), or None without it.

    Bidirectional and cross rows hide no key but padding, so each row needs one real key.
    """
    if mode == "causal":
        return causal_mask(q_pos, k_pos, key_padding_mask)
    return None if key_padding_mask is None else key_padding_mask[:, None, None, :]


def at_least_fp32(x: Tensor) -> Tensor:
    """Upcast bf16/fp16 scores to fp32 for the softmax; leave fp64 alone (gradcheck runs in fp64)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """(B, Hkv, T, D) -> (B, Hkv*n_rep, T, D): kv head j serves query heads j*n_rep .. j*n_rep+n_rep-1."""
    if n_rep == 1:
        return x
    return x.repeat_interleave(n_rep, dim=1)
