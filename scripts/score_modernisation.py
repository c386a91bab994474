"""Score spelling-modernisation output (one line per pair of a split) with chrF and BLEU, next to
the copy, rule and lookup baselines of the same split.

python scripts/score_modernisation.py --hyps out/test.txt                 # data/modernisation, test
python scripts/score_modernisation.py --hyps val.txt --split val --data data/mod
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from gpt.cli import Parser, main_guard
from gpt.errors import CliError
from gpt.parallel import read_meta, read_pairs, score


def read_hyps(path: Path, expected: int, split: str) -> list[str]:
    if not path.exists():
        raise CliError(f"--hyps {path} does not exist; write one output line per {split} pair")
    hyps = path.read_text(encoding="utf-8").splitlines()
    if len(hyps) != expected:
        raise CliError(
            f"--hyps {path} has {len(hyps)} lines, the {split} split {expected} pairs; write one line per pair"
        )
    return hyps


def run(argv: Sequence[str] | None = None) -> int:
    ap = Parser(prog="python scripts/score_modernisation.py", description=__doc__)
    ap.add_argument("--hyps", type=Path, required=True, help="system output, one line per pair, in split order")
    ap.add_argument("--data", default="data/modernisation", help="corpus directory (prepare_modernisation.py --out)")
    ap.add_argument("--split", default="test", choices=("val", "test"), help="default test")
    args = ap.parse_args(argv)
    rows = read_pairs(args.data, args.split)
    hyps = read_hyps(args.hyps, len(rows), args.split)
    meta = read_meta(args.data)
    s = score(hyps, [r["tgt"] for r in rows])
    print(f"{'system':8s}  chrF   BLEU   ({args.split}: {len(rows)} pairs, {', '.join(meta['plays'][args.split])})")
    for name in ("copy", "rule", "lookup"):
        b = meta.get(f"{name}_baseline", {}).get(args.split)
        if b:  # a corpus from an older prepare_modernisation.py may lack some
            print(f"{name:8s}  {b['chrf']:5.2f}  {b['bleu']:5.2f}")
    print(f"{args.hyps.stem:8s}  {s.chrf:5.2f}  {s.bleu:5.2f}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return main_guard(run, argv)


if __name__ == "__main__":
    sys.exit(main())
