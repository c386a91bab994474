"""Tensor-parallel generation: split every block of a loaded model over N processes, from outside.

    tp = init_from_env()              # under torchrun / accelerate launch: gloo on the CPU, NCCL on GPUs
    model = shard_model(model, tp)    # in place: this rank keeps 1/N of every block's weights

Megatron's split (as gpt-fast and torchtitan do it), per block:

    wq, wk, wv   column-parallel: rank r keeps heads [r·H/N, (r+1)·H/N) (and the matching kv heads)
    wo           row-parallel: the same heads' input columns; one all-reduce of the (B, T, dim) output
    w1, w3       column-parallel: a slice of the SwiGLU width
    w2           row-parallel: the matching input columns; one all-reduce

so a decode step costs two all-reduces of dim floats per token and layer, and nothing else talks.
Each rank's attention sees only its own heads: its head counts are divided by N, and the mixing
step's KV cache (allocated from its config) holds n_kv_heads / N heads. Grouped-query heads stay
with their kv head, because both are split in contiguous chunks.

The embedding, the final norm and the lm head stay whole on every rank (replicated). Sharding
the head by vocabulary would need an all-gather of the logits every step, and every rank needs
all of them anyway: each samples the next token itself from the same logits and the same seed,
so the ranks agree without sending tokens. The embedding is read one row per token, so splitting
it saves memory but no time. The price is the head's memory on every rank (the largest single
matrix of a small model); for a model that does not fit, that is the part to shard next.

The all-reduce is torch's functional collective, called from a forward hook on wo and w2: the
model code is unchanged, gpt.fast's module swaps keep the hook, and torch.compile captures the
collective inside the one decode graph (measured on gloo, torch 2.13: fullgraph, no break).

int8 layers shard like float ones (rows of qweight and scales for column-parallel layers, input
columns of qweight with the full per-row scales for row-parallel ones: each rank's partial sum is
already scaled); int4 layers shard by output rows, or by whole input groups, which needs
in_features / N to be a multiple of the group size.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gpt.errors import ParallelError
from gpt.quant import Int4Linear, Int8Linear

COLUMN = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3")
ROW = ("attention.wo", "feed_forward.w2")


@dataclass
class TPInfo:
    rank: int
    world_size: int
    group: object | None = None  # the process group (None = the default one)
    backend: str = "gloo"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_world_size() -> int:
    """The number of processes torchrun / accelerate launch started (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(device: torch.device | None = None) -> TPInfo | None:
    """Join the process group a launcher described in the environment; None for one process."""
    world = launched_world_size()
    if world <= 1:
        return None
    on_gpu = device is not None and device.type == "cuda"
    backend = "nccl" if on_gpu else "gloo"
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return TPInfo(dist.get_rank(), dist.get_world_size(), None, backend)


# -- checks --------------------------------------------------------------------------------------


def check_shardable(model: nn.Module, world_size: int) -> None:
    """One line naming what stops `model` from splitting over `world_size` ranks, or nothing."""
    c, n = model.config, world_size
    for field in ("n_heads", "n_kv_heads", "intermediate_size"):
        value = getattr(c, field)
        if value % n:
            raise ParallelError(
                f"config.json {field}={value} does not divide by {n} ranks; launch with a number of processes "
                f"that divides it (e.g. --nproc_per_node {_divisor(c.n_kv_heads, n)})"
            )
    for layer in model.layers:
        mix = layer.attention.mix
        if not getattr(mix, "head_local", False):
            raise ParallelError(
                f"attention {c.attention!r} ({type(mix).__name__}) is not head-local (head_local=False), so its "
                "heads cannot be split over ranks; run it in one process"
            )
    for name, m in model.named_modules():
        if name.endswith(ROW) and isinstance(m, Int4Linear) and m.in_features % (n * m.group_size):
            raise ParallelError(
                f"int4 layer {name}: in_features={m.in_features} does not split into {n} ranks of whole groups of "
                f"{m.group_size}; quantize with a smaller --group-size or launch fewer processes"
            )


def _divisor(k: int, n: int) -> int:
    """The largest number of ranks <= n that divides k."""
    return max(d for d in range(1, n + 1) if k % d == 0)


# -- slicing one layer ---------------------------------------------------------------------------


def _chunk(t: Tensor, dim: int, rank: int, n: int) -> Tensor:
    # clone: the slice gets memory of its own, so the full tensor is freed with the old layer
    return t.chunk(n, dim=dim)[rank].clone()


def column_shard(m: nn.Module, rank: int, n: int) -> nn.Module:
    """This rank's block of output rows of a linear / int8 / int4 layer."""
    out = m.out_features // n
    bias = m.bias is not None
    if type(m) is nn.Linear:
        new = nn.Linear(m.in_features, out, bias=bias, device="meta")
        new.weight = nn.Parameter(_chunk(m.weight.data, 0, rank, n), requires_grad=False)
    elif type(m) is Int8Linear:
        new = Int8Linear(m.in_features, out, bias=bias, device=m.qweight.device)
        new.qweight = _chunk(m.qweight, 0, rank, n)
        new.scales = _chunk(m.scales, 0, rank, n)
    elif type(m) is Int4Linear:
        new = Int4Linear(m.in_features, out, m.group_size, bias=bias, device=m.qweight.device)
        new.qweight = _chunk(m.qweight, 0, rank, n)
        new.scales_and_zeros = _chunk(m.scales_and_zeros, 1, rank, n)
    else:
        raise ParallelError(f"cannot shard a {type(m).__name__} layer; tensor parallelism takes nn.Linear, int8, int4")
    if bias:
        new.bias = nn.Parameter(_chunk(m.bias.data, 0, rank, n), requires_grad=False)
    if isinstance(new, (Int8Linear, Int4Linear)):
        new.refresh()
    return new


def row_shard(m: nn.Module, rank: int, n: int) -> nn.Module:
    """This rank's block of input columns; the bias stays on rank 0 only (it is added once by the sum)."""
    k = m.in_features // n
    if type(m) is nn.Linear:
        new = nn.Linear(k, m.out_features, bias=False, device="meta")
        new.weight = nn.Parameter(_chunk(m.weight.data, 1, rank, n), requires_grad=False)
    elif type(m) is Int8Linear:
        new = Int8Linear(k, m.out_features, bias=False, device=m.qweight.device)
        new.qweight = _chunk(m.qweight, 1, rank, n)
        new.scales = m.scales.clone()  # per output row: each rank's partial sum carries the full scale
    elif type(m) is Int4Linear:
        new = Int4Linear(k, m.out_features, m.group_size, bias=False, device=m.qweight.device)
        new.qweight = _chunk(m.qweight, 1, rank, n)  # two columns per byte: whole groups, so whole bytes
        new.scales_and_zeros = _chunk(m.scales_and_zeros, 0, rank, n)
    else:
        raise ParallelError(f"cannot shard a {type(m).__name__} layer; tensor parallelism takes nn.Linear, int8, int4")
    if m.bias is not None and rank == 0:
        new.bias = nn.Parameter(m.bias.data.clone(), requires_grad=False)
    if isinstance(new, (Int8Linear, Int4Linear)):
        new.refresh()
    return new


# -- the transform -------------------------------------------------------------------------------


def _all_reduce_hook(group):
    import torch.distributed._functional_collectives as funcol

    group = group if group is not None else dist.group.WORLD

    def hook(module: nn.Module, args, output: Tensor) -> Tensor:
        return funcol.all_reduce(output, "sum", group)

    return hook


def shard_model(model: nn.Module, tp: TPInfo) -> nn.Module:
    """Split every block of `model` (in place) into this rank's part; returns `model`.

    The caller's model becomes a shard: load the checkpoint on every rank, then call this. The
    output of every rank's forward is the whole model's (the full logits).
    """
    n, rank = tp.world_size, tp.rank
    check_shardable(model, n)
    hook = _all_reduce_hook(tp.group)
    c = model.config
    local = dataclasses.replace(c, n_heads=c.n_heads // n, n_kv_heads=c.n_kv_heads // n, head_dim=c.head_dim)
    for layer in model.layers:
        for path in COLUMN + ROW:
            parent_name, _, child = path.rpartition(".")
            parent = layer.get_submodule(parent_name)
            old = getattr(parent, child)
            new = column_shard(old, rank, n) if path in COLUMN else row_shard(old, rank, n)
            if path in ROW:
                new.register_forward_hook(hook)
            setattr(parent, child, new)
        attn = layer.attention
        attn.n_heads, attn.n_kv_heads = local.n_heads, local.n_kv_heads
        attn.mix.config = local  # the KV cache (and a variant's own state) is sized from it
        attn.mix.clear_cache()
    model.clear_caches()
    model.tp = tp  # marks the model as a shard, for whoever holds it
    return model


def sharded_bytes(model: nn.Module) -> int:
    """Bytes of the stored tensors of the sharded layers (the blocks' projections) on this rank."""
    total = 0
    for layer in model.layers:
        for path in COLUMN + ROW:
            for t in layer.get_submodule(path).state_dict().values():
                total += t.numel() * t.element_size()
    return total


def broadcast_seed(seed: int | None, tp: TPInfo | None) -> int | None:
    """Every rank must sample with the same seed: rank 0 picks one when none is given."""
    if tp is None:
        return seed
    box = [seed if seed is not None else int(torch.randint(0, 2**31 - 1, ()).item()) if tp.is_main else None]
    dist.broadcast_object_list(box, src=0, group=tp.group)
    return box[0]
