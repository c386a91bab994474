"""Pluggable attention: a registry of mixing modules and the contract they follow.

The model owns the projections (wq/wk/wv/wo) and the positional encoding; a variant owns
the mixing step and the decode state it reads (by default a static KV cache):

    out = variant(q, k, v, q_pos, k_pos, key_padding_mask=None, return_weights=False)

    q               (B, Hq, Tq, D)   after RoPE
    k, v            (B, Hkv, Tk, D)  after RoPE and after the cache update (Hq % Hkv == 0)
    q_pos           (Tq,) long       slot index of each query in the sequence / cache;
                    or (B, Tq)       one row of slots per sequence (continuous batching)
    k_pos           (Tk,) long       slot index of each key; with a static cache this is
                                     arange(max_seq_len) and unfilled slots lie in the future
    key_padding_mask (B, Tk) bool or None   True where the key is a real token
    returns         (B, Hq, Tq, D), or (out, weights (B, Hq, Tq, Tk)) with return_weights=True

    out = variant(q, k, v, q_pos, k_pos, key_padding_mask, return_weights, mode="bidirectional")

The mask is part of the call: `mode` says which of the three kinds of attention it is.
    "causal"         decoder self-attention: a query sees keys at k_pos <= q_pos (the default,
                     and then `mode` is not passed at all, so a causal-only forward needs no
                     such argument)
    "bidirectional"  encoder self-attention: every real key (key_padding_mask) is visible
    "cross"          queries from one sequence, keys/values from another (gpt.attention.cross):
                     q_pos and k_pos index two different sequences; only the source's
                     key_padding_mask hides keys
A variant lists the modes it handles in the class attribute `modes` (Attention: ("causal",);
the softmax skeleton and linear attention: all three, MODES), and the model refuses at build
time, in one line, to use it in any other (build_attention(config, mode)). Only causal calls
decode through a cache; bidirectional and cross calls are full forwards.

A new variant is a subclass of `Attention` registered by name:

    @register_attention("my_attn")
    class MyAttention(Attention):
        def forward(self, q, k, v, q_pos, k_pos, key_padding_mask=None, return_weights=False):
            ...

and is chosen by ModelConfig(attention="my_attn", attention_kwargs={...}); the kwargs are
passed to the constructor after the model config. A variant initialises its own parameters
in its constructor (the model's init leaves them alone and draws the shared weights the same
way for every variant). resolve_attention("file.py:NAME") loads a user's variant from a file
or module (gpt/attention/plugin.py); gpt/attention/check.py (`python scripts/check_attention.py
NAME`) tells whether a variant keeps this contract.

Softmax-style variants need not write forward: gpt/attention/softmax.py is one skeleton,
scores -> mask -> weights -> mix, and a variant overrides only the step it changes:
score_mod / mask_mod (FlexAttention's signatures; gpt.attention.flex.ModAttention adds the
choice of backend, register_mods builds one from plain functions), normalize (the softmax),
weights (how q and k make the weights) or combine (how the weights mix the values).

The model calls `variant.attend(q, k, v, q_pos, k_pos, input_pos, key_padding_mask,
return_weights)`, which keeps the decode state and then calls forward. By default
setup_cache allocates a static KVCache that attend writes at input_pos. A variant that
decodes from its own state instead (linear attention) sets replaces_kv_cache = True and
implements setup_cache / clear_cache; see Attention.setup_cache.
"""

# Built-in variants register themselves on import.
from gpt.attention import alibi, dense, differential, linear, sigmoid, sinks, sliding_window, softcap  # noqa: E402,F401,I001
from gpt.attention.base import (  # noqa: F401  (_REGISTRY: for tests that register and clean up)
    _REGISTRY,
    MODES,
    Attention,
    at_least_fp32,
    attention_mask,
    available,
    build_attention,
    causal_mask,
    check_mode,
    get_attention,
    register_attention,
    repeat_kv,
)
from gpt.attention.plugin import attention_source, resolve_attention  # noqa: E402

__all__ = [
    "MODES",
    "Attention",
    "at_least_fp32",
    "attention_mask",
    "attention_source",
    "available",
    "build_attention",
    "causal_mask",
    "check_mode",
    "get_attention",
    "register_attention",
    "repeat_kv",
    "resolve_attention",
]
