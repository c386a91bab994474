"""Train a sentencepiece tokenizer (BPE or unigram) on a corpus; writes OUT/tokenizer.model.

python scripts/train_tokenizer.py --vocab-size 2048 --out data/sp2048
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

from gpt.cli import Parser, main_guard, positive_int
from gpt.data import corpus_files
from gpt.tokenizer import train_sentencepiece


def run(argv: Sequence[str] | None = None) -> int:
    ap = Parser(prog="python scripts/train_tokenizer.py", description=__doc__)
    ap.add_argument("--data", nargs="+", default=["shakespeare"], help="'shakespeare', text files or folders")
    ap.add_argument("--vocab-size", type=positive_int, default=2048, help="pieces in the vocabulary (default 2048)")
    ap.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    ap.add_argument("--out", default="data/tokenizer", help="output directory")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    tok = train_sentencepiece(corpus_files(args.data), args.out, args.vocab_size, args.model_type)
    sample = "Shall I compare thee to a summer's day?"
    print(
        f"wrote {tok.model_path} ({args.model_type}, vocab {tok.vocab_size}) in {time.perf_counter() - t0:.1f}s; "
        f"{len(sample)} chars -> {len(tok.encode(sample))} tokens"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return main_guard(run, argv)


if __name__ == "__main__":
    sys.exit(main())
