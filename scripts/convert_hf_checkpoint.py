"""Convert a local Hugging Face LLaMA checkpoint (TinyLlama, Llama 2, Llama 3, ...) into a checkpoint
directory of this toolkit, which generate.py serves.

    python scripts/convert_hf_checkpoint.py --hf-dir ~/models/TinyLlama-1.1B-Chat-v1.0 --out out/tinyllama
    python scripts/convert_hf_checkpoint.py --hf-dir DIR --out out/model --dtype bf16 --max-seq-len 2048

Reads config.json, model.safetensors or a sharded set with its index JSON (one shard at a time),
and the sentencepiece tokenizer.model when there is one. Nothing is downloaded.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path

from gpt.cli import Parser, add_dtype, main_guard, positive_int, resolve_dtype
from gpt.hf import convert_hf_checkpoint


def run(argv: Sequence[str] | None = None) -> int:
    ap = Parser(prog="python scripts/convert_hf_checkpoint.py", description=__doc__)
    ap.add_argument("--hf-dir", required=True, help="local directory of a Hugging Face LLaMA checkpoint")
    ap.add_argument("--out", default=None, help="checkpoint directory to write (default out/<name of --hf-dir>)")
    add_dtype(ap, help="cast the weights (default: keep the stored dtype)")
    ap.add_argument(
        "--max-seq-len", type=positive_int, default=None, help="cap max_position_embeddings (RoPE tables, cache size)"
    )
    args = ap.parse_args(argv)
    out = Path(args.out or Path("out") / Path(args.hf_dir).resolve().name)
    t0 = time.perf_counter()
    convert_hf_checkpoint(args.hf_dir, out, resolve_dtype(args.dtype), args.max_seq_len, log=print)
    print(f"wrote {out} in {time.perf_counter() - t0:.1f}s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return main_guard(run, argv)


if __name__ == "__main__":
    sys.exit(main())
