"""Score an encoder (masked-token accuracy) or an encoder-decoder (chrF / BLEU against the copy baseline).

    python scripts/eval_arch.py --checkpoint out/enc/best --data data/shakespeare-char          # val split
    python scripts/eval_arch.py --checkpoint out/s2s/best --data data/modernisation --split test --show 5

encoder: BERT masking (15%; 80/10/10, fixed seed) of --blocks blocks spread over the split of a prepared
text dataset (data/shakespeare-char: the val split is the last 10% of the works, whole plays held out),
accuracy of the argmax at the masked positions.
seq2seq: greedy decoding (static KV cache, cross-attention K/V computed once; --compile to torch.compile
the step) of every source line of {split}.jsonl in a parallel corpus directory, scored with sacrebleu
(gpt.parallel.score) next to the copy-the-input baseline. --chunk N decodes sources longer than N
characters in pieces cut at spaces (a model trained with --block-size N has never written a longer line).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from gpt.arch_eval import mlm_accuracy, translate
from gpt.checkpoint import load_checkpoint
from gpt.cli import Parser, add_checkpoint, main_guard, positive_int
from gpt.data import load_split
from gpt.errors import CliError
from gpt.parallel import read_pairs, score


def run(argv: Sequence[str] | None = None) -> int:
    ap = Parser(prog="python scripts/eval_arch.py", description=__doc__)
    add_checkpoint(ap, default=None, what=" of an encoder or encoder-decoder")
    ap.add_argument("--data", required=True, help="prepared text dataset (encoder) or parallel corpus dir (seq2seq)")
    ap.add_argument("--split", default=None, help="encoder: val (default) or train; seq2seq: test (default) or val")
    ap.add_argument("--blocks", type=positive_int, default=200, help="encoder: blocks scored (default 200)")
    ap.add_argument("--block-size", type=positive_int, default=None, help="encoder: default the model's max_seq_len")
    ap.add_argument("--limit", type=positive_int, default=None, help="seq2seq: score the first N lines only")
    ap.add_argument("--batch-size", type=positive_int, default=64, help="seq2seq: sources per batch (default 64)")
    ap.add_argument("--compile", action="store_true", help="seq2seq: torch.compile the decode step")
    ap.add_argument(
        "--chunk", type=positive_int, default=None,
        help="seq2seq: split sources longer than N characters at spaces, decode the pieces, join (default: off)",
    )  # fmt: skip
    ap.add_argument("--show", type=int, default=0, help="seq2seq: print N examples")
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    args = ap.parse_args(argv)
    model, tok = load_checkpoint(args.checkpoint)
    arch = model.config.arch
    t0 = time.perf_counter()
    if arch == "encoder":
        split = args.split or "val"
        block = args.block_size or model.config.max_seq_len
        acc, n = mlm_accuracy(model, load_split(args.data, split), tok.vocab_size, block, args.blocks)
        result = {"arch": arch, "split": split, "masked_accuracy": round(acc, 4), "masked_tokens": n}
        print(f"masked-token accuracy on {Path(args.data).name}/{split}: {acc:.2%} of {n:,} masked tokens")
    elif arch == "seq2seq":
        split = args.split or "test"
        rows = read_pairs(args.data, split)[: args.limit]
        hyps = translate(model, tok, [r["src"] for r in rows], args.batch_size, args.compile, args.chunk)
        refs = [r["tgt"] for r in rows]
        got, base = score(hyps, refs), score([r["src"] for r in rows], refs)
        plays = sorted({r["play"] for r in rows})
        result = {"arch": arch, "split": split, "plays": plays, "chunk": args.chunk}
        result |= {"model": vars(got), "copy_baseline": vars(base)}
        print(f"{split} ({', '.join(plays)}), {got.n:,} lines:")
        print(f"  model          chrF {got.chrf:6.2f}  BLEU {got.bleu:6.2f}")
        print(f"  copy baseline  chrF {base.chrf:6.2f}  BLEU {base.bleu:6.2f}")
        for r, h in list(zip(rows, hyps, strict=True))[: args.show]:
            print(f"  src  {r['src']}\n  ref  {r['tgt']}\n  hyp  {h}")
    else:
        raise CliError(f"{args.checkpoint} is a {arch} model; use scripts/eval_ppl.py for decoders")
    print(f"({time.perf_counter() - t0:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return main_guard(run, argv)


if __name__ == "__main__":
    sys.exit(main())
