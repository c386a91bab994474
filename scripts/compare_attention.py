"""Train attention variants on equal terms, then compare them in a markdown table and one val-loss plot.

    python scripts/compare_attention.py --variants sdpa,alibi,sliding_window:window=64 --steps 200
    python scripts/compare_attention.py --variants sdpa,my_attn.py:MyAttention --steps 50 --preset tiny --no-compile
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \\
        --dynamo_backend no scripts/compare_attention.py --variants sdpa,alibi --steps 100     # DDP, as train_ddp.py

--variants is a comma-separated list; each item is SPEC[:key=value[:key=value ...]]:
  SPEC        a registered name (sdpa, alibi, ...), or a plug-in path/to/file.py:NAME or package.module:NAME
  key=value   an attention kwarg (the value is read as JSON, else kept as a string), e.g. sliding_window:window=64;
              the key pos_encoding sets that variant's positional encoding instead (e.g. sdpa:pos_encoding=none)
Segments with "=" are settings, so a plug-in's own colon stays unambiguous (my_attn.py:Cos:temperature=2).

Every variant trains from the same --seed (initial weights and batches), in the same data order, for the same
--steps, with the same model shape: only the attention differs, and the params column shows any variant that
adds parameters (+N against the first). alibi trains with pos_encoding "none", as ALiBi replaces the positional
embedding (set alibi:pos_encoding=rope to keep RoPE); every other variant uses the preset's (or --pos-encoding).

Each variant is a run of gpt.training.Trainer in <out>/<variant>/ (metrics.jsonl, best/, latest/); the script
then writes <out>/comparison.md, <out>/comparison.json and <out>/val_loss.png. Any other flag is a training flag
of train_ddp.py (--preset, --batch-size, --block-size, --lr, --seed, --eval-interval, --threads, --config, ...),
except those this script decides: --steps replaces --max-steps / --max-tokens, --variants replaces --attention /
--attention-kwargs, and every variant trains from scratch (no --resume).
--eval-lengths 64,128,256,512 also evaluates each variant's best checkpoint at those sequence lengths (past the
training --block-size: length extrapolation) on the same first --eval-tokens tokens of the val split, cut into
non-overlapping windows; the positional tables are recomputed for the longest length at load. It adds a second
table to comparison.md and <out>/length_loss.png. Learned positions cannot extrapolate: n/a past the block size.
Decode speed: greedy decoding (batch 1) from each variant's best checkpoint through gpt.generation,
torch.compile'd unless --no-compile; the median of 3 calls after a warm-up call (so the compile is not timed).

--arch decoder | encoder | seq2seq compares the variants in that architecture (gpt/arch.py), on the same
terms: decoder = next-token loss; encoder = masked-LM loss on BERT-masked blocks of the same text (the masks
are drawn from the same per-step generators as the blocks, so every variant sees the same masks); seq2seq =
target loss of an encoder-decoder on a parallel corpus (--data DIR with train.jsonl / val.jsonl), where the
variant is in every attention: encoder self-attention, decoder self-attention and cross-attention. Decode
speed: seq2seq greedy (cached, compiled unless --no-compile) from the first val source; n/a for an encoder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from gpt.attention import resolve_attention
from gpt.checkpoint import load_checkpoint
from gpt.cli import Parser, main_guard
from gpt.config import ARCHS
from gpt.errors import CliError, DataError
from gpt.evaluate import evaluate
from gpt.generation import Generator
from gpt.pairs import load_pairs
from gpt.training import TrainConfig, Trainer, TrainError, add_train_arguments, config_from_args, read_metrics

PROG = "python scripts/compare_attention.py"
DEFAULT_EVALS = 10
# variants that replace the positional encoding train without one unless told otherwise
POS_ENCODING = {"alibi": "none"}
# training settings this script sets itself: giving them would do nothing
DECIDED_HERE = {
    "max_steps": "--steps",
    "max_tokens": "--steps",
    "attention": "--variants",
    "attention_kwargs": "--variants",
}


@dataclasses.dataclass
class Variant:
    label: str  # as shown in the table
    spec: str  # what resolve_attention takes
    kwargs: dict[str, Any]
    pos_encoding: str | None  # None = the preset's (or --pos-encoding)

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.=-]+", "_", self.label).strip("_")


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_variant(item: str) -> Variant:
    """'sliding_window:window=64' -> spec sliding_window, kwargs {window: 64}; see the module docstring."""
    parts = item.split(":")
    settings = [p for p in parts if "=" in p]
    spec = ":".join(p for p in parts if "=" not in p)
    if not spec or parts[: len(parts) - len(settings)] != [p for p in parts if "=" not in p]:
        raise TrainError(f"--variants item {item!r}: expected SPEC[:key=value...] with the settings last")
    kwargs = {k: _value(v) for k, _, v in (s.partition("=") for s in settings)}
    pos = kwargs.pop("pos_encoding", None)
    where, sep, name = spec.rpartition(":")
    label = f"{Path(where).name}:{name}" if sep and where.endswith(".py") else spec
    label = ":".join([label, *settings])
    return Variant(label, spec, kwargs, pos)


def parse_variants(text: str) -> list[Variant]:
    variants = [parse_variant(item.strip()) for item in text.split(",") if item.strip()]
    if not variants:
        raise TrainError("--variants is empty; name at least one, e.g. --variants sdpa,alibi")
    slugs = [v.slug for v in variants]
    if len(set(slugs)) != len(slugs):
        raise TrainError(f"--variants names a variant twice: {text}")
    return variants


def eval_lengths(text: str) -> list[int]:
    """'64,128,256' -> [64, 128, 256] (an argparse type: a ValueError becomes a one-line usage error)."""
    try:
        lengths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 64,128") from None
    if not lengths or min(lengths) < 1 or len(set(lengths)) != len(lengths):
        raise argparse.ArgumentTypeError(f"{text!r}: give distinct positive lengths, e.g. 64,128,256,512")
    return sorted(lengths)


def _is_rank0() -> bool:
    # under accelerate launch every rank runs this script; one report is enough
    return os.environ.get("RANK", "0") == "0"


def build_parser() -> Parser:
    # no abbreviations: a prefix of a training flag (--eval for --eval-interval) must reach the training parser
    ap = Parser(prog=PROG, description=__doc__, allow_abbrev=False)
    ap.add_argument("--variants", required=True, help="comma-separated SPEC[:key=value...] items (see above)")
    ap.add_argument("--steps", type=int, required=True, help="optimizer steps per variant")
    ap.add_argument(
        "--out", default="out/compare", help="one run directory per variant, plus the report (default %(default)s)"
    )
    ap.add_argument(
        "--evals",
        type=int,
        default=None,
        help=f"evaluations per run (default {DEFAULT_EVALS}); --eval-interval N instead sets the interval",
    )
    ap.add_argument("--no-compile", action="store_true", help="measure decode speed eager instead of torch.compile'd")
    ap.add_argument(
        "--decode-tokens",
        type=int,
        default=100,
        help="new tokens per decode measurement (default %(default)s; capped by the context)",
    )
    ap.add_argument("--prompt", default="\n", help="decode prompt (default a newline)")
    ap.add_argument(
        "--eval-lengths",
        type=eval_lengths,
        default=None,
        help="comma-separated sequence lengths to evaluate each variant at, e.g. 64,128,256,512 (default: none)",
    )
    ap.add_argument(
        "--eval-tokens",
        type=int,
        default=32768,
        help="val tokens evaluated at each --eval-lengths length (default %(default)s)",
    )
    ap.add_argument(
        "--arch", choices=ARCHS, default=None, help="architecture to compare in (default: the preset's, decoder)"
    )
    return ap  # fmt: skip


def training_parser() -> Parser:
    # an unknown flag is reported against train_ddp.py's --help, which lists the training flags
    ap = Parser(prog="python train_ddp.py", allow_abbrev=False)
    add_train_arguments(ap)
    return ap


def base_config(args: argparse.Namespace, train_argv: list[str]) -> TrainConfig:
    evals = DEFAULT_EVALS if args.evals is None else args.evals
    if args.steps < 1 or evals < 1 or args.decode_tokens < 1:
        raise CliError("--steps, --evals and --decode-tokens must be positive")
    if args.eval_tokens < 1:
        raise CliError(f"--eval-tokens {args.eval_tokens} must be positive")
    cfg, given = config_from_args(training_parser(), train_argv)
    for name, ours in DECIDED_HERE.items():
        if name in given and getattr(cfg, name) is not None:
            raise CliError(f"--{name.replace('_', '-')} does nothing here ({ours} decides it); drop it")
    if cfg.resume:
        raise CliError("--resume is not supported here; every variant trains from scratch")
    if "eval_interval" in given and args.evals is not None:
        raise CliError("--evals does nothing with --eval-interval (which sets the interval itself); give one of them")
    interval = cfg.eval_interval if "eval_interval" in given else max(1, args.steps // evals)
    arch = args.arch or cfg.arch
    return dataclasses.replace(cfg, max_steps=args.steps, max_tokens=None, eval_interval=interval, arch=arch)


def variant_config(base: TrainConfig, v: Variant, out: Path) -> TrainConfig:
    name = resolve_attention(v.spec)  # the registry name, for POS_ENCODING
    pos = v.pos_encoding or base.pos_encoding or POS_ENCODING.get(name)
    return dataclasses.replace(base, attention=v.spec, attention_kwargs=v.kwargs, pos_encoding=pos, out=str(out))


# -- measurements --------------------------------------------------------------------------------


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: "5" resets the process's peak resident set (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float | None:
    """CUDA: max allocated since the reset; CPU: the process's peak resident set since the reset (Linux)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    found = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
    return int(found.group(1)) / 1024 if found else None


def seq2seq_decode_speed(trainer: Trainer, args: argparse.Namespace) -> float:
    """Greedy tokens/s of the best encoder-decoder on the first val source (batch 1): median of 3 after a warm-up."""
    model, _ = load_checkpoint(Path(trainer.cfg.out) / "best", device=trainer.accelerator.device)
    src = torch.as_tensor(load_pairs(trainer.data_dir, "val").get(0)[0].astype("int64"))[None]
    src = src[:, : model.config.max_seq_len].to(trainer.accelerator.device)
    new = min(args.decode_tokens, model.config.max_seq_len - 1)

    def timed() -> float:
        t0 = time.perf_counter()
        n = len(model.greedy(src, None, new, compile=not args.no_compile)[0]) + 1  # + the <eos> it stopped at
        return min(n, new) / (time.perf_counter() - t0)

    timed()
    return statistics.median(timed() for _ in range(3))


def decode_speed(run_dir: Path, args: argparse.Namespace, device: torch.device) -> float:
    """Greedy tokens/s from the run's best checkpoint: the median of 3 calls after a warm-up (which compiles)."""
    model, tok = load_checkpoint(run_dir / "best", device=device)
    room = model.config.max_seq_len - len(tok.encode(args.prompt))
    gen = Generator(model, tok, temperature=0.0, compile=not args.no_compile)
    new = min(args.decode_tokens, room)
    gen.generate([args.prompt], new, stop_at_eos=False)
    return statistics.median(gen.generate([args.prompt], new, stop_at_eos=False).report.tokens_per_s for _ in range(3))


def length_eval_tokens(n_val: int, args: argparse.Namespace) -> int:
    """How many val tokens every --eval-lengths length sees: a multiple of the longest, so they are the same ones."""
    longest = max(args.eval_lengths)
    tokens = min(args.eval_tokens, n_val - 1) // longest * longest
    if tokens < longest:
        raise DataError(
            f"--eval-lengths {longest} needs {longest + 1} val tokens and at least --eval-tokens {longest}; "
            f"the val split has {n_val:,} and --eval-tokens is {args.eval_tokens:,}: give shorter lengths"
        )
    return tokens


def length_losses(
    run_dir: Path, val: Any, tokens: int, args: argparse.Namespace, block: int, device: torch.device
) -> dict[int, float | None]:
    """Val loss at each --eval-lengths length from the run's best checkpoint (None: cannot extrapolate)."""
    model, _ = load_checkpoint(run_dir / "best", device=device)
    learned = model.config.pos_encoding == "learned"
    if not learned:
        model.extend_context(max(args.eval_lengths))
    losses: dict[int, float | None] = {}
    for n in args.eval_lengths:
        fits = not learned or n <= block  # learned rows past the training block were never trained
        losses[n] = evaluate(model, val, n, 8, tokens, device=device).loss if fits else None
    return losses


def run_variant(cfg: TrainConfig, v: Variant, args: argparse.Namespace) -> dict[str, Any]:
    trainer = Trainer(cfg)
    acc = trainer.accelerator
    try:
        if args.eval_lengths and trainer.arch != "decoder":
            raise CliError(
                f"--eval-lengths measures a decoder's loss past its training length; drop it with --arch {trainer.arch}"
            )
        eval_tokens = length_eval_tokens(len(trainer.val_data), args) if args.eval_lengths else None
        reset_peak_memory(acc.device)
        info = trainer.run()
        peak = peak_memory_mb(acc.device)
        rows = read_metrics(Path(cfg.out) / "metrics.jsonl")
        decode = lengths = None
        if trainer.is_main and trainer.arch == "decoder":
            decode = decode_speed(Path(cfg.out), args, acc.device)
            if args.eval_lengths:
                lengths = length_losses(Path(cfg.out), trainer.val_data, eval_tokens, args, cfg.block_size, acc.device)
        elif trainer.is_main and trainer.arch == "seq2seq":
            decode = seq2seq_decode_speed(trainer, args)
        acc.wait_for_everyone()
    finally:
        torch.set_num_threads(trainer._threads_before)
    last = rows[-1]
    return {
        "variant": v.label,
        "arch": trainer.arch,
        "attention": trainer.model_config.attention,
        "attention_kwargs": v.kwargs,
        "pos_encoding": trainer.model_config.pos_encoding,
        "params": info["params"],
        "final_val_loss": last["val_loss"],
        "best_val_loss": min(r["val_loss"] for r in rows),
        "train_tokens_per_s": last["tokens"] / last["elapsed_s"] if last["elapsed_s"] > 0 else 0.0,
        "decode_tokens_per_s": decode,
        "peak_memory_mb": peak,
        "curve": [(r["step"], r["val_loss"]) for r in rows],
        "length_loss": lengths,
        "length_eval_tokens": eval_tokens,
        "block_size": cfg.block_size,
        "run_dir": cfg.out,
        "world_size": info["world_size"],
        "device": info["device"],
        "threads_per_rank": info["threads_per_rank"],
        "tokens_per_step": info["tokens_per_step"],
    }


# -- report --------------------------------------------------------------------------------------


def how_it_ran(base: TrainConfig, results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    r = results[0]
    shape = f"preset {base.preset}" + "".join(
        f", {f}={getattr(base, f)}" for f in ("arch", "dim", "n_layers", "n_heads") if getattr(base, f) is not None
    )
    data = Path(base.data_dir).name if base.data_dir else base.data
    return (
        f"{args.steps} steps of {shape} on {data} ({base.tokenizer} "
        f"tokens), {r['tokens_per_step']:,} tokens/step (batch {base.batch_size} x {base.grad_accum} accum x "
        f"{r['world_size']} rank(s) x {base.block_size}), lr {base.lr}, seed {base.seed}, on {r['device']} with "
        f"{r['threads_per_rank']} thread(s) per rank; decode: batch 1, greedy, median of 3, "
        f"{'eager' if args.no_compile else 'torch.compiled'}; peak memory: "
        f"{'CUDA max allocated' if r['device'].startswith('cuda') else 'process peak RSS'} while training (rank 0)"
    )


def markdown_table(results: list[dict[str, Any]], header: str) -> str:
    base_params = results[0]["params"]
    lines = [
        f"_{header}_",
        "",
        "| variant | pos enc | params | final val loss | best val loss | train tok/s | decode tok/s | peak mem (MB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        delta = r["params"] - base_params
        params = f"{r['params']:,}" + (f" ({delta:+,})" if delta else "")
        decode = "n/a" if r["decode_tokens_per_s"] is None else f"{r['decode_tokens_per_s']:,.0f}"
        mem = "n/a" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:,.0f}"
        lines.append(
            f"| {r['variant']} | {r['pos_encoding']} | {params} | {r['final_val_loss']:.4f} | "
            f"{r['best_val_loss']:.4f} | {r['train_tokens_per_s']:,.0f} | {decode} | {mem} |"
        )
    return "\n".join(lines) + "\n"


def length_table(results: list[dict[str, Any]]) -> str:
    """Val loss per variant (rows) and evaluation length (columns), the training block marked 1x."""
    block, lengths = results[0]["block_size"], list(results[0]["length_loss"])
    cells = [f"{n} ({n / block:g}x)" for n in lengths]
    lines = [
        f"_Length extrapolation: val loss (nats/token) on the first {results[0]['length_eval_tokens']:,} val tokens "
        f"in non-overlapping windows of each length, trained at block {block}; n/a = learned positions, which "
        "cannot extrapolate_",
        "",
        "| variant | pos enc | " + " | ".join(cells) + " |",
        "|---|---|" + "---:|" * len(cells),
    ]
    for r in results:
        losses = ["n/a" if x is None else f"{x:.4f}" for x in r["length_loss"].values()]
        lines.append(f"| {r['variant']} | {r['pos_encoding']} | " + " | ".join(losses) + " |")
    return "\n".join(lines) + "\n"


def plot_lengths(results: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for r in results:
        points = [(n, x) for n, x in r["length_loss"].items() if x is not None]
        if points:
            named = "pos_encoding=" in r["variant"]  # else say which encoding the variant ran with
            label = r["variant"] if named else f"{r['variant']} ({r['pos_encoding']})"
            ax.plot(*zip(*points, strict=True), marker="o", markersize=4, label=label)
    ax.axvline(results[0]["block_size"], color="grey", linestyle="--", linewidth=1, label="training block")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(results[0]["length_loss"]), [str(n) for n in results[0]["length_loss"]])
    ax.set_xlabel("evaluation sequence length (tokens)")
    ax.set_ylabel("val loss (nats/token)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_curves(results: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for r in results:
        steps, losses = zip(*r["curve"], strict=True)
        ax.plot(steps, losses, marker="o", markersize=3, label=r["variant"])
    ax.set_xlabel("step")
    ax.set_ylabel("val loss (nats/token)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def compare(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args, train_argv = build_parser().parse_known_args(argv)
    variants = parse_variants(args.variants)
    base = base_config(args, train_argv)
    out = Path(args.out)
    configs = [variant_config(base, v, out / v.slug) for v in variants]  # every plug-in resolves before any run
    results = []
    for cfg, v in zip(configs, variants, strict=True):
        print(f"== {v.label}: training {args.steps} steps into {cfg.out}", flush=True)
        results.append(run_variant(cfg, v, args))
    if _is_rank0():
        header = how_it_ran(base, results, args)
        table = markdown_table(results, header)
        title = f"{args.steps} steps, preset {base.preset}, seed {base.seed}"
        written = [out / "comparison.md", out / "comparison.json", out / "val_loss.png"]
        if args.eval_lengths:
            table += "\n" + length_table(results)
            plot_lengths(results, out / "length_loss.png", f"{title}, block {base.block_size}")
            written.append(out / "length_loss.png")
        (out / "comparison.md").write_text(table)
        (out / "comparison.json").write_text(json.dumps({"how": header, "results": results}, indent=2) + "\n")
        plot_curves(results, out / "val_loss.png", title)
        print("\n" + table + f"\nwrote {', '.join(str(p) for p in written)}")
    return results


def _main(argv: Sequence[str] | None) -> int:
    started = time.perf_counter()
    try:
        compare(argv)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if _is_rank0():
        print(f"done in {time.perf_counter() - started:.0f} s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return main_guard(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
