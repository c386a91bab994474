"""Validation loss and perplexity over a token split, deterministically.

The split is cut into consecutive windows of `block_size + 1` tokens (each window predicts
its last `block_size` tokens from the ones before), so two models evaluated with the same
arguments see exactly the same tokens: differences are the models', not the sampling's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gpt.errors import DataError


@dataclass
class EvalResult:
    loss: float  # mean cross-entropy per token, nats
    perplexity: float
    tokens: int  # number of predicted tokens


def window_starts(n_tokens: int, block_size: int, max_tokens: int | None = None) -> list[int]:
    """Start offsets of non-overlapping windows covering the split (at most max_tokens predictions)."""
    starts = list(range(0, n_tokens - block_size, block_size))
    if max_tokens is not None:
        starts = starts[: max(1, max_tokens // block_size)]
    return starts


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: np.ndarray,
    block_size: int,
    batch_size: int = 8,
    max_tokens: int | None = None,
    device: torch.device | str = "cpu",
) -> EvalResult:
    """Mean next-token cross-entropy of `model` on `data` (a 1-D token array, e.g. load_split(...))."""
    if len(data) <= block_size:
        raise DataError(
            f"the split has {len(data)} tokens, fewer than block_size+1={block_size + 1}; use a smaller block"
        )
    was_training = model.training
    model.eval()
    starts = window_starts(len(data), block_size, max_tokens)
    total, count = 0.0, 0
    for i in range(0, len(starts), batch_size):
        chunk = np.stack([np.asarray(data[s : s + block_size + 1], dtype=np.int64) for s in starts[i : i + batch_size]])
        batch = torch.from_numpy(chunk).to(device)
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        total += loss.item()
        count += batch[:, 1:].numel()
    model.train(was_training)
    mean = total / count
    return EvalResult(loss=mean, perplexity=math.exp(mean), tokens=count)
