"""Export a checkpoint of this toolkit as a Hugging Face LLaMA directory that
transformers.LlamaForCausalLM.from_pretrained (and AutoTokenizer) load.

    python scripts/export_hf.py --checkpoint out/tinystories-sp --out out/tinystories-sp-hf

Only what LlamaForCausalLM computes can be exported: standard softmax attention (sdpa or math),
rotary positions, float weights and a sentencepiece tokenizer. Anything else is refused with
the reason.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpt.checkpoint import CheckpointError  # noqa: E402
from gpt.config import ConfigError  # noqa: E402
from gpt.hf import HFError, export_hf  # noqa: E402
from gpt.tokenizer import TokenizerError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="checkpoint directory of this toolkit")
    ap.add_argument("--out", required=True, help="Hugging Face directory to write")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        export_hf(args.checkpoint, args.out)
    except (HFError, CheckpointError, ConfigError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} in {time.perf_counter() - t0:.1f}s; load it with LlamaForCausalLM.from_pretrained")
    return 0


if __name__ == "__main__":
    sys.exit(main())
