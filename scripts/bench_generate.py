"""Decoding speed, batch 1, random weights at the llama2.c shapes: a markdown table.

    python scripts/bench_generate.py                                  # full table -> bench_generate.md
    python scripts/bench_generate.py --shapes stories15M --dtypes fp32 --max-new-tokens 50   # a quick check

Every measurement runs in a fresh subprocess (so peak memory and compile caches are its own).
A compiled configuration runs twice against one new, empty inductor cache directory: the first
run's compile time is "cold", the second's is "warm" (the on-disk cache is hit); tokens/s is
from the warm run, after its warm-up. The memory-bandwidth ceiling is a large tensor copy
(bytes read + written per second) measured in the same run with the same thread count; "% of
ceiling" is the achieved GB/s (weights + KV cache read per token × tokens/s) over it.
The transformers column uses gpt.hf to convert the same weights (n/a while gpt.hf is missing).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class RandomTokenizer:
    """Stands in for a real tokenizer with random weights: any text maps to some ids."""

    bos_id = None
    eos_id = None  # never stop early: every run decodes exactly max_new_tokens

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return [(ord(c) * 7919) % self.vocab_size for c in text]

    def decode(self, ids: list[int]) -> str:
        return ""


def build_model(shape: str, dtype: str):
    from gpt.checkpoint import parse_dtype
    from gpt.config import from_preset
    from gpt.model import Transformer

    torch.manual_seed(0)
    return Transformer(from_preset(shape)).to(parse_dtype(dtype)).eval()


def measure_ours(shape: str, dtype: str, mode: str, max_new: int, prompt_tokens: int) -> dict:
    from gpt.generation import Generator

    model = build_model(shape, dtype)
    tokenizer = RandomTokenizer(model.config.vocab_size)
    compile, prefill = mode != "eager", mode == "compile+prefill"
    gen = Generator(model, tokenizer, temperature=0.0, compile=compile, compile_prefill=prefill)
    prompt = "x" * prompt_tokens
    first = gen.generate([prompt], max_new)  # compiles (or loads the cache) and warms up
    r = gen.generate([prompt], max_new).report
    return {
        "tokens_per_s": r.tokens_per_s,
        "ttft_ms": r.ttft_s * 1000,
        "compile_s": first.report.compile_s,
        "gb_per_s": r.gb_per_s,
        "peak_mb": r.peak_memory_mb,
    }


def measure_hf(shape: str, dtype: str, max_new: int, prompt_tokens: int) -> dict:
    """transformers' generate on the same weights: eager dynamic cache and static cache + compile; best wins."""
    try:
        from gpt.hf import hf_config_dict, to_hf_state_dict
    except ImportError:
        return {"error": "n/a (gpt.hf missing)"}
    from transformers import LlamaConfig, LlamaForCausalLM

    model = build_model(shape, dtype)
    hf = LlamaForCausalLM(LlamaConfig(**hf_config_dict(model.config)))
    hf.load_state_dict(to_hf_state_dict(model.state_dict(), model.config), strict=False)
    hf = hf.to(model.tok_embeddings.weight.dtype).eval()
    ids = torch.tensor([RandomTokenizer(model.config.vocab_size).encode("x" * prompt_tokens)])
    best: dict = {}
    for setting in ("dynamic", "static+compile"):
        kw = dict(max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False)
        try:
            if setting == "static+compile":
                kw["cache_implementation"] = "static"
                hf.forward = torch.compile(hf.forward, fullgraph=True)
            with torch.no_grad():
                hf.generate(ids, **kw)  # warm-up (and compile)
                t0 = time.perf_counter()
                hf.generate(ids, **kw)
                tps = max_new / (time.perf_counter() - t0)
        except Exception as e:  # a setting that does not work on this CPU is reported, not fatal
            best.setdefault("failed", []).append(f"{setting}: {type(e).__name__}")
            continue
        if tps > best.get("tokens_per_s", 0):
            best.update(tokens_per_s=tps, setting=setting)
    return best


def bandwidth_ceiling(gib: float = 1.0) -> float:
    """GB/s of a large tensor copy (read + write), best of a few."""
    src = torch.ones(int(gib * 2**30) // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best / 1e9


def run_child(args: list[str], env: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"failed: {tail[:80]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["stories15M", "stories110M"])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--modes", nargs="+", default=["eager", "compile"], choices=["eager", "compile", "compile+prefill"])
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers column")
    ap.add_argument("--out", default="bench_generate.md")
    ap.add_argument("--child", nargs=4, metavar=("WHAT", "SHAPE", "DTYPE", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.child:  # one measurement, printed as JSON for the parent
        what, shape, dtype, mode = args.child
        res = (
            measure_hf(shape, dtype, args.max_new_tokens, args.prompt_tokens)
            if what == "hf"
            else measure_ours(shape, dtype, mode, args.max_new_tokens, args.prompt_tokens)
        )
        print(json.dumps(res))
        return 0

    ceiling = bandwidth_ceiling()
    print(f"memory-bandwidth ceiling (1 GiB copy, {args.threads} threads): {ceiling:.1f} GB/s", flush=True)
    common = ["--max-new-tokens", str(args.max_new_tokens), "--threads", str(args.threads)]
    common += ["--prompt-tokens", str(args.prompt_tokens)]
    rows = []
    for shape in args.shapes:
        for dtype in args.dtypes:
            hf = {} if args.no_hf else run_child(["--child", "hf", shape, dtype, "-", *common], dict(os.environ))
            for mode in args.modes:
                with tempfile.TemporaryDirectory(prefix="bench-inductor-") as cache:
                    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
                    res = run_child(["--child", "ours", shape, dtype, mode, *common], env)
                    if mode != "eager" and "error" not in res:
                        warm = run_child(["--child", "ours", shape, dtype, mode, *common], env)
                        res = {**warm, "compile_cold_s": res["compile_s"], "compile_warm_s": warm.get("compile_s")}
                rows.append((shape, dtype, mode, res, hf))
                print(format_row(*rows[-1], ceiling), flush=True)

    table = "\n".join([HEADER, *(format_row(*r, ceiling) for r in rows)])
    note = (
        f"\nbatch 1, {args.prompt_tokens}-token prompt, {args.max_new_tokens} new tokens, greedy, random weights, "
        f"{args.threads} thread(s), torch {torch.__version__}; ceiling = 1 GiB tensor copy = {ceiling:.1f} GB/s\n"
    )
    Path(args.out).write_text(table + "\n" + note)
    print(note.strip())
    print(f"wrote {args.out}")
    return 0


HEADER = (
    "| shape | dtype | mode | tokens/s | TTFT ms | compile cold / warm s | GB/s | % of ceiling | "
    "transformers tokens/s (setting) | ours / transformers |\n|---|---|---|---|---|---|---|---|---|---|"
)


def format_row(shape: str, dtype: str, mode: str, res: dict, hf: dict, ceiling: float) -> str:
    if "error" in res:
        return f"| {shape} | {dtype} | {mode} | {res['error']} | | | | | | |"
    comp = f"{res['compile_cold_s']:.1f} / {res['compile_warm_s']:.1f}" if mode != "eager" else "-"
    if "tokens_per_s" in hf:
        hf_cell = f"{hf['tokens_per_s']:.1f} ({hf['setting']})"
        ratio = f"{res['tokens_per_s'] / hf['tokens_per_s']:.2f}×"
    else:
        hf_cell, ratio = hf.get("error", "skipped" if not hf else f"failed ({hf.get('failed')})"), "-"
    return (
        f"| {shape} | {dtype} | {mode} | {res['tokens_per_s']:.1f} | {res['ttft_ms']:.1f} | {comp} | "
        f"{res['gb_per_s']:.2f} | {100 * res['gb_per_s'] / ceiling:.0f}% | {hf_cell} | {ratio} |"
    )


if __name__ == "__main__":
    sys.exit(main())
