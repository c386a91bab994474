"""Tensor-parallel generation (gpt.tp): two CPU ranks on gloo against one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from gpt.checkpoint import load_checkpoint, quantize_checkpoint, save_checkpoint
from gpt.config import from_preset
from gpt.errors import CliError, ParallelError
from gpt.generation import Generator
from gpt.model import Transformer
from gpt.quant import Int4Linear, Int8Linear
from gpt.tokenizer import CharTokenizer
from gpt.tp import check_shardable, column_shard, row_shard

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
PROMPT = "the quick brown fox"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tp")
    tok = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz .,\n")
    torch.manual_seed(0)
    model = Transformer(from_preset("tiny", vocab_size=tok.vocab_size)).eval()
    float_dir = save_checkpoint(root / "float", model, tok)
    int8_dir, _ = quantize_checkpoint(float_dir, root / "int8", "int8")
    int4_dir, _ = quantize_checkpoint(float_dir, root / "int4", "int4", 32)
    return {"float": float_dir, "int8": int8_dir, "int4": int4_dir}


@pytest.fixture(scope="module")
def worker(checkpoints, tmp_path_factory) -> dict[str, list[dict]]:
    """tests/tp_worker.py once for both checkpoints: the reference, eager and compiled runs per rank."""
    out = tmp_path_factory.mktemp("tp-out") / "out.json"
    cmd = [*TORCHRUN, str(ROOT / "tests" / "tp_worker.py"), str(out), "7", "24"]
    cmd += [str(checkpoints["float"]), str(checkpoints["int8"]), f"{checkpoints['int4']}:eager"]
    subprocess.run(cmd, check=True, timeout=600, env=_env(), cwd=ROOT, capture_output=True)
    data = json.loads(out.read_text())
    return {kind: data[str(path)] for kind, path in checkpoints.items()}


@pytest.mark.slow
def test_tp_int4_greedy_equals_one_process_eager(worker):
    """int4 shards by output rows and by whole input groups (wo: 32 inputs per rank = one group)."""
    for rank in worker["int4"]:
        assert rank["eager"]["tokens"] == rank["reference"]
        assert rank["eager"]["max_abs_diff"] < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["float", "int8"])
@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_tp_greedy_equals_one_process(worker, kind, mode):
    for rank in worker[kind]:
        assert rank[mode]["tokens"] == rank["reference"]
        assert rank[mode]["max_abs_diff"] < 1e-5  # fp32 logits of every step
    if mode == "compiled":
        assert all(rank["compiled"]["graphs"] == 1 for rank in worker[kind])  # the all-reduces inside one graph


@pytest.mark.slow
def test_each_rank_holds_half_of_the_sharded_layers(worker):
    c = from_preset("tiny")
    for rank in worker["float"]:
        assert 2 * rank["rank_bytes"] == rank["full_bytes"]
        assert rank["kv_heads_per_rank"] == c.n_kv_heads // 2
    # int8: qweight and the column-parallel scales split; a row-parallel layer keeps its per-row scales
    replicated_scales = c.n_layers * 2 * c.dim * 4
    for rank in worker["int8"]:
        assert 2 * rank["rank_bytes"] == rank["full_bytes"] + replicated_scales


def _generate_json(cmd: list[str], env: dict[str, str]) -> dict:
    proc = subprocess.run(cmd, check=True, timeout=600, env=env, cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, proc.stdout  # only rank 0 prints
    return json.loads(lines[0])


def _one_process(checkpoint: Path, **kwargs) -> list[int]:
    model, tok = load_checkpoint(checkpoint)
    seed = kwargs.pop("seed", None)
    return Generator(model, tok, **kwargs).generate([PROMPT], 20, seed=seed).tokens[0]


@pytest.mark.slow
def test_torchrun_generate_compiled_matches_one_process(checkpoints):
    args = ["--checkpoint", str(checkpoints["float"]), "--prompt", PROMPT, "--max-new-tokens", "20"]
    out = _generate_json([*TORCHRUN, "generate.py", *args, "--temperature", "0", "--compile", "--json"], _env())
    assert out["report"]["tensor_parallel"] == 2 and out["report"]["compiled"]
    assert out["samples"][0]["tokens"] == _one_process(checkpoints["float"], temperature=0)


@pytest.mark.slow
def test_accelerate_launch_samples_like_one_process(checkpoints):
    """Sampling: every rank draws from the same logits with the same seed, so the ranks agree and
    match one process."""
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    accelerate += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port"]
    accelerate += [str(_free_port()), "generate.py"]
    args = ["--checkpoint", str(checkpoints["int8"]), "--prompt", PROMPT, "--max-new-tokens", "20", "--seed", "3"]
    out = _generate_json([*accelerate, *args, "--json"], {**_env(), "ACCELERATE_USE_CPU": "1"})
    assert out["report"]["tensor_parallel"] == 2
    # int8 on the CPU kernels: activations are rounded per shard, so compare tokens only
    assert out["samples"][0]["tokens"] == _one_process(checkpoints["int8"], seed=3)


# -- the sharded layers, in one process --------------------------------------------------------


def _layers():
    torch.manual_seed(0)
    lin = nn.Linear(128, 64, bias=True)
    i8 = Int8Linear.from_linear(lin)
    i4 = Int4Linear.from_linear(lin, 32)
    for m in (i8, i4):  # their fp32 dequantise path: exact sums
        m.use_kernel, m._packed, m._kernel_weight = False, None, None
    return lin, i8, i4


@pytest.mark.parametrize("which", [0, 1, 2], ids=["float", "int8", "int4"])
def test_shards_recombine_to_the_full_layer(which):
    full = _layers()[which]
    x = torch.randn(3, 128)
    want = full(x)
    cols = [column_shard(full, r, 2) for r in range(2)]
    rows = [row_shard(full, r, 2) for r in range(2)]
    for m in cols + rows:
        if isinstance(m, (Int8Linear, Int4Linear)):
            m.use_kernel, m._packed, m._kernel_weight = False, None, None
    torch.testing.assert_close(torch.cat([m(x) for m in cols], -1), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(rows[0](x[:, :64]) + rows[1](x[:, 64:]), want, rtol=0, atol=1e-5)


# -- refusals: one line each --------------------------------------------------------------------


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_refuses_heads_that_do_not_divide():
    model = Transformer(from_preset("tiny"))  # 4 heads, 2 kv heads
    with pytest.raises(ParallelError) as e:
        check_shardable(model, 4)
    assert "n_kv_heads=2 does not divide by 4" in _one_line(e)
    with pytest.raises(ParallelError) as e:
        check_shardable(Transformer(from_preset("tiny", n_kv_heads=4, n_heads=4)), 3)
    assert "n_heads=4" in _one_line(e)


@pytest.mark.parametrize("attention", ["alibi", "sinks"])
def test_refuses_a_variant_that_is_not_head_local(attention):
    model = Transformer(from_preset("tiny", attention=attention, pos_encoding="none"))
    with pytest.raises(ParallelError) as e:
        check_shardable(model, 2)
    assert "not head-local" in _one_line(e)


def test_head_local_variants_pass():
    for attention in ("sdpa", "math", "differential", "linear", "sliding_window"):
        check_shardable(Transformer(from_preset("tiny", attention=attention)), 2)


def test_refuses_int4_groups_that_straddle_ranks():
    from gpt.quant import quantize_model

    model = Transformer(from_preset("tiny", dim=64))
    quantize_model(model, "int4", 64)  # wo has 64 inputs: 32 per rank, half a group
    with pytest.raises(ParallelError) as e:
        check_shardable(model, 2)
    assert "whole groups of 64" in _one_line(e)


def test_generate_refuses_serve_and_interactive_under_a_launcher(monkeypatch, checkpoints):
    import generate

    monkeypatch.setenv("WORLD_SIZE", "2")
    for flag in ("--serve", "--interactive"):
        with pytest.raises(CliError) as e:
            generate.run(["--checkpoint", str(checkpoints["float"]), flag])
        assert flag in _one_line(e)
