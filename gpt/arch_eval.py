"""What the encoder and the encoder-decoder are measured by.

mlm_accuracy   masked-token accuracy of a MaskedLM on held-out text: BERT masking (15%, 80/10/10)
               of fixed blocks, argmax at the chosen positions
translate      greedy decoding of source texts through an EncoderDecoder (cached, optionally compiled)
"""

from __future__ import annotations

import numpy as np
import torch

from gpt.encoder import MaskedLM, masked_accuracy, mlm_mask, special_ids
from gpt.pairs import pad_sources
from gpt.seq2seq import EncoderDecoder
from gpt.tokenizer import Tokenizer


@torch.no_grad()
def mlm_accuracy(
    model: MaskedLM, data: np.ndarray, n_real: int, block_size: int, n_blocks: int = 200, seed: int = 0
) -> tuple[float, int]:
    """(accuracy, masked tokens scored) over n_blocks blocks spread evenly over `data`, masked with `seed`."""
    g = torch.Generator().manual_seed(seed)
    starts = np.linspace(0, len(data) - block_size - 1, n_blocks).astype(np.int64)
    correct = total = 0
    for chunk in np.array_split(starts, max(1, n_blocks // 32)):
        x = torch.stack([torch.from_numpy(data[s : s + block_size].astype(np.int64)) for s in chunk])
        inputs, targets = mlm_mask(x, model.config, g, n_real=n_real)
        c, t = masked_accuracy(model, inputs, targets)
        correct, total = correct + c, total + t
    return correct / max(total, 1), total


@torch.no_grad()
def translate(
    model: EncoderDecoder,
    tokenizer: Tokenizer,
    sources: list[str],
    batch_size: int = 64,
    compile: bool = False,
    chunk: int | None = None,
) -> list[str]:
    """Greedy outputs for `sources`. Sources are cut to max_seq_len tokens and padded to that width, so
    every batch has the same shapes (one compiled step serves them all)."""
    if chunk is not None:
        pieces = [split_words(s, chunk) for s in sources]
        flat = translate(model, tokenizer, [p for ps in pieces for p in ps], batch_size, compile)
        out, i = [], 0
        for ps in pieces:
            out.append(" ".join(flat[i : i + len(ps)]))
            i += len(ps)
        return out
    width = model.config.max_seq_len
    ids = special_ids(model.config)
    device = model.embed.pos_ids.device
    outs = []
    for i in range(0, len(sources), batch_size):
        chunk = [tokenizer.encode(s)[:width] for s in sources[i : i + batch_size]]
        src, mask = pad_sources(chunk, width, ids)
        longest = max(len(s) for s in chunk)
        rows = model.greedy(src.to(device), mask.to(device), min(width - 1, longest + longest // 2 + 8), compile)
        outs += [tokenizer.decode([t for t in r if t < ids.pad]) for r in rows]
    return outs


def split_words(text: str, limit: int) -> list[str]:
    """`text` cut at spaces into pieces of at most `limit` characters (a longer word stays whole)."""
    pieces, cur = [], ""
    for word in text.split(" "):
        if cur and len(cur) + 1 + len(word) > limit:
            pieces.append(cur)
            cur = word
        else:
            cur = f"{cur} {word}" if cur else word
    return pieces + [cur]
