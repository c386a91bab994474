"""Export a checkpoint of this toolkit as a GGUF file that llama.cpp (and llama-cpp-python) loads.

    python scripts/export_gguf.py --checkpoint out/stories15M-sp --out out/stories15M-sp.gguf --outtype q8_0

--outtype f32 keeps every weight in float32; f16 halves the matrices; q8_0 stores them in
llama.cpp's 8-bit blocks (32 values and one f16 scale), q4_0 in its 4-bit blocks (32 values and
one f16 scale, the pair of our int4 with group size 32). Norm gains stay f32 in every outtype.
Only what llama.cpp's llama architecture computes can be exported: standard softmax attention
(sdpa or math), rotary positions, float weights and a sentencepiece tokenizer. Anything else is
refused with the reason.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

from gpt.cli import Parser, add_checkpoint, main_guard
from gpt.gguf_export import OUTTYPES, export_gguf


def run(argv: Sequence[str] | None = None) -> int:
    ap = Parser(prog="python scripts/export_gguf.py", description=__doc__)
    add_checkpoint(ap, default=None, what=" of this toolkit (sentencepiece tokenizer, float weights)")
    ap.add_argument("--out", required=True, help="GGUF file to write")
    ap.add_argument("--outtype", default="f32", choices=OUTTYPES, help="weight format (default f32)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    out = export_gguf(args.checkpoint, args.out, args.outtype)
    size = out.stat().st_size / 1e6
    print(f"wrote {out} ({args.outtype}, {size:.1f} MB) in {time.perf_counter() - t0:.1f}s; run it with llama.cpp")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return main_guard(run, argv)


if __name__ == "__main__":
    sys.exit(main())
