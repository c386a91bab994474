"""Create a freshly initialised checkpoint from a preset (random weights): for benchmarks,
memory estimates and as the starting point of the pipeline.

    python scripts/new_checkpoint.py --preset stories15M --out out/stories15M-random
    python scripts/new_checkpoint.py --preset shakespeare-char --tokenizer data/shakespeare-char --out out/init
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

import torch

from gpt.checkpoint import save_checkpoint
from gpt.cli import Parser, add_dtype, main_guard, resolve_dtype
from gpt.config import PRESETS, from_preset
from gpt.model import Transformer
from gpt.tokenizer import load_tokenizer


def run(argv: Sequence[str] | None = None) -> int:
    ap = Parser(prog="python scripts/new_checkpoint.py", description=__doc__)
    ap.add_argument("--preset", default="shakespeare-char", choices=tuple(PRESETS), help="model shape")
    ap.add_argument("--tokenizer", default=None, help="directory holding the tokenizer; sets vocab_size")
    ap.add_argument("--out", required=True, help="checkpoint directory to write")
    add_dtype(ap, default="fp32", help="dtype of the weights (default fp32)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    tok = load_tokenizer(args.tokenizer) if args.tokenizer else None
    config = from_preset(args.preset, vocab_size=tok.vocab_size if tok else None)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model = Transformer(config).to(resolve_dtype(args.dtype))
    save_checkpoint(args.out, model, tok)
    print(
        f"wrote {args.out}: {args.preset}, {model.num_params() / 1e6:.2f}M parameters, {args.dtype} "
        f"in {time.perf_counter() - t0:.1f}s"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return main_guard(run, argv)


if __name__ == "__main__":
    sys.exit(main())
