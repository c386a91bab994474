"""A LLaMA-style decoder: pre-norm blocks of (pluggable) attention and a SwiGLU feed-forward.

Read top to bottom: norms and positional encodings, the feed-forward, the attention layer
(projections + positional encoding around a registered mixing step, which also keeps the
KV cache), the block, and the Transformer that stacks them.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpt.attention import build_attention
from gpt.config import ModelConfig
from gpt.errors import ConfigError
from gpt.kv_cache import KVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # normalise in fp32: the mean of squares underflows / loses precision in bf16
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


# -- positional encodings ---------------------------------------------------------------


def rope_tables(head_dim: int, max_seq_len: int, base: float) -> tuple[Tensor, Tensor]:
    """cos and sin, (max_seq_len, head_dim), in the half-split ("rotate_half") layout.

    This is the layout of Hugging Face LLaMA checkpoints, so their q/k weights load
    without a permutation.
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, H, T, D); cos/sin (T, D) or (B, T, D) already gathered at the token positions."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def sinusoidal_table(max_seq_len: int, dim: int) -> Tensor:
    """The original Transformer's fixed table: sin on even channels, cos on odd ones."""
    pos = torch.arange(max_seq_len, dtype=torch.float64)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
    table = torch.zeros(max_seq_len, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div)[:, : dim // 2]
    return table.float()


# -- layers --------------------------------------------------------------------------------


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.intermediate_size, bias=False)
        self.w3 = nn.Linear(config.dim, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class SelfAttention(nn.Module):
    """Projections and RoPE around a registered mixing step (config.attention), which keeps the KV cache.

    mode: "causal" (decoder) or "bidirectional" (encoder); a variant that does not claim it is
    refused here, at build time.
    """

    def __init__(self, config: ModelConfig, mode: str = "causal") -> None:
        super().__init__()
        self.mode = mode
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.wq = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)
        # The variant draws its initial values from a fork of the generator, so it cannot shift
        # the draws of the shared layers: every variant starts from the same shared weights.
        with torch.random.fork_rng(devices=[]):
            self.mix = build_attention(config, mode)

    @property
    def kv_cache(self) -> KVCache | None:
        """The static KV cache of the mixing step (None without setup_caches, or for a stateful variant)."""
        return self.mix.kv_cache

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The query, key and value projections of x (b, t, dim), each (b, t, features)."""
        return self.wq(x), self.wk(x), self.wv(x)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None,
        q_pos: Tensor,
        k_pos: Tensor,
        input_pos: Tensor | None,
        key_padding_mask: Tensor | None,
        return_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        b, t, _ = x.shape
        q, k, v = self.project(x)
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = self.mix.attend(q, k, v, q_pos, k_pos, input_pos, key_padding_mask, return_weights, self.mode)
        weights = None
        if return_weights:
            out, weights = out
        out = out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)
        return self.wo(out), weights


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = SelfAttention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, *attn_args, return_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        a, weights = self.attention(self.attention_norm(x), *attn_args, return_weights=return_weights)
        x = x + self.dropout(a)
        x = x + self.dropout(self.feed_forward(self.ffn_norm(x)))
        return x, weights


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        if config.pos_encoding == "learned":
            self.pos_embeddings = nn.Embedding(config.max_seq_len, config.dim)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self._cache_len: int | None = None  # set by setup_caches
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # runtime tables: recomputed from the config, never saved
        self.register_buffer("pos_ids", torch.arange(config.max_seq_len), persistent=False)
        if config.pos_encoding == "rope":
            cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        elif config.pos_encoding == "sinusoidal":
            self.register_buffer("sin_table", sinusoidal_table(config.max_seq_len, config.dim), persistent=False)
        self.reset_parameters()

    # -- initialisation and bookkeeping --------------------------------------------------
    def reset_parameters(self) -> None:
        """LLaMA / GPT-2 init: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layers).

        An attention variant's own parameters keep the values its constructor gave them.
        """
        for name, p in self.named_parameters():
            if ".mix." in name:
                continue
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.config.n_layers))
            elif p.dim() >= 2:
                nn.init.normal_(p, std=0.02)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a tied weight once
        if exclude_embeddings:
            n -= self.tok_embeddings.weight.numel() if not self.config.tie_embeddings else 0
            if self.config.pos_encoding == "learned":
                n -= self.pos_embeddings.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> float:
        """Matmul FLOPs per token (PaLM appendix B): 2 per weight, plus attention's q·k and w·v.

        Training is 3× the forward (backward costs two forwards). Used for MFU.
        """
        c = self.config
        t = seq_len or c.max_seq_len
        matmul_params = self.num_params(exclude_embeddings=True) - self._norm_params()
        fwd = 2 * matmul_params + 2 * 2 * c.n_layers * c.n_heads * c.head_dim * t
        return 3 * fwd if training else fwd

    def _norm_params(self) -> int:
        return sum(m.weight.numel() for m in self.modules() if isinstance(m, RMSNorm))

    # -- caches ---------------------------------------------------------------------------
    def setup_caches(
        self,
        max_batch_size: int,
        max_seq_len: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """Preallocate every layer's decode state (for prefill + decode): a static KV cache by default."""
        max_seq_len = max_seq_len or self.config.max_seq_len
        if max_seq_len > self.config.max_seq_len:
            raise ValueError(f"max_seq_len={max_seq_len} exceeds the model's max_seq_len={self.config.max_seq_len}")
        # the final norm's weight is float in every model (the lm head may be quantized)
        dtype = dtype or self.norm.weight.dtype
        device = device or self.pos_ids.device
        for layer in self.layers:
            layer.attention.mix.setup_cache(max_batch_size, max_seq_len, dtype, device)
        self._cache_len = max_seq_len

    def clear_caches(self) -> None:
        for layer in self.layers:
            layer.attention.mix.clear_cache()
        self._cache_len = None

    @property
    def cache_len(self) -> int | None:
        return self._cache_len

    # -- length extrapolation -------------------------------------------------------------
    def extend_context(self, max_seq_len: int) -> None:
        """Run on sequences up to max_seq_len, past the length the model was built for.

        The runtime tables (pos_ids, RoPE, sinusoidal) are recomputed for the longer length;
        they agree exactly with the old ones on the old positions, so logits there do not
        change. Attention variants keep what they computed from the built length (sigmoid's
        -log(n) bias): only the positional tables grow. A shorter length changes nothing.
        """
        old = self.config.max_seq_len
        if max_seq_len <= old:
            return
        if self.config.pos_encoding == "learned":
            raise ConfigError(
                f"pos_encoding=learned has trained embeddings for positions 0..{old - 1} only and cannot "
                f"extrapolate to {max_seq_len}; evaluate at {old} tokens or fewer"
            )
        c = self.config = dataclasses.replace(self.config, max_seq_len=max_seq_len)
        device = self.pos_ids.device
        self.pos_ids = torch.arange(max_seq_len, device=device)
        if c.pos_encoding == "rope":
            cos, sin = rope_tables(c.head_dim, max_seq_len, c.rope_base)
            self.rope_cos = cos.to(device=device, dtype=self.rope_cos.dtype)
            self.rope_sin = sin.to(device=device, dtype=self.rope_sin.dtype)
        elif c.pos_encoding == "sinusoidal":
            self.sin_table = sinusoidal_table(max_seq_len, c.dim).to(device=device, dtype=self.sin_table.dtype)

    # -- forward --------------------------------------------------------------------------
    def forward(
        self,
        idx: Tensor,
        input_pos: Tensor | None = None,
        targets: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        pos_offset: Tensor | None = None,
        return_weights: bool = False,
        last_only: bool = False,
    ):
        """Logits (B, T, vocab); (logits, loss) when targets are given.

        idx               (B, T) token ids
        input_pos         (T,) slots of these tokens in the KV cache, shared by every row; or
                          (B, T), a row of slots per sequence (continuous batching: the cache
                          write, the positional encoding and the mask then follow each row);
                          None = a full forward over positions 0..T-1 without the cache
        key_padding_mask  (B, Tk) True for real tokens (Tk = cache length, or T without cache)
        pos_offset        (B,) left-padding per row: token positions are slot - pos_offset
        return_weights    also return the attention weights of every layer (a list)
        last_only         logits of the last position only, (B, 1, vocab): what a prefill needs,
                          without projecting every prompt token onto the vocabulary
        """
        b, t = idx.shape
        if input_pos is None:
            if t > self.config.max_seq_len:
                raise ValueError(f"sequence length {t} exceeds max_seq_len={self.config.max_seq_len}")
            q_pos = k_pos = self.pos_ids[:t]  # the same tensor: attention may take the causal fast path
        else:
            q_pos = input_pos
            cache_len = self.cache_len
            k_pos = self.pos_ids[:cache_len] if cache_len is not None else input_pos
        if pos_offset is None:
            tok_pos = q_pos  # (T,) or (B, T)
        else:
            tok_pos = (q_pos if q_pos.dim() == 2 else q_pos[None, :]) - pos_offset[:, None]
            tok_pos = tok_pos.clamp(min=0)

        x = self.tok_embeddings(idx)
        rope = None
        if self.config.pos_encoding == "rope":
            rope = (self.rope_cos[tok_pos], self.rope_sin[tok_pos])
        elif self.config.pos_encoding == "sinusoidal":
            x = x + self.sin_table[tok_pos].to(x.dtype)
        elif self.config.pos_encoding == "learned":
            x = x + self.pos_embeddings(tok_pos)
        x = self.dropout(x)

        all_weights = []
        for layer in self.layers:
            x, w = layer(x, rope, q_pos, k_pos, input_pos, key_padding_mask, return_weights=return_weights)
            all_weights.append(w)
        if last_only:
            x = x[:, -1:]
        logits = self.output(self.norm(x))

        out = logits
        if targets is not None:
            loss = F.cross_entropy(
                logits.float().view(-1, logits.size(-1)),
                targets.reshape(-1),
                ignore_index=-100,
                label_smoothing=self.config.label_smoothing,
            )
            out = (logits, loss)
        if return_weights:
            return out, all_weights
        return out
