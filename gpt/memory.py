"""Per-rank memory of a training or generation run, from the shape alone (nothing is allocated).

    python -m gpt.memory --preset llama-3-8b --dtype bf16 --tp 2 --fsdp 8 --batch-size 1 --seq-len 8192

Training   weights + gradients + AdamW state + activations (+ FSDP's gathered Block)
Generation weights + KV cache

How each line is counted, per rank:
- weights: the projections of every block split over --tp (gpt.tp: column / row parallel), the
  embedding, norms and head whole on every tensor-parallel rank; then every tensor split over
  --fsdp the way fully_shard does it (dim 0 in N chunks of ceil(rows / N), padded).
- gradients: one per weight, in the weights' dtype. AdamW: exp_avg and exp_avg_sq in the weights'
  dtype plus one fp32 `step` per tensor (torch.optim.AdamW).
- activations: the tensors autograd keeps for the backward of this model's forward (SDPA
  attention, no activation checkpointing), per rank for its own batch. The coefficients are this
  code's, read off torch's saved-tensor hooks (tests/test_memory.py checks them at other shapes):
  per token and layer (6s+8)·dim + 2s·kv_dim + 4s·ffn + 4·heads + 8 bytes, s = the dtype's size
  (fp32 copies in RMSNorm, RoPE and the attention's log-sum-exp), plus (2s+4)·dim + 4·vocab + 12
  per token outside the blocks (the fp32 log-softmax of the loss) and the RoPE tables. Under --tp
  the head and SwiGLU terms divide by tp; the dim terms are kept whole (an upper bound: the query
  side of attention is split too).
- FSDP all-gathers one Block's full weights before its forward and backward: its size is added
  as "FSDP gathered block" (torch prefetches the next one too: up to twice that).
- KV cache: 2 · layers · batch · (kv_heads / tp) · seq_len · head_dim in the activation dtype.
Not counted: the CUDA context and allocator slack, the framework (~0.3-1 GB), temporary buffers.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gpt.cli import DTYPES, Parser, main_guard
from gpt.config import PRESETS, ModelConfig, from_preset
from gpt.errors import CliError

BLOCK_SHARDED = ("wq", "wk", "wv", "w1", "w3")  # column-parallel: rows split over tp
BLOCK_ROW = ("wo", "w2")  # row-parallel: columns split over tp
ADAM_STEP_BYTES = 4  # torch.optim.AdamW keeps `step` as a float32 tensor per parameter


@dataclass
class Plan:
    config: ModelConfig
    dtype: torch.dtype = torch.bfloat16
    tp: int = 1
    fsdp: int = 1
    batch_size: int = 1  # per rank (per data-parallel rank: a tensor-parallel group shares one batch)
    seq_len: int = 2048

    def validate(self) -> None:
        c = self.config
        for name in ("tp", "fsdp", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise CliError(f"--{name.replace('_', '-')}={getattr(self, name)} must be >= 1")
        for field in ("n_heads", "n_kv_heads", "intermediate_size"):
            if getattr(c, field) % self.tp:
                raise CliError(f"--tp {self.tp} does not divide {field}={getattr(c, field)}; choose a divisor")
        if self.seq_len > c.max_seq_len:
            raise CliError(f"--seq-len {self.seq_len} exceeds the model's max_seq_len {c.max_seq_len}")


def weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every stored weight of the model and its shape (built on the meta device: no memory)."""
    from gpt.model import Transformer

    with torch.device("meta"):
        model = Transformer(config)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}  # a tied weight once


def tp_shape(name: str, shape: tuple[int, ...], tp: int) -> tuple[int, ...]:
    leaf = name.rsplit(".", 2)[-2] if name.endswith(".weight") else ""
    if ".layers." not in f".{name}" or tp == 1:
        return shape
    if leaf in BLOCK_SHARDED:
        return (shape[0] // tp, *shape[1:])
    if leaf in BLOCK_ROW:
        return (shape[0], shape[1] // tp)
    return shape  # the blocks' norms stay whole


def fsdp_numel(shape: tuple[int, ...], n: int) -> int:
    """Elements one rank allocates for a tensor fully_shard splits over n ranks (dim 0, padded)."""
    rest = math.prod(shape[1:])
    return math.ceil(shape[0] / n) * rest


def weight_elements(plan: Plan, only_block: int | None = None) -> int:
    """This rank's weight elements (or, with only_block=i, block i's elements before FSDP splits it)."""
    total = 0
    for name, shape in weight_shapes(plan.config).items():
        if only_block is not None and not name.startswith(f"layers.{only_block}."):
            continue
        local = tp_shape(name, shape, plan.tp)
        total += math.prod(local) if only_block is not None else fsdp_numel(local, plan.fsdp)
    return total


def activation_bytes(plan: Plan) -> int:
    """What autograd keeps for the backward of one forward on this rank's batch (see the module doc)."""
    c, s, tp = plan.config, torch.empty((), dtype=plan.dtype).element_size(), plan.tp
    d, kv, ffn, h = c.dim, c.n_kv_heads * c.head_dim // tp, c.intermediate_size // tp, c.n_heads // tp
    per_layer = (6 * s + 8) * d + 2 * s * kv + 4 * s * ffn + 4 * h + 8
    per_token = c.n_layers * per_layer + (2 * s + 4) * d + 4 * c.vocab_size + 12
    return plan.batch_size * plan.seq_len * per_token + 2 * s * plan.seq_len * c.head_dim + 4


def kv_cache_bytes(plan: Plan) -> int:
    c, s = plan.config, torch.empty((), dtype=plan.dtype).element_size()
    return 2 * c.n_layers * plan.batch_size * (c.n_kv_heads // plan.tp) * plan.seq_len * c.head_dim * s


def estimate(plan: Plan) -> dict[str, dict[str, int]]:
    """{"training": {line: bytes}, "generation": {line: bytes}} for one rank."""
    plan.validate()
    s = torch.empty((), dtype=plan.dtype).element_size()
    weights = weight_elements(plan) * s
    n_tensors = len(weight_shapes(plan.config))
    training = {
        "weights": weights,
        "gradients": weights,
        "AdamW state": 2 * weights + ADAM_STEP_BYTES * n_tensors,
        "activations": activation_bytes(plan),
    }
    if plan.fsdp > 1:
        training["FSDP gathered block"] = weight_elements(plan, only_block=0) * s
    generation = {
        "weights": weight_elements(Plan(plan.config, plan.dtype, plan.tp)) * s,
        "KV cache": kv_cache_bytes(plan),
    }
    return {"training": training, "generation": generation}


def format_table(plan: Plan, est: dict[str, dict[str, int]]) -> str:
    c = plan.config
    dtype = {v: k for k, v in DTYPES.items()}[plan.dtype]
    head = (
        f"per rank: {dtype}, tp {plan.tp} x fsdp {plan.fsdp} = {plan.tp * plan.fsdp} ranks, batch {plan.batch_size} "
        f"x {plan.seq_len} tokens, {c.n_layers} layers, dim {c.dim}, {c.n_heads}/{c.n_kv_heads} heads"
    )
    lines = [head]
    for title, rows in (("training", est["training"]), ("generation (weights not FSDP-sharded)", est["generation"])):
        lines += ["", f"{title:<40}{'GiB':>10}"]
        lines += [f"  {name:<38}{b / 2**30:>10.2f}" for name, b in rows.items()]
        lines.append(f"  {'total':<38}{sum(rows.values()) / 2**30:>10.2f}")
    return "\n".join(lines)


def run(argv: Sequence[str] | None = None) -> int:
    ap = Parser(prog="python -m gpt.memory", description=__doc__)
    ap.add_argument("--preset", default="llama-3-8b", choices=tuple(PRESETS), help="model shape")
    ap.add_argument("--dtype", default="bf16", choices=tuple(DTYPES), help="weights and activations (default bf16)")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (gpt.tp's split)")
    ap.add_argument("--fsdp", type=int, default=1, help="ranks fully_shard splits the weights over (training)")
    ap.add_argument("--batch-size", type=int, default=1, help="sequences per data-parallel rank")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the context)")
    args = ap.parse_args(argv)
    config = from_preset(args.preset)
    plan = Plan(config, DTYPES[args.dtype], args.tp, args.fsdp, args.batch_size, args.seq_len or config.max_seq_len)
    print(format_table(plan, estimate(plan)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return main_guard(run, argv)


if __name__ == "__main__":
    sys.exit(main())
