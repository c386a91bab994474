"""Validation loss and perplexity of a checkpoint (float or quantized) on a prepared dataset.

    python scripts/eval_ppl.py --checkpoint out/shakespeare-char/best
    python scripts/eval_ppl.py --checkpoint out/shakespeare-char/best-int8 --max-tokens 65536
    python scripts/eval_ppl.py --checkpoint out/shakespeare-char/best --block-size 1024   # past the training length

The split is read in consecutive windows (no sampling), so two checkpoints evaluated with the
same flags see the same tokens. The default data directory is prepared on demand. A --block-size
above the model's max_seq_len evaluates past the training length: the positional tables are
recomputed for the longer block at load (learned positions cannot extrapolate and refuse).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from gpt.checkpoint import load_checkpoint, read_config
from gpt.cli import (
    Parser,
    add_checkpoint,
    add_device,
    add_dtype,
    main_guard,
    positive_int,
    resolve_device,
    resolve_dtype,
)
from gpt.data import DataError, load_split, prepare_dataset, read_meta
from gpt.errors import CliError
from gpt.evaluate import evaluate

DEFAULT_DATA = "data/shakespeare-char"


def run(argv: Sequence[str] | None = None) -> int:
    ap = Parser(prog="python scripts/eval_ppl.py", description=__doc__)
    add_checkpoint(ap, what=" to evaluate, float or quantized")
    ap.add_argument("--data", default=DEFAULT_DATA, help="dataset directory written by scripts/prepare_data.py")
    ap.add_argument("--split", default="val", choices=("train", "val"))
    ap.add_argument(
        "--block-size",
        type=positive_int,
        default=None,
        help="context per window (default: model max_seq_len; longer extrapolates past it)",
    )
    ap.add_argument("--batch-size", type=positive_int, default=8, help="windows per forward (default 8)")
    ap.add_argument(
        "--max-tokens", type=positive_int, default=None, help="evaluate at most this many tokens (default: all)"
    )
    add_device(ap)
    add_dtype(ap)
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype)
    if args.data == DEFAULT_DATA and not (Path(args.data) / "meta.json").exists():
        prepare_dataset("shakespeare", args.data, "char")
    config, _ = read_config(args.checkpoint)
    trained = config.max_seq_len
    if args.block_size and args.block_size > trained and config.pos_encoding == "learned":
        raise CliError(
            f"--block-size {args.block_size}: {args.checkpoint} has learned positions (a table of max_seq_len="
            f"{trained}), which cannot extrapolate; pass --block-size {trained} or less"
        )
    model, tokenizer = load_checkpoint(args.checkpoint, device=device, dtype=dtype, max_seq_len=args.block_size)
    meta = read_meta(args.data)
    if meta["vocab_size"] != tokenizer.vocab_size:
        raise DataError(
            f"{args.data} was tokenized with {meta['vocab_size']} tokens but {args.checkpoint} has a "
            f"{tokenizer.vocab_size}-token tokenizer; pass the --data the model was trained on"
        )
    data = load_split(args.data, args.split)
    block = args.block_size or trained
    if len(data) <= block:
        raise DataError(
            f"{Path(args.data) / args.split}.bin has {len(data)} tokens, fewer than block size + 1 = {block + 1}; "
            "pass a smaller --block-size"
        )
    t0 = time.perf_counter()
    res = evaluate(model, data, block, args.batch_size, args.max_tokens, device=device)
    extrapolated = f" = {block / trained:g}x max_seq_len {trained}" if block > trained else ""
    print(
        f"{args.checkpoint}: {args.split} loss {res.loss:.4f}  perplexity {res.perplexity:.4f}  "
        f"({res.tokens:,} tokens, block {block}{extrapolated}, {time.perf_counter() - t0:.1f}s, "
        f"{torch.get_num_threads()} threads)"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return main_guard(run, argv)


if __name__ == "__main__":
    sys.exit(main())
