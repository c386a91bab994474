"""gpt.memory's estimates against what torch actually holds for small shapes on the CPU."""

from __future__ import annotations

import pytest
import torch

from gpt.config import ModelConfig
from gpt.errors import CliError
from gpt.generation import kv_cache_bytes
from gpt.memory import Plan, activation_bytes, estimate, fsdp_numel, main
from gpt.model import Transformer
from gpt.tp import TPInfo, shard_model
from gpt.training import TrainConfig, make_optimizer

SHAPES = [  # none of these were used to read off the activation coefficients
    dict(vocab_size=80, dim=48, n_layers=2, n_heads=3, n_kv_heads=1, intermediate_size=160),
    dict(vocab_size=130, dim=96, n_layers=3, n_heads=4, n_kv_heads=4, intermediate_size=256, tie_embeddings=True),
]


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_weights_gradients_and_adamw_state_are_exact(shape, dtype):
    model = Transformer(ModelConfig(**shape, max_seq_len=64)).to(dtype)
    opt = make_optimizer(model, TrainConfig())
    idx = torch.randint(0, shape["vocab_size"], (2, 16))
    model(idx, targets=idx)[1].backward()
    opt.step()
    est = estimate(Plan(model.config, dtype, batch_size=2, seq_len=16))["training"]
    assert est["weights"] == _tensor_bytes(model.parameters())
    assert est["gradients"] == _tensor_bytes(p.grad for p in model.parameters())
    assert est["AdamW state"] == _tensor_bytes(v for state in opt.state.values() for v in state.values())


def saved_for_backward(model: Transformer, b: int, t: int) -> int:
    """Bytes of the tensors autograd saves in one training forward (each storage once, weights excluded)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    weights |= {buf.untyped_storage().data_ptr() for buf in model.buffers()}
    seen: dict[int, int] = {}

    def pack(x):
        storage = x.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return x

    idx = torch.randint(0, model.config.vocab_size, (b, t))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        model(idx, targets=idx)
    return sum(n for ptr, n in seen.items() if ptr not in weights)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("b, t", [(1, 64), (3, 40)])
def test_activations_match_the_saved_tensors(shape, dtype, b, t):
    """The measurement: autograd's saved-tensor hooks (tracemalloc does not see torch's CPU allocator).
    Stated tolerance 1 %; on these shapes the formula is exact."""
    model = Transformer(ModelConfig(**shape, max_seq_len=64)).to(dtype)
    measured = saved_for_backward(model, b, t)
    predicted = activation_bytes(Plan(model.config, dtype, batch_size=b, seq_len=t))
    assert predicted == pytest.approx(measured, rel=0.01)


def test_kv_cache_and_tensor_parallel_weights_match_a_shard():
    config = ModelConfig(**SHAPES[1], max_seq_len=64)
    model = Transformer(config).eval()
    shard_model(model, TPInfo(rank=1, world_size=2))  # no forward: the process group is never needed
    model.setup_caches(3, 64)
    est = estimate(Plan(config, torch.float32, tp=2, batch_size=3, seq_len=64))["generation"]
    assert est["weights"] == _tensor_bytes(model.parameters())
    assert est["KV cache"] == kv_cache_bytes(model, 3)


def test_fsdp_shards_like_torch_chunk():
    """fully_shard splits dim 0 as torch.chunk does and pads every rank to the largest chunk."""
    for rows, n in ((96, 8), (100, 8), (7, 2), (3, 4)):
        biggest = max(c.size(0) for c in torch.empty(rows, 5).chunk(n))
        assert fsdp_numel((rows, 5), n) == biggest * 5


def test_cli_prints_the_table(capsys):
    assert main(["--preset", "llama-3-8b", "--dtype", "bf16", "--tp", "2", "--fsdp", "8", "--seq-len", "8192"]) == 0
    out = capsys.readouterr().out
    assert "tp 2 x fsdp 8 = 16 ranks" in out and "KV cache" in out and "AdamW state" in out
    # llama-3-8b: 8.03e9 parameters; tp 2 halves the blocks (6.98e9), the embedding and head (1.05e9) stay
    weights_tp2 = float(out.split("generation")[1].split("\n  weights")[1].split()[0])
    assert weights_tp2 == pytest.approx((6.98e9 / 2 + 1.05e9) * 2 / 2**30, rel=0.01)


def test_cli_refusals_are_one_line(capsys):
    assert main(["--preset", "llama-3-8b", "--tp", "3"]) != 0
    err = capsys.readouterr().err.strip()
    assert "--tp 3 does not divide n_heads=32" in err and "\n" not in err
    with pytest.raises(CliError):
        estimate(Plan(ModelConfig(**SHAPES[0]), seq_len=10**6))
