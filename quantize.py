"""Quantise a checkpoint's weights to int8 or int4 (weight-only) into a new checkpoint directory.

    python quantize.py --mode int8                                  # out/shakespeare-char/best -> ...-int8
    python quantize.py --mode int4 --group-size 64 --checkpoint DIR --out DIR-int4-g64
    python quantize.py --mode int8 --keep-head                      # leave the lm head in floating point

The new directory loads everywhere a checkpoint does (generate.py, scripts/eval_ppl.py):
its config.json carries a "quantization" block (mode, group size, layers, weights file).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from gpt.checkpoint import CheckpointError
from gpt.config import ConfigError
from gpt.quant import MODES, QuantError, quantize_checkpoint, weights_path
from gpt.tokenizer import TokenizerError


def _mb(path: Path) -> float:
    return path.stat().st_size / 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="out/shakespeare-char/best", help="checkpoint directory to quantise")
    ap.add_argument("--mode", required=True, help=f"one of {', '.join(MODES)}")
    ap.add_argument("--group-size", default=None, help="int4 only: input channels per scale/zero (32, 64, 128, 256)")
    ap.add_argument("--out", default=None, help="output directory (default: CHECKPOINT-MODE)")
    ap.add_argument("--keep-head", action="store_true", help="keep the lm head (output layer) in floating point")
    args = ap.parse_args(argv)
    try:
        group_size = None
        if args.group_size is not None:
            if args.mode != "int4":
                raise QuantError("--group-size applies to --mode int4 only")
            if not args.group_size.isdigit():
                raise QuantError(f"--group-size {args.group_size!r} is not a number; use 32, 64, 128 or 256")
            group_size = int(args.group_size)
        t0 = time.perf_counter()
        out, block = quantize_checkpoint(args.checkpoint, args.out, args.mode, group_size, not args.keep_head)
        seconds = time.perf_counter() - t0
        before, after = weights_path(args.checkpoint), weights_path(out)
    except (CheckpointError, QuantError, ConfigError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    detail = f"group size {block['group_size']}, " if block["group_size"] else ""
    head = "lm head quantized" if block["lm_head"] else "lm head kept in float"
    print(
        f"wrote {out}: {args.mode}, {detail}{len(block['layers'])} linear layers, {head}, embedding kept in float\n"
        f"size {before.name} {_mb(before):.2f} MB -> {after.name} {_mb(after):.2f} MB "
        f"({_mb(before) / _mb(after):.2f}x smaller) in {seconds:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
