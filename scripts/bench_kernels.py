"""Microbenchmark of gpt.kernels' int8 / int4 / fp32 ops against torch's CPU paths, in GB/s of weights read.

    python scripts/bench_kernels.py                       # writes docs/bench_kernels.md
    python scripts/bench_kernels.py --rounds 9 --out /tmp/bench.md

Shapes: 2048x768 and 32000x768 (stories110M's head), 768x2048 (its w2); M = 1 and 8 activation
rows; 1 and 2 threads. Each op cycles through enough copies of its weights (>= 96 MiB) that
they come from DRAM, as in decoding, not from the L3 (8-32 MiB on the machines seen). Within one (shape, M, threads)
setting the ops are timed interleaved, round after round, and the median round is reported, so
that the noise of a shared machine hits every op alike. GB/s counts the bytes of each op's own
weight format (int8: 1 B/weight + scales; int4: ½ B/weight + its scales; fp32: 4 B/weight).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from gpt import kernels
from gpt.fast import matvec_int8
from gpt.quant import quantize_int4, quantize_int8, unpack_int4

SHAPES = [(2048, 768), (32000, 768), (768, 2048)]  # (N, K)
MS = (1, 8)
THREADS = (1, 2)
DRAM_BYTES = 96 << 20  # more than the L3, so each call reads its weights from memory
GROUP = 32
FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile")


def cpu_header() -> tuple[str, str]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return model, " ".join(f"{f}={'yes' if f in flags else 'no'}" for f in FLAGS)


class Op:
    """One benchmarked call: `make()` builds one copy of the weights and returns (call(x), bytes)."""

    def __init__(self, name: str, make: Callable[[], tuple[Callable[[torch.Tensor], torch.Tensor], int]], dtype):
        self.name, self.dtype = name, dtype
        first, self.nbytes = make()
        copies = max(1, -(-DRAM_BYTES // self.nbytes))
        self.calls = [first] + [make()[0] for _ in range(copies - 1)]
        self.i = 0

    def run(self, x: torch.Tensor, reps: int) -> float:
        """Seconds per call over `reps` calls, each on the next copy of the weights."""
        x = x.to(self.dtype)
        t = time.perf_counter()
        for _ in range(reps):
            self.calls[self.i](x)
            self.i = (self.i + 1) % len(self.calls)
        return (time.perf_counter() - t) / reps


_compiled_matvec_int8 = torch.compile(matvec_int8, fullgraph=True, dynamic=False)


def build_ops(n: int, k: int) -> list[Op]:
    w = torch.randn(n, k) * 0.02
    q8, s8 = quantize_int8(w)
    q4, sz = quantize_int4(w, GROUP)
    ops: list[Op] = []

    def own_int8(path):
        def make():
            packed = kernels.int8_pack(q8)
            s = s8.clone()
            return (lambda x: torch.ops.gpt_kernels.int8_linear(x, packed, s, n, k, kernels.PATHS.index(path))), (
                packed.numel() + 4 * n
            )

        return make

    def own_int4(path):
        def make():
            packed, scales = kernels.int4_pack(q4, sz, GROUP)
            idx = kernels.PATHS.index(path)
            return (lambda x: torch.ops.gpt_kernels.int4_linear(x, packed, scales, n, k, GROUP, idx)), (
                packed.numel() + 2 * scales.numel()
            )

        return make

    def own_f32(path):
        def make():
            wf = w.clone()
            idx = kernels.PATHS.index(path)
            return (lambda x: torch.ops.gpt_kernels.f32_linear(x, wf, idx)), 4 * n * k

        return make

    if kernels.available():
        for path in reversed(kernels.supported_paths()):
            if path == "scalar":
                continue  # the portable reference path; 4-10x slower, not a contender
            ops.append(Op(f"gpt_kernels.int8_linear [{path}] fp32 x", own_int8(path), torch.float32))
            ops.append(Op(f"gpt_kernels.int4_linear g{GROUP} [{path}] fp32 x", own_int4(path), torch.float32))
            ops.append(Op(f"gpt_kernels.f32_linear [{path}] (4 B/weight)", own_f32(path), torch.float32))

    def aten_int8():
        q, s = q8.clone(), s8.to(torch.bfloat16)
        return (lambda x: torch.ops.aten._weight_int8pack_mm(x, q, s)), n * k + 2 * n

    def aten_int4():
        n16 = -(-n // 16) * 16
        qi = F.pad(unpack_int4(q4).to(torch.int32), (0, 0, 0, n16 - n))
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(qi, 1)
        szb = F.pad(sz, (0, 0, 0, n16 - n)).to(torch.bfloat16).contiguous()
        return (lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP, szb)), (
            packed.numel() * packed.element_size() + szb.numel() * 2
        )

    def fp32():
        wf = w.clone()
        return (lambda x: F.linear(x, wf)), 4 * n * k

    def dequant_int8():
        q, s = q8.clone(), s8.clone()
        return (lambda x: F.linear(x, q.to(x.dtype)) * s), n * k + 4 * n

    def fast_matvec_int8():  # gpt.fast's "matvec" trick for int8 layers: an inductor reduction, one row only
        q, s = q8.clone(), s8.clone()
        return (lambda x: _compiled_matvec_int8(x, q, s) if x.shape[0] == 1 else None), n * k + 4 * n

    ops.append(Op("aten._weight_int8pack_mm bf16 x", aten_int8, torch.bfloat16))
    ops.append(Op("gpt.fast.matvec_int8 compiled fp32 x (M=1 only)", fast_matvec_int8, torch.float32))
    ops.append(Op(f"aten._weight_int4pack_mm_for_cpu g{GROUP} bf16 x", aten_int4, torch.bfloat16))
    ops.append(Op("F.linear fp32 (4 B/weight)", fp32, torch.float32))
    ops.append(Op("int8 dequantise fallback fp32 x", dequant_int8, torch.float32))
    return ops


def bench(ops: list[Op], m: int, k: int, rounds: int, budget: float) -> dict[str, float]:
    x = torch.randn(m, k)
    reps = {}
    for op in ops:  # warm up and size each measurement to ~budget seconds
        t = op.run(x, 2)
        reps[op.name] = max(3, min(2000, int(budget / max(t, 1e-7))))
    times: dict[str, list[float]] = {op.name: [] for op in ops}
    for _ in range(rounds):
        for op in ops:
            times[op.name].append(op.run(x, reps[op.name]))
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/bench_kernels.md", help="markdown file to write")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds per setting (median reported)")
    ap.add_argument("--budget", type=float, default=0.03, help="seconds per op per round")
    args = ap.parse_args(argv)

    model, flags = cpu_header()
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    cols = [(m, t) for m in MS for t in THREADS]
    lines = [
        "# gpt.kernels microbenchmark",
        "",
        f"CPU: {model}, {torch.get_num_threads()} threads available; flags: {flags}  ",
        f"torch {torch.__version__}; gpt.kernels path: {kernels.cpu_path()} "
        f"(supported: {', '.join(kernels.supported_paths()) or 'none'})  ",
        f"Command: `python scripts/bench_kernels.py --rounds {args.rounds} --budget {args.budget}`; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        "GB/s of each op's own weight bytes (µs per call), weights from DRAM, median of interleaved rounds. "
        "'vs int8pack' is the time ratio against `aten._weight_int8pack_mm` with bf16 activations in the same "
        "setting (>1 = faster).",
        "",
    ]
    for n, k in SHAPES:
        ops = build_ops(n, k)
        results = {}
        for m, t in cols:
            torch.set_num_threads(t)
            results[(m, t)] = bench(ops, m, k, args.rounds, args.budget)
            print(f"{n}x{k} M={m} threads={t} done", file=sys.stderr)
        lines += [f"## N={n} x K={k}", ""]
        header = " | ".join(f"M={m}, {t} thr" for m, t in cols)
        lines += [f"| op | {header} | vs int8pack (M=1, 1 thr) |", "|---|" + "---|" * (len(cols) + 1)]
        for op in ops:
            cells = []
            for c in cols:
                s = results[c][op.name]
                skip = "M=1 only" in op.name and c[0] != 1
                cells.append("n/a" if skip else f"{op.nbytes / s / 1e9:.1f} ({s * 1e6:.0f})")
            ratio = results[(1, 1)]["aten._weight_int8pack_mm bf16 x"] / results[(1, 1)][op.name]
            lines.append(f"| {op.name} | " + " | ".join(cells) + f" | {ratio:.2f}x |")
        lines.append("")
        del ops
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines += [
        f"Load average (1 min) at the start {load_start:.1f}, at the end {load_end:.1f}, on "
        f"{os.cpu_count()} CPUs. On a shared machine the 2-thread columns are the least reliable: "
        "one descheduled OpenMP thread makes the whole call wait for it.",
        "",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
