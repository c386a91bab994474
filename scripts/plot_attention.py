"""Draw the attention weights of one layer for a prompt: a grid of per-head heat maps,
the prompt's tokens on both axes (rows = queries, columns = keys).

    python scripts/plot_attention.py --checkpoint out/shakespeare-char/best --prompt "ROMEO: But soft"
    python scripts/plot_attention.py --checkpoint DIR --prompt TEXT --layer 3 --out attn.png

Any variant that returns weights (model(idx, return_weights=True)) can be drawn. Weights
that go negative (differential attention subtracts two maps) are drawn on a diverging map
centred on 0, so their sign shows; otherwise the scale starts at 0.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from gpt.checkpoint import load_checkpoint
from gpt.cli import Parser, add_checkpoint, main_guard
from gpt.errors import CliError

# characters that would be invisible or break a tick label
_VISIBLE = {" ": "␣", "\n": "⏎", "\t": "⇥"}


def token_labels(tokenizer, ids: list[int]) -> list[str]:
    sp = getattr(tokenizer, "sp", None)  # sentencepiece: show pieces as the model sees them
    pieces = [sp.id_to_piece(i) for i in ids] if sp is not None else [tokenizer.decode([i]) for i in ids]
    return ["".join(_VISIBLE.get(c, c) for c in p) for p in pieces]


def plot_heads(weights: torch.Tensor, labels: list[str], out: Path, title: str) -> Path:
    """weights (H, T, T) -> a PNG with one heat map per head."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    n_heads, t = weights.shape[0], weights.shape[-1]
    cols = math.ceil(math.sqrt(n_heads))
    rows = math.ceil(n_heads / cols)
    cell = max(2.5, 0.22 * t)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * cell + 1, rows * cell + 0.6), squeeze=False)
    font = max(4, min(9, int(200 / max(t, 1))))
    signed = bool((weights < 0).any())
    for h, ax in enumerate(axes.flat):
        if h >= n_heads:
            ax.axis("off")
            continue
        w = weights[h].float()
        if signed:  # the same colour distance from white for +x and -x
            lim = max(w.abs().max().item(), 1e-12)
            scale = dict(cmap="RdBu_r", vmin=-lim, vmax=lim)
        else:
            scale = dict(cmap="viridis", vmin=0.0)
        im = ax.imshow(w.numpy(), interpolation="nearest", **scale)
        ax.set_title(f"head {h}", fontsize=9)
        ax.set_xticks(range(t), labels, fontsize=font, rotation=90)
        ax.set_yticks(range(t), labels, fontsize=font)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def build_parser() -> Parser:
    ap = Parser(prog="python scripts/plot_attention.py", description=__doc__)
    add_checkpoint(ap, default=None)
    ap.add_argument("--prompt", required=True, help="text whose attention to draw")
    ap.add_argument("--layer", type=int, default=0, help="layer index (negative counts from the end)")
    ap.add_argument("--out", default=None, help="PNG path (default attention_layer<L>.png)")
    return ap


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    model, tok = load_checkpoint(args.checkpoint)
    ids = tok.encode(args.prompt)
    n_layers, max_len = model.config.n_layers, model.config.max_seq_len
    if not -n_layers <= args.layer < n_layers:
        raise CliError(f"--layer {args.layer} is out of range; the model has {n_layers} layers")
    if not 0 < len(ids) <= max_len:
        raise CliError(f"--prompt is {len(ids)} tokens; give 1 to {max_len} (the model's max_seq_len)")
    layer = args.layer % n_layers
    with torch.no_grad():
        try:
            _, weights = model(torch.tensor([ids]), return_weights=True)
        except NotImplementedError:
            raise CliError(f"attention {model.config.attention!r} does not return weights") from None
    out = Path(args.out or f"attention_layer{layer}.png")
    title = f"{Path(args.checkpoint).name}: {model.config.attention}, layer {layer}"
    plot_heads(weights[layer][0], token_labels(tok, ids), out, title)
    print(f"wrote {out}: {weights[layer].shape[1]} heads x {len(ids)} tokens, layer {layer} of {n_layers}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return main_guard(run, argv)


if __name__ == "__main__":
    sys.exit(main())
