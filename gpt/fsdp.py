"""Fully sharded training with torch's own FSDP2 (`fully_shard`), applied from outside the model.

    shard_for_training(model, device)     # fully_shard per Block, then the whole model
    full_state(model)                     # the gathered weights (rank 0), for best/ and latest/
    save_sharded(model, opt, dir) / load_sharded(model, opt, dir)   # resume state, one shard per rank

Each rank keeps 1/N of every parameter, its gradient and its AdamW moments; a Block's weights
are all-gathered just before its forward (and again for its backward) and its gradients
reduce-scattered (averaged) right after. Sharding each Block on its own bounds the gathered
weights to about one Block at a time; the root `fully_shard` takes what is left (embedding,
final norm, head).

Why here and not accelerate's FSDP plugin: on the CPU accelerate's FSDP1 fails at construction and
its FSDP2 silently trains as DDP, while `fully_shard` on a CPU device mesh over gloo works. So
train_ddp.py --fsdp keeps accelerate as the launcher, for the process group, autocast and the RNG
state, and does the sharding itself; accelerate does not wrap this model in DDP. On GPUs the same
flag works (NCCL mesh); accelerate's own FSDP2 plugin (--config_file scripts/accelerate/fsdp.yaml)
remains the other GPU path. The resume state is torch.distributed.checkpoint's sharded format
(each rank writes its own shard), so a resume needs the same number of ranks, as DDP's does.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gpt.errors import ParallelError

SHARDED_DIR = "fsdp"  # inside state/: torch.distributed.checkpoint's files (.metadata, __<rank>_0.distcp)


def shard_for_training(model: nn.Module, device: torch.device) -> nn.Module:
    """fully_shard every Block, then the model (in place; parameters become DTensor shards)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized() or dist.get_world_size() < 2:
        raise ParallelError(
            "--fsdp shards over ranks: launch it with accelerate launch --num_processes N (N >= 2; on the CPU "
            "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu ...)"
        )
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_state(model: nn.Module) -> dict[str, Tensor]:
    """The full weights on the CPU, on rank 0 (an empty dict elsewhere). A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Every rank writes its shard of the weights and of the optimizer state into `directory`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(directory))


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """The inverse of save_sharded, in place (same number of ranks)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
