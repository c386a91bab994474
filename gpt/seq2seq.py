"""An encoder-decoder Transformer (Vaswani et al., 2017) from the same parts as the decoder.

    encoder  bidirectional self-attention blocks over the source (gpt.encoder.EncoderStack)
    decoder  blocks of causal self-attention, cross-attention into the encoder's output
             (gpt.attention.cross.CrossAttention, "cross" mode) and a feed-forward
    shared   one embedding matrix for source, target and (tie_embeddings) the output layer,
             scaled by sqrt(dim) as in the paper; post- or pre-norm, ReLU or SwiGLU, dropout
             and label smoothing as ModelConfig says

Greedy decoding keeps a static KV cache for the decoder's self-attention (the variant's
setup_cache, as the decoder-only model) and the encoder's keys and values for every
cross-attention layer, computed once per source into static buffers (setup_caches, start),
so the one-token step has fixed shapes and compiles like the decoder's (greedy).
Sequences: the target starts with <bos> and ends with <eos>; pads are <pad> (gpt.encoder.special_ids).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gpt.attention.cross import CrossAttention
from gpt.config import ModelConfig
from gpt.encoder import EncoderStack, Positions, Sublayer, init_weights, lm_loss, make_ffn, special_ids
from gpt.model import RMSNorm, SelfAttention


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attention = SelfAttention(config, mode="causal")
        self.attention_sub = Sublayer(config)
        self.cross = CrossAttention(config)
        self.cross_sub = Sublayer(config)
        self.feed_forward = make_ffn(config)
        self.ffn_sub = Sublayer(config)
        # the source's keys/values and mask for cached decoding (setup_caches / start): runtime state
        self.register_buffer("source_k", None, persistent=False)
        self.register_buffer("source_v", None, persistent=False)
        self.register_buffer("source_mask", None, persistent=False)

    def forward(self, x, rope, q_pos, k_pos, input_pos, memory, memory_mask) -> Tensor:
        x = self.attention_sub(x, lambda h: self.attention(h, rope, q_pos, k_pos, input_pos, None)[0])
        if memory is None:  # cached decoding: the source's K/V were computed once by start()
            kv, memory_mask = (self.source_k, self.source_v), self.source_mask
            x = self.cross_sub(x, lambda h: self.cross(h, source_mask=memory_mask, kv=kv))
        else:
            x = self.cross_sub(x, lambda h: self.cross(h, memory, memory_mask))
        return self.ffn_sub(x, self.feed_forward)


class EncoderDecoder(nn.Module):
    """arch="seq2seq". forward(src, tgt) for training; start + step (or greedy) to decode."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = Positions(config, scale=True)  # shared by source and target
        n_enc = config.n_encoder_layers or config.n_layers
        self.encoder = EncoderStack(config, n_enc)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps) if config.norm_position == "pre" else nn.Identity()
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.embed.tok_embeddings.weight
        self._cache_len: int | None = None
        init_weights(self, n_enc + config.n_layers)

    @property
    def tok_embeddings(self) -> nn.Embedding:
        return self.embed.tok_embeddings

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> float:
        """Per target token with a source as long: 2 per matmul weight plus the three attentions' products."""
        c = self.config
        t = seq_len or c.max_seq_len
        n_attn = (c.n_encoder_layers or c.n_layers) + 2 * c.n_layers
        fwd = 2 * (self.num_params() - c.vocab_size * c.dim) + 4 * n_attn * c.n_heads * c.head_dim * t
        return 3 * fwd if training else fwd

    # -- training forward ---------------------------------------------------------------------
    def encode(self, src: Tensor, src_mask: Tensor | None = None) -> Tensor:
        """src (B, S) -> the encoder's output (B, S, dim); src_mask (B, S) True for real tokens."""
        pos = self.embed.pos_ids[: src.size(1)]
        x, rope = self.embed(src, pos)
        return self.encoder(x, rope, pos, src_mask)

    def decode(
        self, tgt: Tensor, memory: Tensor | None, memory_mask: Tensor | None, input_pos: Tensor | None = None
    ) -> Tensor:
        """Logits for tgt (B, T): without input_pos a full causal forward over positions 0..T-1 against
        `memory`; with input_pos (T,) the tokens at those cache slots, against the started source."""
        if input_pos is None:
            q_pos = k_pos = self.embed.pos_ids[: tgt.size(1)]  # one tensor: the causal fast path
        else:
            q_pos, k_pos = input_pos, self.embed.pos_ids[: self._cache_len]
        x, rope = self.embed(tgt, q_pos)
        for layer in self.layers:
            x = layer(x, rope, q_pos, k_pos, input_pos, memory, memory_mask)
        return self.output(self.norm(x))

    def forward(
        self, src: Tensor, tgt: Tensor, targets: Tensor | None = None, src_mask: Tensor | None = None
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Teacher forcing: logits (B, T, vocab) of tgt given src; (logits, loss) with targets (-100 = none).
        Right-padded targets need no mask: causal attention never reads a later pad."""
        logits = self.decode(tgt, self.encode(src, src_mask), src_mask)
        if targets is None:
            return logits
        return logits, lm_loss(logits, targets, self.config)

    # -- cached decoding --------------------------------------------------------------------------
    def setup_caches(
        self, max_batch_size: int, max_seq_len: int | None = None, max_source_len: int | None = None
    ) -> None:
        """Static decode state: each decoder layer's KV cache (max_seq_len target slots) and buffers for
        the source's cross-attention keys/values (max_source_len slots, padding masked)."""
        c = self.config
        max_seq_len, max_source_len = max_seq_len or c.max_seq_len, max_source_len or c.max_seq_len
        dtype, device = self.embed.tok_embeddings.weight.dtype, self.embed.pos_ids.device
        for layer in self.layers:
            layer.attention.mix.setup_cache(max_batch_size, max_seq_len, dtype, device)
            shape = (max_batch_size, c.n_kv_heads, max_source_len, c.head_dim)
            layer.source_k = torch.zeros(shape, dtype=dtype, device=device)
            layer.source_v = torch.zeros(shape, dtype=dtype, device=device)
            layer.source_mask = torch.zeros(max_batch_size, max_source_len, dtype=torch.bool, device=device)
        self._cache_len = max_seq_len

    def clear_caches(self) -> None:
        for layer in self.layers:
            layer.attention.mix.clear_cache()
            layer.source_k = layer.source_v = layer.source_mask = None
        self._cache_len = None

    @torch.no_grad()
    def start(self, src: Tensor, src_mask: Tensor | None = None) -> None:
        """Encode the source once and write every cross-attention layer's keys/values into its buffers."""
        b, s = src.shape
        if self._cache_len is None or s > self.layers[0].source_k.size(2) or b > self.layers[0].source_k.size(0):
            raise ValueError(f"start(): call setup_caches with room for a batch of {b} sources of {s} tokens first")
        if src_mask is None:
            src_mask = torch.ones(b, s, dtype=torch.bool, device=src.device)
        memory = self.encode(src, src_mask)
        for layer in self.layers:
            k, v = layer.cross.source_kv(memory)
            layer.source_k.zero_()
            layer.source_v.zero_()
            layer.source_mask.zero_()
            layer.source_k[:b, :, :s] = k
            layer.source_v[:b, :, :s] = v
            layer.source_mask[:b, :s] = src_mask

    def step(self, tok: Tensor, input_pos: Tensor) -> Tensor:
        """Logits (B, T, vocab) for tokens at cache slots input_pos (T,), against the started source."""
        b = tok.size(0)
        if b != self.layers[0].source_k.size(0):
            raise ValueError(f"step(): batch {b} differs from setup_caches' {self.layers[0].source_k.size(0)}")
        return self.decode(tok, None, None, input_pos)

    @torch.no_grad()
    def greedy(
        self, src: Tensor, src_mask: Tensor | None = None, max_new_tokens: int = 64, compile: bool = False
    ) -> list[list[int]]:
        """Greedy decoding of a batch of sources: the generated ids per row, up to (not including) <eos>.

        The caches are set up for exactly this batch; compile=True runs the one-token step through
        torch.compile(fullgraph=True, dynamic=False), as generate.py compiles the decoder's.
        """
        ids = special_ids(self.config)
        b = src.size(0)
        max_new_tokens = min(max_new_tokens, self.config.max_seq_len - 1)
        self.setup_caches(b, max_new_tokens + 1, src.size(1))
        self.start(src, src_mask)
        step = torch.compile(self.step, fullgraph=True, dynamic=False) if compile else self.step
        tok = torch.full((b, 1), ids.bos, dtype=torch.long, device=src.device)
        out = torch.empty(b, 0, dtype=torch.long, device=src.device)
        done = torch.zeros(b, dtype=torch.bool, device=src.device)
        for t in range(max_new_tokens):
            logits = step(tok, torch.tensor([t], device=src.device))
            tok = logits[:, -1].argmax(-1, keepdim=True)
            out = torch.cat([out, tok], 1)
            done |= tok[:, 0] == ids.eos
            if bool(done.all()):
                break
        self.clear_caches()
        rows = []
        for row in out.tolist():
            rows.append(row[: row.index(ids.eos)] if ids.eos in row else row)
        return rows
