"""Train a sentencepiece tokenizer (BPE or unigram) on a corpus; writes OUT/tokenizer.model.

python scripts/train_tokenizer.py --vocab-size 2048 --out data/sp2048
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpt.data import DataError, corpus_files  # noqa: E402
from gpt.tokenizer import TokenizerError, train_sentencepiece  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="+", default=["shakespeare"], help="'shakespeare', text files or folders")
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    ap.add_argument("--out", default="data/tokenizer", help="output directory")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        tok = train_sentencepiece(corpus_files(args.data), args.out, args.vocab_size, args.model_type)
    except (DataError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sample = "Shall I compare thee to a summer's day?"
    print(
        f"wrote {tok.model_path} ({args.model_type}, vocab {tok.vocab_size}) in {time.perf_counter() - t0:.1f}s; "
        f"{len(sample)} chars -> {len(tok.encode(sample))} tokens"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
