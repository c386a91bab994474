"""Model configuration: one dataclass, named presets, JSON round trip."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt.errors import ConfigError

POS_ENCODINGS = ("rope", "sinusoidal", "learned", "none")
ARCHS = ("decoder", "encoder", "seq2seq")
NORM_POSITIONS = ("pre", "post")
FFNS = ("swiglu", "relu")


def llama_intermediate_size(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """LLaMA's SwiGLU width: 2/3 of 4*dim (so SwiGLU costs what a 4*dim MLP costs), rounded up."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    dim: int = field(default=288, metadata={"help": "model width"})
    n_layers: int = field(default=6, metadata={"help": "number of blocks"})
    n_heads: int = field(default=6, metadata={"help": "query heads"})
    n_kv_heads: int | None = field(
        default=None, metadata={"help": "key/value heads: n_heads = MHA, 1 = MQA, in between = GQA"}
    )
    head_dim: int | None = field(default=None, metadata={"help": "per-head width (default: dim / n_heads)"})
    intermediate_size: int | None = field(
        default=None, metadata={"help": "SwiGLU width (default: LLaMA's rule from dim)"}
    )
    norm_eps: float = field(default=1e-5, metadata={"help": "RMSNorm epsilon"})
    rope_base: float = field(default=10000.0, metadata={"help": "RoPE theta"})
    max_seq_len: int = field(default=256, metadata={"help": "the model's context length"})
    tie_embeddings: bool = field(
        default=False, metadata={"help": "share the embedding and output matrices (true/false)"}
    )
    dropout: float = field(default=0.0, metadata={"help": "dropout probability"})
    attention: str = field(
        default="sdpa",
        metadata={
            "help": "attention variant: a registered name (gpt.attention.available()), "
            "or a plug-in path/to/file.py:NAME or package.module:NAME"
        },
    )
    attention_kwargs: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "JSON object of keyword arguments for the attention variant"}
    )
    pos_encoding: str = field(default="rope", metadata={"help": "rope | sinusoidal | learned | none"})
    arch: str = field(
        default="decoder",
        metadata={
            "help": "decoder (causal LM) | encoder (BERT-style masked LM) | seq2seq (encoder-decoder, "
            "the original Transformer); encoder and seq2seq add 4 special tokens to the vocabulary"
        },
    )
    n_encoder_layers: int | None = field(
        default=None, metadata={"help": "seq2seq: encoder blocks (default: n_layers, which counts the decoder's)"}
    )
    norm_position: str = field(
        default="pre",
        metadata={"help": "encoder/seq2seq: pre (x + f(norm(x))) | post (norm(x + f(x)), the original Add & Norm)"},
    )
    ffn: str = field(
        default="swiglu", metadata={"help": "encoder/seq2seq feed-forward: swiglu | relu (the original's)"}
    )
    label_smoothing: float = field(
        default=0.0, metadata={"help": "label smoothing of the training loss (the original Transformer: 0.1)"}
    )

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.n_heads > 0 and self.dim % self.n_heads != 0:
                raise ConfigError(
                    f"dim={self.dim} is not divisible by n_heads={self.n_heads}; "
                    "choose dim as a multiple of n_heads (or set head_dim explicitly)"
                )
            self.head_dim = self.dim // max(self.n_heads, 1)
        if self.intermediate_size is None:
            self.intermediate_size = llama_intermediate_size(self.dim)
        self.validate()

    def validate(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "max_seq_len"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be a positive integer")
        if self.n_heads % self.n_kv_heads != 0:
            raise ConfigError(
                f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}; "
                "n_kv_heads must divide n_heads (n_kv_heads=n_heads is MHA, 1 is MQA)"
            )
        if self.pos_encoding not in POS_ENCODINGS:
            raise ConfigError(f"unknown pos_encoding {self.pos_encoding!r}; choose one of {', '.join(POS_ENCODINGS)}")
        if self.pos_encoding == "rope" and self.head_dim % 2 != 0:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rope")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout} must be in [0, 1)")
        for name, allowed in (("arch", ARCHS), ("norm_position", NORM_POSITIONS), ("ffn", FFNS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"unknown {name} {getattr(self, name)!r}; choose one of {', '.join(allowed)}")
        if self.arch == "decoder" and (self.norm_position, self.ffn) != ("pre", "swiglu"):
            raise ConfigError(
                "norm_position and ffn choose the encoder/seq2seq blocks; the decoder is pre-norm SwiGLU "
                "(set arch to encoder or seq2seq, or drop them)"
            )
        if self.n_encoder_layers is not None and int(self.n_encoder_layers) <= 0:
            raise ConfigError(f"n_encoder_layers={self.n_encoder_layers} must be a positive integer")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing={self.label_smoothing} must be in [0, 1)")
        if not isinstance(self.attention_kwargs, dict):
            raise ConfigError("attention_kwargs must be a JSON object (a dict)")
        if not isinstance(self.attention, str) or not self.attention:
            raise ConfigError("attention must be the name of a registered variant (gpt.attention.available())")
        # whether the name is registered is the registry's question (gpt.attention.build_attention)

    # -- serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s) {', '.join(unknown)}; known fields: {', '.join(sorted(known))}")
        return cls(**d)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        try:
            d = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON ({e}); fix or regenerate it") from None
        return cls.from_dict(d)


# Named shapes. Vocabulary sizes of char models are set from the tokenizer at training time.
PRESETS: dict[str, dict[str, Any]] = {
    # for tests: builds and runs in milliseconds
    "tiny": dict(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64),
    # the embedded default: char-level Shakespeare, 3.4M parameters, sized so that `python train_ddp.py`
    # beats nanoGPT's CPU baseline in ~5 minutes on 2 cores (nanoGPT's 10.7M shape is ~3x slower per token)
    "shakespeare-char": dict(vocab_size=96, dim=256, n_layers=4, n_heads=4, max_seq_len=256, dropout=0.0),
    # nanoGPT's shakespeare_char shape (10.7M): better loss, but ~3x the compute of the default; for a GPU
    "shakespeare-char-large": dict(vocab_size=96, dim=384, n_layers=6, n_heads=6, max_seq_len=256),
    # Karpathy's llama2.c TinyStories models
    "stories15M": dict(
        vocab_size=32000, dim=288, n_layers=6, n_heads=6, max_seq_len=256, intermediate_size=768, tie_embeddings=True
    ),
    "stories110M": dict(
        vocab_size=32000,
        dim=768,
        n_layers=12,
        n_heads=12,
        max_seq_len=1024,
        intermediate_size=2048,
        tie_embeddings=True,
    ),
    # full-size shapes for conversion and memory estimates
    "llama-2-7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, max_seq_len=4096, intermediate_size=11008),
    "llama-3-8b": dict(
        vocab_size=128256,
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        max_seq_len=8192,
        intermediate_size=14336,
        rope_base=500000.0,
    ),
}


def from_preset(name: str, **overrides: Any) -> ModelConfig:
    """Build a config from a named preset; keyword overrides win (None values are ignored)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    d = dict(PRESETS[name])
    overrides = {k: v for k, v in overrides.items() if v is not None}
    # derived widths follow the new shape unless given: the SwiGLU width depends on dim only,
    # the head width on dim and n_heads
    derived_from = {"intermediate_size": ("dim",), "head_dim": ("dim", "n_heads")}
    for derived, inputs in derived_from.items():
        if derived not in overrides and any(k in overrides for k in inputs):
            d.pop(derived, None)
    d.update(overrides)
    return ModelConfig.from_dict(d)
