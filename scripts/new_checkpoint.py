"""Create a freshly initialised checkpoint from a preset (random weights): for benchmarks,
memory estimates and as the starting point of the pipeline.

    python scripts/new_checkpoint.py --preset stories15M --out out/stories15M-random
    python scripts/new_checkpoint.py --preset shakespeare-char --tokenizer data/shakespeare-char --out out/init
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpt.checkpoint import CheckpointError, parse_dtype, save_checkpoint  # noqa: E402
from gpt.config import PRESETS, ConfigError, from_preset  # noqa: E402
from gpt.model import Transformer  # noqa: E402
from gpt.tokenizer import TokenizerError, load_tokenizer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="shakespeare-char", help=f"one of {', '.join(PRESETS)}")
    ap.add_argument("--tokenizer", default=None, help="directory holding the tokenizer; sets vocab_size")
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", default="fp32", help="fp32 | bf16 | fp16")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        tok = load_tokenizer(args.tokenizer) if args.tokenizer else None
        config = from_preset(args.preset, vocab_size=tok.vocab_size if tok else None)
        torch.manual_seed(args.seed)
        t0 = time.perf_counter()
        model = Transformer(config).to(parse_dtype(args.dtype))
        save_checkpoint(args.out, model, tok)
    except (ConfigError, TokenizerError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.out}: {args.preset}, {model.num_params() / 1e6:.2f}M parameters, {args.dtype} "
        f"in {time.perf_counter() - t0:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
