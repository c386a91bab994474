"""Tokenize a corpus into train.bin / val.bin / meta.json + tokenizer.

python scripts/prepare_data.py                                   # Shakespeare, char-level
python scripts/prepare_data.py --tokenizer sp:2048 --out data/shakespeare-sp2048
python scripts/prepare_data.py --data my_corpus.txt --out data/mine
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpt.data import DataError, prepare_dataset  # noqa: E402
from gpt.tokenizer import TokenizerError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    ap.add_argument("--val-fraction", type=float, default=0.1, help="last fraction of the text held out")
    args = ap.parse_args(argv)
    source = args.data[0] if len(args.data) == 1 else args.data
    t0 = time.perf_counter()
    try:
        info = prepare_dataset(source, args.out, args.tokenizer, args.val_fraction)
    except (DataError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {info.directory}: vocab {info.vocab_size}, {info.train_tokens:,} train / {info.val_tokens:,} val "
        f"tokens ({info.dtype}) in {time.perf_counter() - t0:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
