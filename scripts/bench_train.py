"""Training throughput (tokens/s) and MFU of train_ddp.py on this machine.

For each model shape (shakespeare-char, stories15M) it runs train_ddp.py for 2*K steps and
reports the tokens/s of the second half (so a torch.compile warm-up is not counted):
eager vs --compile, fp32 vs bf16 autocast, one process vs `accelerate launch` with 2 CPU ranks.
Writes a markdown table that starts with a description of the machine.

python scripts/bench_train.py                                    # the full grid (tens of minutes on 2 cores)
python scripts/bench_train.py --steps 4 --shapes shakespeare-char --variants eager-fp32  # a quick check

The single-process rows train on --device (default auto: a GPU when there is one); the ddp2 row is always
two CPU ranks (gloo).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from bench_machine import cpu_model  # scripts/ is on sys.path when a script runs

from gpt.cli import Parser, add_device, main_guard, resolve_device
from gpt.config import from_preset
from gpt.errors import CliError
from gpt.model import Transformer
from gpt.tokenizer import CharTokenizer

ROOT = Path(__file__).resolve().parent.parent

SHAPES = {"shakespeare-char": 96, "stories15M": 32000}  # preset -> vocab for the synthetic data
VARIANTS = {
    # name: (processes, extra flags)
    "eager-fp32": (1, []),
    "compile-fp32": (1, ["--compile"]),
    "eager-bf16": (1, ["--mixed-precision", "bf16"]),
    "compile-bf16": (1, ["--compile", "--mixed-precision", "bf16"]),
    "ddp2-eager-fp32": (2, []),
}


def machine() -> str:
    cpu = cpu_model()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else 0
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {cores} cores, {mem:.0f} GiB, {gpu}; torch {torch.__version__}, Python {platform.python_version()}; "
        f"load average at start {load:.1f}"
    )


def synthetic_data(directory: Path, vocab: int, tokens: int = 400_000) -> Path:
    """Random token ids in the prepared-data format (throughput does not depend on the text)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    dtype = np.uint16 if vocab <= 2**16 else np.uint32
    for split, n in (("train", tokens), ("val", tokens // 10)):
        rng.integers(0, vocab, n, dtype=dtype).tofile(directory / f"{split}.bin")
    CharTokenizer([chr(0x1000 + i) for i in range(vocab)]).save(directory)
    meta = {"vocab_size": vocab, "dtype": np.dtype(dtype).name, "train_tokens": tokens, "val_tokens": tokens // 10}
    (directory / "meta.json").write_text(json.dumps({"tokenizer": "synthetic", **meta}))
    return directory


def run_one(shape: str, variant: str, args: argparse.Namespace, data: Path, work: Path) -> dict:
    procs, extra = VARIANTS[variant]
    out = work / f"{shape}-{variant}"
    k = args.steps
    flags = [
        "--preset", shape, "--data-dir", str(data), "--out", str(out), "--batch-size", str(args.batch_size),
        "--block-size", str(args.block_size), "--max-steps", str(2 * k), "--log-interval", str(k),
        "--eval-interval", str(2 * k), "--eval-iters", "1", "--warmup-steps", "0", "--no-progress", *extra,
    ]  # fmt: skip
    env = dict(os.environ)
    if procs == 1:
        cmd = [sys.executable, str(ROOT / "train_ddp.py"), *flags, "--device", args.device]
    else:
        accelerate = shutil.which("accelerate") or str(Path(sys.executable).with_name("accelerate"))
        cmd = [
            accelerate, "launch", "--multi_gpu", "--num_processes", str(procs), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "train_ddp.py"), *flags, "--device", "cpu",
        ]  # fmt: skip
        env["ACCELERATE_USE_CPU"] = "1"
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["?"]
        return {"shape": shape, "variant": variant, "error": tail[0]}
    row = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    model = Transformer(from_preset(shape, vocab_size=SHAPES[shape]))
    fpt = model.flops_per_token(args.block_size)
    return {
        "shape": shape,
        "variant": variant,
        "params_m": model.num_params() / 1e6,
        "processes": procs,
        "tokens_per_s": row["tokens_per_s"],
        "gflops": row["tokens_per_s"] * fpt / 1e9,
        "mfu": row["mfu"],
        "wall_s": wall,
    }


def table(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"Machine: {machine()}",
        "",
        f"Per-process batch {args.batch_size} x {args.block_size} tokens; tokens/s over steps {args.steps + 1}-"
        f"{2 * args.steps} (the first {args.steps} include any compile); MFU against the fp32 (bf16 for bf16 rows) "
        "1024x1024 matmul rate each process measured at start.",
        "",
        "| shape | variant | params | processes | tokens/s | GFLOP/s | MFU | vs eager-fp32 | run wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base = {r["shape"]: r["tokens_per_s"] for r in rows if r["variant"] == "eager-fp32" and "error" not in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['variant']} | | | failed: {r['error']} | | | | |")
            continue
        ratio = f"{r['tokens_per_s'] / base[r['shape']]:.2f}x" if r["shape"] in base else ""
        lines.append(
            f"| {r['shape']} | {r['variant']} | {r['params_m']:.1f}M | {r['processes']} | {r['tokens_per_s']:,.0f} "
            f"| {r['gflops']:.1f} | {100 * r['mfu']:.1f}% | {ratio} | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def _main(argv: Sequence[str] | None) -> int:
    ap = Parser(prog="python scripts/bench_train.py", description=__doc__)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES), help="model shapes")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), help="what to compare")
    ap.add_argument("--steps", type=int, default=20, help="K: run 2K steps, time the last K (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=16, help="sequences per process (default: %(default)s)")
    ap.add_argument("--block-size", type=int, default=256, help="tokens per sequence (default: %(default)s)")
    ap.add_argument("--out", default="BENCHMARKS-train.md", help="markdown table (default: %(default)s)")
    add_device(ap)
    args = ap.parse_args(argv)
    if args.steps <= 0 or args.batch_size <= 0 or args.block_size <= 0:
        raise CliError("--steps, --batch-size and --block-size must be positive")
    resolve_device(args.device)  # a device this machine lacks: one line now, not a failed row per run
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_train-") as tmp:
        work = Path(tmp)
        for shape in args.shapes:
            data = synthetic_data(work / f"data-{shape}", SHAPES[shape])
            for variant in args.variants:
                row = run_one(shape, variant, args, data, work)
                rows.append(row)
                print(json.dumps(row), flush=True)
    text = table(rows, args)
    Path(args.out).write_text(text)
    print(text)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return main_guard(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
