"""An encoder-only Transformer (BERT-style masked language model) from the decoder's parts.

The same RMSNorm, SelfAttention (any registered variant, called in "bidirectional" mode: every
real token sees every other) and positional encodings as gpt/model.py; the blocks are pre-norm
(x + f(norm(x))) or post-norm (norm(x + f(x)), the original Add & Norm), with a SwiGLU or ReLU
feed-forward (ModelConfig.norm_position, .ffn). The pieces here are shared with the
encoder-decoder (gpt/seq2seq.py).

Masked-LM training (Devlin et al., 2019): 15% of the tokens are chosen; of those 80% become
<mask>, 10% a random token, 10% stay; the loss is on the chosen tokens only (mlm_mask).
Special tokens are appended to the tokenizer's vocabulary: the last 4 ids are
<pad> <bos> <eos> <mask> (special_ids), so vocab_size = tokenizer's + 4.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpt.config import ModelConfig
from gpt.model import FeedForward, RMSNorm, SelfAttention, rope_tables, sinusoidal_table

SPECIALS = ("pad", "bos", "eos", "mask")


@dataclass(frozen=True)
class SpecialIds:
    pad: int
    bos: int
    eos: int
    mask: int


def special_ids(config: ModelConfig) -> SpecialIds:
    """The ids of <pad> <bos> <eos> <mask>: the last len(SPECIALS) of the vocabulary."""
    first = config.vocab_size - len(SPECIALS)
    return SpecialIds(*(first + i for i in range(len(SPECIALS))))


# -- parts -------------------------------------------------------------------------------------


class ReLUFeedForward(nn.Module):
    """The original Transformer's position-wise feed-forward: w2(dropout(relu(w1 x)))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.dim, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(self.dropout(F.relu(self.w1(x))))


def make_ffn(config: ModelConfig) -> nn.Module:
    return ReLUFeedForward(config) if config.ffn == "relu" else FeedForward(config)


class Sublayer(nn.Module):
    """A residual around f with its norm: pre x + drop(f(norm(x))), or post norm(x + drop(f(x)))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.post = config.norm_position == "post"
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, f) -> Tensor:
        if self.post:
            return self.norm(x + self.dropout(f(x)))
        return x + self.dropout(f(self.norm(x)))


class Positions(nn.Module):
    """Token embeddings plus the configured positional encoding (rope is returned for attention)."""

    def __init__(self, config: ModelConfig, scale: bool = False) -> None:
        super().__init__()
        self.config = config
        # the original Transformer multiplies the (shared) embeddings by sqrt(dim)
        self.scale = math.sqrt(config.dim) if scale else 1.0
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        if config.pos_encoding == "learned":
            self.pos_embeddings = nn.Embedding(config.max_seq_len, config.dim)
        self.dropout = nn.Dropout(config.dropout)
        # runtime tables: recomputed from the config, never saved
        self.register_buffer("pos_ids", torch.arange(config.max_seq_len), persistent=False)
        if config.pos_encoding == "rope":
            cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        elif config.pos_encoding == "sinusoidal":
            self.register_buffer("sin_table", sinusoidal_table(config.max_seq_len, config.dim), persistent=False)

    def forward(self, idx: Tensor, pos: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """idx (B, T) at positions pos (T,) -> embeddings (B, T, dim) and the rope tables (or None)."""
        if idx.size(1) > self.config.max_seq_len:
            raise ValueError(f"sequence length {idx.size(1)} exceeds max_seq_len={self.config.max_seq_len}")
        x = self.tok_embeddings(idx) * self.scale
        rope = None
        if self.config.pos_encoding == "rope":
            rope = (self.rope_cos[pos], self.rope_sin[pos])
        elif self.config.pos_encoding == "sinusoidal":
            x = x + self.sin_table[pos].to(x.dtype)
        elif self.config.pos_encoding == "learned":
            x = x + self.pos_embeddings(pos)
        return self.dropout(x), rope


def init_weights(model: nn.Module, n_layers: int) -> None:
    """As gpt.model.Transformer: N(0, 0.02), residual projections by 1/sqrt(2 n_layers), norms 1;
    an attention variant's own parameters keep their constructor's values."""
    for name, p in model.named_parameters():
        if ".mix." in name:
            continue
        if name.endswith("norm.weight"):
            nn.init.ones_(p)
        elif name.endswith(("wo.weight", "w2.weight")):
            nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layers))
        elif p.dim() >= 2:
            nn.init.normal_(p, std=0.02)


def lm_loss(logits: Tensor, targets: Tensor, config: ModelConfig) -> Tensor:
    """Mean cross-entropy over the targets that are not -100, with the config's label smoothing."""
    return F.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, label_smoothing=config.label_smoothing
    )


class EncoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attention = SelfAttention(config, mode="bidirectional")
        self.attention_sub = Sublayer(config)
        self.feed_forward = make_ffn(config)
        self.ffn_sub = Sublayer(config)

    def forward(self, x: Tensor, rope, pos: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        x = self.attention_sub(x, lambda h: self.attention(h, rope, pos, pos, None, key_padding_mask)[0])
        return self.ffn_sub(x, self.feed_forward)


class EncoderStack(nn.Module):
    """n bidirectional blocks; pre-norm stacks end with a norm (post-norm ones are normed already)."""

    def __init__(self, config: ModelConfig, n_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps) if config.norm_position == "pre" else nn.Identity()

    def forward(self, x: Tensor, rope, pos: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        for layer in self.layers:
            x = layer(x, rope, pos, key_padding_mask)
        return self.norm(x)


# -- the model ---------------------------------------------------------------------------------


class MaskedLM(nn.Module):
    """arch="encoder": embeddings, bidirectional blocks, an LM head over every position."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = Positions(config)
        self.encoder = EncoderStack(config, config.n_layers)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.embed.tok_embeddings.weight
        init_weights(self, config.n_layers)

    @property
    def tok_embeddings(self) -> nn.Embedding:
        return self.embed.tok_embeddings

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> float:
        """2 per matmul weight plus attention's q·k and w·v (as Transformer.flops_per_token)."""
        c = self.config
        t = seq_len or c.max_seq_len
        fwd = 2 * (self.num_params() - c.vocab_size * c.dim) + 4 * c.n_layers * c.n_heads * c.head_dim * t
        return 3 * fwd if training else fwd

    def forward(
        self, idx: Tensor, targets: Tensor | None = None, key_padding_mask: Tensor | None = None
    ) -> Tensor | tuple[Tensor, Tensor]:
        """idx (B, T) -> logits (B, T, vocab); (logits, loss) with targets (-100 = no loss there).
        key_padding_mask (B, T): True for real tokens; padding changes no real token's output."""
        pos = self.embed.pos_ids[: idx.size(1)]
        x, rope = self.embed(idx, pos)
        logits = self.output(self.encoder(x, rope, pos, key_padding_mask))
        if targets is None:
            return logits
        return logits, lm_loss(logits, targets, self.config)


def mlm_mask(
    idx: Tensor,
    config: ModelConfig,
    generator: torch.Generator | None = None,
    rate: float = 0.15,
    n_real: int | None = None,
) -> tuple[Tensor, Tensor]:
    """BERT masking: (inputs, targets). `rate` of the tokens are chosen (at least one per row);
    80% of them become <mask>, 10% a random real token, 10% stay; targets hold the original
    token where chosen and -100 elsewhere. n_real: the tokenizer's vocabulary (default: all
    but the specials), from which random replacements are drawn. Deterministic given `generator`."""
    n_real = n_real or config.vocab_size - len(SPECIALS)
    b, t = idx.shape
    u = torch.rand(b, t, generator=generator)
    chosen = u < rate
    chosen[torch.arange(b), u.argmin(1)] = True  # every row trains on something
    action = torch.rand(b, t, generator=generator)
    random_tok = torch.randint(n_real, (b, t), generator=generator)
    idx_cpu = idx.cpu()
    inputs = torch.where(chosen & (action < 0.8), special_ids(config).mask, idx_cpu)
    inputs = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_tok, inputs)
    targets = torch.where(chosen, idx_cpu, -100)
    return inputs.to(idx.device), targets.to(idx.device)


@torch.no_grad()
def masked_accuracy(model: MaskedLM, inputs: Tensor, targets: Tensor) -> tuple[int, int]:
    """(correct, total) argmax predictions at the positions with a target."""
    logits = model(inputs)
    where = targets != -100
    return int((logits.argmax(-1)[where] == targets[where]).sum()), int(where.sum())
