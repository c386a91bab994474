"""Export a checkpoint of this toolkit as a Hugging Face LLaMA directory that
transformers.LlamaForCausalLM.from_pretrained (and AutoTokenizer) load.

    python scripts/export_hf.py --checkpoint out/tinystories-sp --out out/tinystories-sp-hf

Only what LlamaForCausalLM computes can be exported: standard softmax attention (sdpa or math),
rotary positions, float weights and a sentencepiece tokenizer. Anything else is refused with
the reason.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

from gpt.cli import Parser, add_checkpoint, main_guard
from gpt.hf import export_hf


def run(argv: Sequence[str] | None = None) -> int:
    ap = Parser(prog="python scripts/export_hf.py", description=__doc__)
    add_checkpoint(ap, default=None, what=" of this toolkit (sentencepiece tokenizer, float weights)")
    ap.add_argument("--out", required=True, help="Hugging Face directory to write")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    export_hf(args.checkpoint, args.out)
    print(f"wrote {args.out} in {time.perf_counter() - t0:.1f}s; load it with LlamaForCausalLM.from_pretrained")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return main_guard(run, argv)


if __name__ == "__main__":
    sys.exit(main())
