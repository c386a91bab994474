"""Tokenize a corpus into train.bin / val.bin / meta.json + tokenizer.

python scripts/prepare_data.py                                   # Shakespeare, char-level
python scripts/prepare_data.py --tokenizer sp:2048 --out data/shakespeare-sp2048
python scripts/prepare_data.py --data my_corpus.txt --out data/mine
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from gpt.cli import Parser, main_guard
from gpt.data import prepare_dataset


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be between 0 and 1 (e.g. 0.1)")
    return value


def run(argv: Sequence[str] | None = None) -> int:
    ap = Parser(prog="python scripts/prepare_data.py", description=__doc__)
    ap.add_argument(
        "--data",
        nargs="+",
        default=["shakespeare"],
        help="'shakespeare' (offline, from the shakespeare package), text files or folders of .txt",
    )
    ap.add_argument(
        "--tokenizer",
        default="char",
        help="char | sp:VOCAB (train a sentencepiece BPE) | unigram:VOCAB | path to a tokenizer",
    )
    ap.add_argument("--out", default="data/shakespeare-char", help="output directory")
    ap.add_argument("--val-fraction", type=fraction, default=0.1, help="last fraction of the text held out")
    args = ap.parse_args(argv)
    source = args.data[0] if len(args.data) == 1 else args.data
    t0 = time.perf_counter()
    info = prepare_dataset(source, args.out, args.tokenizer, args.val_fraction)
    print(
        f"wrote {info.directory}: vocab {info.vocab_size}, {info.train_tokens:,} train / {info.val_tokens:,} val "
        f"tokens ({info.dtype}) in {time.perf_counter() - t0:.1f}s"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return main_guard(run, argv)


if __name__ == "__main__":
    sys.exit(main())
