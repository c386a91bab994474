"""Sampling with settings per row, as tensors: one compiled graph serves every mix of requests.

gpt.generation.sample bakes temperature / top-k / top-p into the graph as constants, which
is right for one CLI run and wrong for a server whose slots each carry their own request.
Here every setting is a (N,) tensor and the randomness is a counter-based hash of
(request key, token position, vocabulary id): a seeded request draws the same tokens
whatever slot it sits in and whoever else is being served, with no generator state to save.

The draw is the exponential race of gpt.generation (argmax(p / E), E ~ Exp(1)), with
E = -log(U) and U from the hash instead of exponential_().
"""

from __future__ import annotations

import torch
from torch import Tensor

#: alternatives a request may ask for per token (OpenAI's top_logprobs maximum)
MAX_TOP_LOGPROBS = 20
_M32 = 0xFFFFFFFF


def _hash32(x: Tensor) -> Tensor:
    """A 32-bit integer mix (xorshift-multiply) of int64 values in [0, 2^32), kept in int64.

    Multipliers are below 2^31 so no product leaves the int64 range: the same bits eager,
    compiled and on every device."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _M32
    return x ^ (x >> 16)


def uniform_noise(keys: Tensor, counters: Tensor, vocab_size: int) -> Tensor:
    """U (N, V) in (0, 1), a function of (keys[i], counters[i], vocabulary id) only."""
    row = _hash32((_hash32(keys & 0x7FFFFFFF) + (counters & 0xFFFFF) * 0x632BE5AB) & _M32)  # (N,)
    v = torch.arange(vocab_size, device=keys.device)
    x = _hash32((row[:, None] + v[None, :] * 0x1B873593) & _M32)
    return ((x >> 8).float() + 0.5) * (1.0 / (1 << 24))


def greedy_rows(logits: Tensor) -> Tensor:
    """(N, V) -> (N,) argmax tokens."""
    return torch.argmax(logits, dim=-1)


def sample_rows(
    logits: Tensor,
    temperature: Tensor,
    top_k: Tensor,
    top_p: Tensor,
    keys: Tensor,
    counters: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row sampling: logits (N, V); temperature, top_p (N,) float; top_k, keys, counters (N,) long.

    temperature 0 = greedy, top_k 0 = off, top_p 1 = off (the same filters, in the same order,
    as gpt.generation.logits_to_probs). Returns (tokens (N,), logprob of each token (N,),
    top logprobs (N, MAX_TOP_LOGPROBS) and their token ids) under the model's own distribution
    (log_softmax of the raw logits, before temperature and filters; as vLLM reports them).
    """
    logits = logits.float()
    v = logits.size(-1)
    scaled = logits / temperature.clamp_min(1e-5)[:, None]
    sorted_l, order = scaled.sort(dim=-1, descending=True)
    k = torch.where(top_k > 0, top_k.clamp(max=v), torch.full_like(top_k, v))
    kth = sorted_l.gather(1, (k - 1)[:, None])
    sorted_l = sorted_l.masked_fill(sorted_l < kth, -float("inf"))
    probs = torch.softmax(sorted_l, dim=-1)
    # keep the smallest head whose mass reaches top_p; the first token always survives
    drop = (probs.cumsum(-1) - probs) >= top_p[:, None]
    probs = probs.masked_fill(drop, 0.0)
    race = -torch.log(uniform_noise(keys, counters, v)).gather(1, order)  # noise follows the vocabulary id
    sampled = order.gather(1, torch.argmax(probs / race, dim=-1, keepdim=True))[:, 0]
    tokens = torch.where(temperature > 0, sampled, torch.argmax(logits, dim=-1))
    logp = torch.log_softmax(logits, dim=-1)
    top = torch.topk(logp, min(MAX_TOP_LOGPROBS, v), dim=-1)
    return tokens, logp.gather(1, tokens[:, None])[:, 0], top.values, top.indices
