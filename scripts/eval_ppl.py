"""Validation loss and perplexity of a checkpoint (float or quantized) on a prepared dataset.

    python scripts/eval_ppl.py --checkpoint out/shakespeare-char/best
    python scripts/eval_ppl.py --checkpoint out/shakespeare-char/best-int8 --max-tokens 65536

The split is read in consecutive windows (no sampling), so two checkpoints evaluated with the
same flags see the same tokens. The default data directory is prepared on demand.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpt.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from gpt.data import DataError, load_split, prepare_dataset, read_meta  # noqa: E402
from gpt.evaluate import evaluate  # noqa: E402
from gpt.quant import QuantError  # noqa: E402
from gpt.tokenizer import TokenizerError  # noqa: E402

DEFAULT_DATA = "data/shakespeare-char"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="out/shakespeare-char/best")
    ap.add_argument("--data", default=DEFAULT_DATA, help="dataset directory written by scripts/prepare_data.py")
    ap.add_argument("--split", default="val", choices=("train", "val"))
    ap.add_argument("--block-size", type=int, default=None, help="context per window (default: model max_seq_len)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=None, help="evaluate at most this many tokens (default: all)")
    ap.add_argument("--dtype", default=None, help="fp32 | bf16 (default: as stored)")
    args = ap.parse_args(argv)
    try:
        if args.data == DEFAULT_DATA and not (Path(args.data) / "meta.json").exists():
            prepare_dataset("shakespeare", args.data, "char")
        model, tokenizer = load_checkpoint(args.checkpoint, dtype=args.dtype)
        meta = read_meta(args.data)
        if meta["vocab_size"] != tokenizer.vocab_size:
            raise DataError(
                f"{args.data} was tokenized with {meta['vocab_size']} tokens but {args.checkpoint} has a "
                f"{tokenizer.vocab_size}-token tokenizer; pass the --data the model was trained on"
            )
        data = load_split(args.data, args.split)
        block = args.block_size or model.config.max_seq_len
        if not 0 < block <= model.config.max_seq_len:
            raise DataError(f"--block-size {block} must be between 1 and the model's max_seq_len")
        t0 = time.perf_counter()
        res = evaluate(model, data, block, args.batch_size, args.max_tokens)
    except (CheckpointError, QuantError, DataError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"{args.checkpoint}: {args.split} loss {res.loss:.4f}  perplexity {res.perplexity:.4f}  "
        f"({res.tokens:,} tokens, block {block}, {time.perf_counter() - t0:.1f}s, {torch.get_num_threads()} threads)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
