"""Tokenizers with one interface: encode, decode, bos_id, eos_id, vocab_size, save.

CharTokenizer    one id per character seen in a corpus; saved as tokenizer.json
SentencePiece    a sentencepiece BPE or unigram model; saved as tokenizer.model
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Protocol

from gpt.errors import TokenizerError  # noqa: F401  (re-exported: gpt.tokenizer.TokenizerError)

CHAR_FILE = "tokenizer.json"
SP_FILE = "tokenizer.model"


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def save(self, directory: str | Path) -> Path: ...


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes files private; a tokenizer is as shareable as the weights
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class CharTokenizer:
    """Characters of the corpus, sorted; no special tokens (bos_id = eos_id = None)."""

    bos_id = None
    eos_id = None

    def __init__(self, chars: list[str]) -> None:
        if len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
            raise TokenizerError("a char vocabulary must be a list of distinct single characters")
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars)

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(sorted(set(text)))

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise TokenizerError(
                f"character {e.args[0]!r} is not in the char vocabulary ({self.vocab_size} characters); "
                "remove it from the text or train on a corpus that contains it"
            ) from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CHAR_FILE
        _atomic_write_bytes(path, json.dumps({"type": "char", "chars": self.chars}, ensure_ascii=False).encode())
        return path

    @classmethod
    def load(cls, path: str | Path) -> CharTokenizer:
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{path}: cannot read a char vocabulary ({e}); re-create it") from None
        if not isinstance(d, dict) or d.get("type") != "char" or not isinstance(d.get("chars"), list):
            raise TokenizerError(f'{path} is not a char vocabulary of this toolkit (expected {{"type": "char", ...}})')
        return cls(d["chars"])


class SentencePieceTokenizer:
    """A sentencepiece model (BPE or unigram), e.g. LLaMA's tokenizer.model."""

    def __init__(self, model_path: str | Path) -> None:
        import sentencepiece as spm

        self.model_path = Path(model_path)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(model_path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{model_path}: not a readable sentencepiece model ({e})") from None
        self.vocab_size = self.sp.vocab_size()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        unk = self.sp.unk_id()
        if unk in ids:  # only models without byte fallback produce <unk>
            bad = next((ch for ch in text if unk in self.sp.encode(ch)), "?")
            raise TokenizerError(f"character {bad!r} is unknown to {self.model_path}; remove it from the text")
        if bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if eos and self.eos_id is not None:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / SP_FILE
        _atomic_write_bytes(path, self.sp.serialized_model_proto())
        return path


def train_sentencepiece(
    text_files: list[str | Path],
    out_dir: str | Path,
    vocab_size: int,
    model_type: str = "bpe",
    max_sentence_length: int = 16384,
) -> SentencePieceTokenizer:
    """Train a sentencepiece model on text files; writes out_dir/tokenizer.model.

    Byte fallback is on, so any text encodes (unseen characters become bytes); text is not
    normalised and newline is a token of its own, so decode(encode(text)) == text;
    <unk>=0, <s>=1, </s>=2 as in LLaMA.
    """
    from sentencepiece import SentencePieceTrainer

    _train_sp = SentencePieceTrainer.train
    if model_type not in ("bpe", "unigram"):
        raise TokenizerError(f"model_type {model_type!r} is not supported; use bpe or unigram")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        try:
            _train_sp(
                input=",".join(str(f) for f in text_files),
                model_prefix=str(Path(tmp) / "sp"),
                vocab_size=vocab_size,
                model_type=model_type,
                character_coverage=1.0,
                byte_fallback=True,
                split_digits=True,
                # keep the text as it is: newlines and runs of spaces carry the layout of verse
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                allow_whitespace_only_pieces=True,
                user_defined_symbols=["\n"],
                max_sentence_length=max_sentence_length,
                unk_id=0,
                bos_id=1,
                eos_id=2,
                pad_id=-1,
                num_threads=os.cpu_count() or 1,
                minloglevel=2,
            )
        except RuntimeError as e:  # sentencepiece reports bad settings as RuntimeError("INTERNAL: ... msg")
            msg = str(e).splitlines()[0].split("] ")[-1]
            files = str(text_files[0]) if len(text_files) == 1 else f"{len(text_files)} files ({text_files[0]}, ...)"
            raise TokenizerError(f"sentencepiece could not train on {files}: {msg}") from None
        os.replace(Path(tmp) / "sp.model", out_dir / SP_FILE)
    return SentencePieceTokenizer(out_dir / SP_FILE)


def load_tokenizer(directory: str | Path) -> CharTokenizer | SentencePieceTokenizer:
    """The tokenizer stored in a checkpoint (or data) directory."""
    d = Path(directory)
    if (d / SP_FILE).exists():
        return SentencePieceTokenizer(d / SP_FILE)
    if (d / CHAR_FILE).exists():
        return CharTokenizer.load(d / CHAR_FILE)
    raise TokenizerError(f"{d} has no {SP_FILE} or {CHAR_FILE}; copy the tokenizer the model was trained with into it")
