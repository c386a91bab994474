"""Sequence pairs for the encoder-decoder: tokenize a parallel corpus once, sample padded batches.

A parallel corpus is a directory of {train,val}.jsonl (and test.jsonl) lines {"src": ..., "tgt": ...}
(gpt.parallel.prepare_modernisation writes one). prepare_pairs tokenizes it with a char
tokenizer over all its text into a data directory:

    meta.json            kind "pairs", tokenizer, vocab_size, pair and token counts per split
    tokenizer.json       the char tokenizer (the model adds <pad> <bos> <eos> <mask> after it)
    {split}.npz          src / tgt: every sequence's ids concatenated; src_len / tgt_len: their lengths

pair_batch draws pairs with a generator (a pure function of it, as gpt.data.get_batch) and pads
to a fixed (B, block_size): src (<pad> after the text, src_mask False there), tgt = <bos> + text,
targets = text + <eos> (-100 at the pads); longer texts are cut to the block.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from gpt.encoder import SpecialIds
from gpt.errors import DataError
from gpt.tokenizer import CharTokenizer

SPLITS = ("train", "val", "test")


@dataclass
class Pairs:
    """One split: concatenated ids and lengths of the sources and targets."""

    src: np.ndarray
    src_len: np.ndarray
    tgt: np.ndarray
    tgt_len: np.ndarray

    def __len__(self) -> int:
        return len(self.src_len)

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        s0, t0 = int(self._src_off[i]), int(self._tgt_off[i])
        return self.src[s0 : s0 + self.src_len[i]], self.tgt[t0 : t0 + self.tgt_len[i]]

    def __post_init__(self) -> None:
        self._src_off = np.concatenate([[0], np.cumsum(self.src_len)[:-1]])
        self._tgt_off = np.concatenate([[0], np.cumsum(self.tgt_len)[:-1]])


def read_jsonl(path: Path) -> list[tuple[str, str]]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            row = json.loads(line)
            rows.append((row["src"], row["tgt"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f'{path}:{n} is not a {{"src": ..., "tgt": ...}} JSON line; fix or regenerate it') from None
    return rows


def is_pair_corpus(source: str | Path) -> bool:
    p = Path(source)
    return p.is_dir() and (p / "train.jsonl").exists()


def prepare_pairs(source: str | Path, out_dir: str | Path, tokenizer: str = "char") -> dict:
    """Tokenize the corpus directory `source` into out_dir (see the module docstring); returns meta."""
    src_dir, out = Path(source), Path(out_dir)
    if not is_pair_corpus(src_dir):
        raise DataError(
            f"{source} is not a parallel corpus directory with train.jsonl and val.jsonl; "
            "make one with python scripts/prepare_modernisation.py"
        )
    if tokenizer != "char":
        raise DataError(
            f"--tokenizer {tokenizer!r}: a parallel corpus is tokenized with char only; use --tokenizer char"
        )
    splits = {s: read_jsonl(src_dir / f"{s}.jsonl") for s in SPLITS if (src_dir / f"{s}.jsonl").exists()}
    if "val" not in splits:
        raise DataError(f"{src_dir / 'val.jsonl'} is missing; a parallel corpus needs train.jsonl and val.jsonl")
    tok = CharTokenizer.from_text("".join(s + t for rows in splits.values() for s, t in rows))
    out.mkdir(parents=True, exist_ok=True)
    tok.save(out)
    meta: dict = {"kind": "pairs", "source": str(src_dir), "tokenizer": "char", "vocab_size": tok.vocab_size}
    meta["dtype"] = "uint16" if tok.vocab_size < 2**16 else "uint32"
    for split, rows in splits.items():
        rows = [(s, t) for s, t in rows if s and t]  # every source needs a real token
        enc = [(tok.encode(s), tok.encode(t)) for s, t in rows]
        arrays = {
            "src": np.array([i for s, _ in enc for i in s], dtype=meta["dtype"]),
            "src_len": np.array([len(s) for s, _ in enc], dtype=np.int64),
            "tgt": np.array([i for _, t in enc for i in t], dtype=meta["dtype"]),
            "tgt_len": np.array([len(t) for _, t in enc], dtype=np.int64),
        }
        tmp = out / f".{split}.tmp.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, out / f"{split}.npz")
        meta[f"{split}_pairs"] = len(enc)
        meta[f"{split}_tokens"] = int(arrays["src"].size + arrays["tgt"].size)
    tmp = out / ".meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, out / "meta.json")
    return meta


def load_pairs(data_dir: str | Path, split: str) -> Pairs:
    path = Path(data_dir) / f"{split}.npz"
    if not path.exists():
        raise DataError(f"{path} is missing; delete {data_dir} and train again to prepare it")
    with np.load(path, allow_pickle=False) as z:
        pairs = Pairs(z["src"], z["src_len"], z["tgt"], z["tgt_len"])
    if len(pairs) == 0:
        raise DataError(f"{path} holds no pairs; the corpus split is empty")
    return pairs


def pad_sources(seqs: list, block_size: int, ids: SpecialIds) -> tuple[Tensor, Tensor]:
    """(B, block_size) ids padded with <pad> after each (cut) sequence, and the mask of real tokens."""
    src = torch.full((len(seqs), block_size), ids.pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), block_size, dtype=torch.bool)
    for r, s in enumerate(seqs):
        s = torch.as_tensor(np.asarray(s[:block_size], dtype=np.int64))
        src[r, : len(s)] = s
        mask[r, : len(s)] = True
    return src, mask


def pair_batch(
    pairs: Pairs,
    batch_size: int,
    block_size: int,
    ids: SpecialIds,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, Tensor]:
    """A random batch for EncoderDecoder.forward: src, src_mask, tgt, targets, each (B, block_size)."""
    rows = torch.randint(len(pairs), (batch_size,), generator=generator).tolist()
    got = [pairs.get(i) for i in rows]
    src, src_mask = pad_sources([s for s, _ in got], block_size, ids)
    tgt = torch.full((batch_size, block_size), ids.pad, dtype=torch.long)
    targets = torch.full((batch_size, block_size), -100, dtype=torch.long)
    for r, (_, t) in enumerate(got):
        seq = torch.cat([torch.tensor([ids.bos]), torch.as_tensor(t.astype(np.int64)), torch.tensor([ids.eos])])
        seq = seq[: block_size + 1]
        tgt[r, : len(seq) - 1] = seq[:-1]
        targets[r, : len(seq) - 1] = seq[1:]
    out = {"src": src, "src_mask": src_mask, "tgt": tgt, "targets": targets}
    return {k: v.to(device) for k, v in out.items()}
