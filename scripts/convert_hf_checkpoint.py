"""Convert a local Hugging Face LLaMA checkpoint (TinyLlama, Llama 2, Llama 3, ...) into a checkpoint
directory of this toolkit, which generate.py serves.

    python scripts/convert_hf_checkpoint.py --hf-dir ~/models/TinyLlama-1.1B-Chat-v1.0 --out out/tinyllama
    python scripts/convert_hf_checkpoint.py --hf-dir DIR --out out/model --dtype bf16 --max-seq-len 2048

Reads config.json, model.safetensors or a sharded set with its index JSON (one shard at a time),
and the sentencepiece tokenizer.model when there is one. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpt.checkpoint import CheckpointError, parse_dtype  # noqa: E402
from gpt.config import ConfigError  # noqa: E402
from gpt.hf import HFError, convert_hf_checkpoint  # noqa: E402
from gpt.tokenizer import TokenizerError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-dir", required=True, help="local directory of a Hugging Face LLaMA checkpoint")
    ap.add_argument("--out", default=None, help="checkpoint directory to write (default out/<name of --hf-dir>)")
    ap.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: keep the stored dtype)")
    ap.add_argument(
        "--max-seq-len", type=int, default=None, help="cap max_position_embeddings (RoPE tables, cache size)"
    )
    args = ap.parse_args(argv)
    out = Path(args.out or Path("out") / Path(args.hf_dir).resolve().name)
    if args.max_seq_len is not None and args.max_seq_len <= 0:
        print(f"error: --max-seq-len {args.max_seq_len} must be a positive integer", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        convert_hf_checkpoint(args.hf_dir, out, parse_dtype(args.dtype), args.max_seq_len, log=print)
    except (HFError, CheckpointError, ConfigError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
