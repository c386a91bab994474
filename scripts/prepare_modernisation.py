"""Build the Folio -> modern spelling parallel corpus and score three baselines on it: copying the
input, hand-written respelling rules (gpt.parallel.modernise_by_rules) and a word-lookup table
learned from the training pairs (gpt.parallel.modernise_by_lookup).

python scripts/prepare_modernisation.py                          # -> data/modernisation
python scripts/prepare_modernisation.py --out data/mod --test-plays hamlet macbeth
python scripts/prepare_modernisation.py --align hamlet --show 5  # look at one play's pairs
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

from gpt.cli import Parser, main_guard, positive_int, refuse_unless
from gpt.parallel import (
    TEST_PLAYS,
    VAL_PLAYS,
    align_lines,
    folio_lines,
    modern_lines,
    prepare_modernisation,
    read_meta,
    read_play,
)


def show_play(name: str, show: int, max_words: int) -> None:
    folio, modern = read_play(name)
    a = align_lines(folio_lines(folio), modern_lines(modern), max_words)
    print(
        f"{name}: {len(a.pairs)} pairs, {a.aligned_folio_lines}/{a.folio_lines} folio lines aligned "
        f"({a.aligned_fraction:.1%})"
    )
    for src, tgt in a.pairs[:show]:
        print(f"  {src}\n    -> {tgt}")


def run(argv: Sequence[str] | None = None) -> int:
    ap = Parser(prog="python scripts/prepare_modernisation.py", description=__doc__)
    ap.add_argument("--out", default="data/modernisation", help="output directory (default data/modernisation)")
    ap.add_argument("--val-plays", nargs="+", default=list(VAL_PLAYS), help="plays held out for validation")
    ap.add_argument("--test-plays", nargs="+", default=list(TEST_PLAYS), help="plays held out for testing")
    ap.add_argument(
        "--plays", nargs="+", help="train on these plays only (default: all 35 Folio plays but the held-out ones)"
    )
    ap.add_argument("--max-words", type=positive_int, default=80, help="drop aligned spans longer than this")
    ap.add_argument("--align", metavar="PLAY", help="only align one play and print its pairs (writes nothing)")
    ap.add_argument("--show", type=positive_int, help="with --align: how many pairs to print (default 10)")
    args = ap.parse_args(argv)
    refuse_unless(args.show is None or args.align is not None, "--show", "--align PLAY")
    if args.align:
        show_play(args.align, args.show or 10, args.max_words)
        return 0
    t0 = time.perf_counter()
    out = prepare_modernisation(args.out, args.val_plays, args.test_plays, args.max_words, args.plays)
    meta = read_meta(out)
    pairs = meta["pairs"]
    print(
        f"wrote {out}: {pairs['train']:,} train / {pairs['val']:,} val / {pairs['test']:,} test pairs from "
        f"{sum(len(p) for p in meta['plays'].values())} plays, {meta['aligned_fraction']:.1%} of folio lines aligned, "
        f"in {time.perf_counter() - t0:.1f}s"
    )
    print("baseline  split  chrF   BLEU   pairs  plays")
    for name in ("copy", "rule", "lookup"):
        for split, s in meta[f"{name}_baseline"].items():
            plays = ", ".join(meta["plays"][split])
            print(f"{name:8s}  {split:5s}  {s['chrf']:5.2f}  {s['bleu']:5.2f}  {s['n']:5d}  {plays}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return main_guard(run, argv)


if __name__ == "__main__":
    sys.exit(main())
