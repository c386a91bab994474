"""Quantise a checkpoint's weights to int8 or int4 (weight-only) into a new checkpoint directory.

    python quantize.py --mode int8                                  # out/shakespeare-char/best -> ...-int8
    python quantize.py --mode int4 --group-size 64                  # ... -> best-int4-g64
    python quantize.py --mode int8 --keep-head --checkpoint DIR --out DIR-int8-head
                                                                    # leave the lm head in floating point

The new directory loads everywhere a checkpoint does (generate.py, scripts/eval_ppl.py):
its config.json carries a "quantization" block (mode, group size, layers, weights file).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path

from gpt.checkpoint import quantize_checkpoint, weights_path
from gpt.cli import Parser, add_checkpoint, main_guard, refuse_unless
from gpt.quant import INT4_GROUP_SIZES, MODES


def _mb(path: Path) -> float:
    return path.stat().st_size / 1e6


def build_parser() -> Parser:
    ap = Parser(prog="python quantize.py", description=__doc__)
    add_checkpoint(ap, what=" to quantise")
    ap.add_argument("--mode", required=True, choices=MODES, help="int8: per output channel; int4: per group")
    ap.add_argument(
        "--group-size",
        type=int,
        default=None,
        choices=INT4_GROUP_SIZES,
        help="int4 only: input channels per scale/zero (default 32)",
    )
    ap.add_argument("--out", default=None, help="output directory (default: CHECKPOINT-int8 or CHECKPOINT-int4-gG)")
    ap.add_argument("--keep-head", action="store_true", help="keep the lm head (output layer) in floating point")
    return ap


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    refuse_unless(args.group_size is None or args.mode == "int4", "--group-size", "--mode int4")
    t0 = time.perf_counter()
    out, block = quantize_checkpoint(args.checkpoint, args.out, args.mode, args.group_size, not args.keep_head)
    seconds = time.perf_counter() - t0
    before, after = weights_path(args.checkpoint), weights_path(out)
    detail = f"group size {block['group_size']}, " if block["group_size"] else ""
    head = "lm head quantized" if block["lm_head"] else "lm head kept in float"
    print(
        f"wrote {out}: {args.mode}, {detail}{len(block['layers'])} linear layers, {head}, embedding kept in float\n"
        f"size {before.name} {_mb(before):.2f} MB -> {after.name} {_mb(after):.2f} MB "
        f"({_mb(before) / _mb(after):.2f}x smaller) in {seconds:.1f}s"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return main_guard(run, argv)


if __name__ == "__main__":
    sys.exit(main())
