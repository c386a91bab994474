"""Batch-1 greedy decoding speed of fp32, bf16, int8 and int4 weights (random weights, compiled step).

    python scripts/bench_quant.py                                    # stories15M and stories110M, 200 tokens
    python scripts/bench_quant.py --presets stories15M --tokens 50 --repeats 1    # a quick check

Every row decodes the same prompt with a `torch.compile(fullgraph=True)` one-token step over
a static KV cache. tokens/s counts decoding only (the prefill is timed separately as time to
first token); GB/s = bytes of weights read per token × tokens/s. The int8/int4 rows run with
bf16 activations (the packed CPU kernels' dtype). If torchao is installed, its int8 weight-only
quantisation of the same model is a peer row. Writes a markdown table (--out).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpt.config import PRESETS, from_preset  # noqa: E402
from gpt.model import Transformer  # noqa: E402
from gpt.quant import QUANT_LAYERS, cast_float_params, quantize_model  # noqa: E402

VARIANTS = ("fp32", "bf16", "int8", "int4", "torchao-int8")
REFS = ("bf16", "fp32")  # the ratio columns


def decode_bytes(model: Transformer) -> int:
    """Bytes read per decoded token: every tensor once, minus the embedding table (one row is
    gathered) unless it is also the lm head; quantised layers count what their kernel reads
    (the packed weight and the bf16 scale copies), not the fp32 scales stored in the file."""
    head = model.output
    tied_float_head = not isinstance(head, QUANT_LAYERS) and head.weight is model.tok_embeddings.weight
    tensors = {}
    for name, t in model.state_dict().items():
        if name != "tok_embeddings.weight" or tied_float_head:
            tensors[name] = t
    for prefix, m in model.named_modules():
        if isinstance(m, QUANT_LAYERS):
            kernel = {n: b for n, b in m.named_buffers() if n.startswith("_kernel") and b is not None}
            if kernel:
                for n in ("qweight", "scales", "scales_and_zeros"):
                    tensors.pop(f"{prefix}.{n}", None)
                tensors.update({f"{prefix}.{n}": b for n, b in kernel.items()})
                if "_kernel_weight" not in kernel:  # int8 reads its stored qweight
                    tensors[f"{prefix}.qweight"] = m.qweight
    seen, total = set(), 0
    for t in tensors.values():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def build(base: Transformer, variant: str, group_size: int) -> tuple[Transformer, int]:
    model = copy.deepcopy(base)
    if variant == "fp32":
        return model, decode_bytes(model)
    if variant == "bf16":
        model = model.to(torch.bfloat16)
        return model, decode_bytes(model)
    if variant in ("int8", "int4"):
        quantize_model(model, variant, group_size)
        return cast_float_params(model, torch.bfloat16), decode_bytes(model)
    # torchao's int8 weight-only: int8 weights + one scale per output channel, like ours, so the same bytes
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    ours = copy.deepcopy(base)
    quantize_model(ours, "int8")
    model = model.to(torch.bfloat16)
    quantize_(model, Int8WeightOnlyConfig())
    return model, decode_bytes(cast_float_params(ours, torch.bfloat16))


def bench(model: Transformer, prompt: torch.Tensor, tokens: int, repeats: int) -> dict[str, float]:
    """Compile the step, then time `repeats` generations of `tokens` tokens (medians)."""
    t_prompt = prompt.size(1)
    model.setup_caches(1, t_prompt + tokens)

    def step(tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return model(tok, pos)[:, -1].argmax(-1, keepdim=True)

    compiled = torch.compile(step, fullgraph=True, dynamic=False)

    def generate() -> tuple[float, float, torch.Tensor]:
        t0 = time.perf_counter()
        tok = model(prompt, torch.arange(t_prompt))[:, -1].argmax(-1, keepdim=True)
        t1 = time.perf_counter()
        out = [tok]
        for i in range(tokens - 1):
            tok = compiled(tok, torch.tensor([t_prompt + i]))
            out.append(tok)
        return t1 - t0, time.perf_counter() - t1, torch.cat(out, 1)

    with torch.no_grad():
        t0 = time.perf_counter()
        compiled(prompt[:, -1:], torch.tensor([t_prompt]))  # compile (and warm) outside the timing
        compile_s = time.perf_counter() - t0
        generate()
        runs = [generate() for _ in range(repeats)]
    model.clear_caches()
    ttft = statistics.median(r[0] for r in runs)
    decode = statistics.median(r[1] for r in runs)
    return {"tok_s": (tokens - 1) / decode, "ttft_ms": 1000 * ttft, "compile_s": compile_s}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["stories15M", "stories110M"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), help=f"subset of {', '.join(VARIANTS)}")
    ap.add_argument("--tokens", type=int, default=200, help="tokens to generate per run")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per row (median)")
    ap.add_argument("--group-size", type=int, default=32, help="int4 group size")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's; use 1 on a busy machine)"
    )
    ap.add_argument("--out", default="out/bench_quant.md")
    args = ap.parse_args(argv)
    for p in args.presets:
        if p not in PRESETS:
            print(f"error: unknown preset {p!r}; available: {', '.join(PRESETS)}", file=sys.stderr)
            return 2
    bad = sorted(set(args.variants) - set(VARIANTS))
    if bad:
        print(f"error: unknown variant(s) {', '.join(bad)}; available: {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    variants = list(args.variants)
    if "torchao-int8" in variants:
        try:
            import torchao  # noqa: F401
        except ImportError:
            print("note: torchao is not installed; skipping the torchao-int8 row (pip install torchao)")
            variants.remove("torchao-int8")
    if args.threads:
        torch.set_num_threads(args.threads)

    lines = [
        f"Batch 1, greedy, {args.tokens} new tokens after a {args.prompt_len}-token prompt, compiled decode step, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, int4 group size {args.group_size}, "
        f"median of {args.repeats}.",
        "",
        "| shape | weights | MB/token | tok/s | GB/s | × bf16 | × fp32 | TTFT ms | compile s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for preset in args.presets:
        torch.manual_seed(0)
        config = from_preset(preset, max_seq_len=args.prompt_len + args.tokens)
        base = Transformer(config).eval()
        prompt = torch.randint(0, config.vocab_size, (1, args.prompt_len))
        rows = {}
        for variant in variants:
            torch._dynamo.reset()
            model, nbytes = build(base, variant, args.group_size)
            r = bench(model, prompt, args.tokens, args.repeats)
            r["mb"] = nbytes / 1e6
            rows[variant] = r
            print(f"{preset} {variant}: {r['tok_s']:.1f} tok/s (compile {r['compile_s']:.0f}s)", flush=True)
            del model
        for variant, r in rows.items():
            vs_bf16, vs_fp32 = (f"{r['tok_s'] / rows[ref]['tok_s']:.2f}" if ref in rows else "-" for ref in REFS)
            lines.append(
                f"| {preset} | {variant} | {r['mb']:.1f} | {r['tok_s']:.1f} | {r['mb'] * r['tok_s'] / 1e3:.2f} | "
                f"{vs_bf16} | {vs_fp32} | {r['ttft_ms']:.1f} | {r['compile_s']:.0f} |"
            )
    table = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    print(table)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
