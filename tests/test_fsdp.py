"""train_ddp.py --fsdp (gpt.fsdp: torch's fully_shard) on two CPU ranks under accelerate launch,
against one process that trains on the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gpt.checkpoint import load_checkpoint
from gpt.config import from_preset
from gpt.data import get_batch, load_split
from gpt.model import Transformer
from gpt.tokenizer import load_tokenizer
from gpt.training import TrainConfig, batch_generator, lr_at, make_optimizer

ROOT = Path(__file__).resolve().parent.parent
STEPS, EVAL_EVERY = 6, 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flags(data_dir: Path, out: Path, steps: int) -> list[str]:
    return [
        "--preset", "tiny", "--data-dir", str(data_dir), "--out", str(out), "--batch-size", "4",
        "--block-size", "32", "--warmup-steps", "2", "--eval-iters", "2", "--peak-tflops", "1",
        "--max-steps", str(steps), "--decay-steps", str(STEPS), "--eval-interval", str(EVAL_EVERY),
        "--grad-accum", "2", "--no-progress", "--fsdp",
    ]  # fmt: skip


def launch(args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["--main_process_port", str(_free_port()), "train_ddp.py", *args]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1"}
    env.pop("ACCELERATE_USE_FSDP", None)
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(shakespeare_char_dir, tmp_path_factory) -> dict[str, Path]:
    """Straight: STEPS steps. Split: STEPS/2 steps, then --resume for the rest."""
    root = tmp_path_factory.mktemp("fsdp")
    launch(flags(shakespeare_char_dir, root / "straight", STEPS))
    launch(flags(shakespeare_char_dir, root / "split", STEPS // 2))
    launch([*flags(shakespeare_char_dir, root / "split", STEPS), "--resume"])
    return {"straight": root / "straight", "split": root / "split", "data": shakespeare_char_dir}


@pytest.fixture(scope="module")
def reference(runs) -> tuple[list[dict], Transformer]:
    return one_process_reference(runs["data"])


def one_process_reference(data_dir: Path) -> tuple[list[dict], Transformer]:
    """What the trainer does, in one process, on the global batch of both ranks: rank r's micro-batches
    (2 per rank) are four accumulated here; the eval averages both ranks' batches."""
    cfg = TrainConfig(preset="tiny", batch_size=4, block_size=32, warmup_steps=2, max_steps=STEPS, decay_steps=STEPS)
    train, val = load_split(data_dir, "train"), load_split(data_dir, "val")
    torch.manual_seed(cfg.seed)
    model = Transformer(from_preset("tiny", vocab_size=load_tokenizer(data_dir).vocab_size))
    opt = make_optimizer(model, cfg)
    out = []
    for step in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg, STEPS)
        for rank in (0, 1):
            for micro in (0, 1):
                x, y = get_batch(train, 4, 32, batch_generator(cfg.seed, rank, step, micro))
                (model(x, targets=y)[1] / 4).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % EVAL_EVERY == 0:
            model.eval()
            row = {"step": step + 1}
            with torch.no_grad():
                for split, data in (("train", train), ("val", val)):
                    batches = [
                        get_batch(data, 4, 32, batch_generator(cfg.seed, r, 0, i, f"eval-{split}"))
                        for r in (0, 1)
                        for i in range(2)
                    ]
                    losses = [model(x, targets=y)[1] for x, y in batches]
                    row[f"{split}_loss"] = float(torch.stack(losses).mean())
            model.train()
            out.append(row)
    return out, model


@pytest.mark.slow
def test_fsdp_losses_equal_one_process_on_the_global_batch(runs, reference):
    want, _ = reference
    got = rows(runs["straight"])
    assert [r["step"] for r in got] == [r["step"] for r in want] == [3, 6]
    for g, w in zip(got, want, strict=True):
        assert g["train_loss"] == pytest.approx(w["train_loss"], abs=1e-5)
        assert g["val_loss"] == pytest.approx(w["val_loss"], abs=1e-5)


@pytest.mark.slow
def test_fsdp_checkpoint_is_the_full_model(runs, reference):
    _, ref = reference
    model, _ = load_checkpoint(runs["straight"] / "latest")  # the normal loader, strict
    for (name, p), (_, q) in zip(model.state_dict().items(), ref.state_dict().items(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=0, msg=name)
    run = json.loads((runs["straight"] / "run.json").read_text())
    local = [c[2] for c in run["rank_param_checksums"]]  # sum of squares of each rank's shard
    full = sum(float(p.detach().double().pow(2).sum()) for p in model.parameters())
    assert local[0] != local[1] and sum(local) == pytest.approx(full, rel=1e-9)  # each rank held its own part


@pytest.mark.slow
def test_fsdp_compiled_trains_like_eager(runs, tmp_path):
    """torch.compile over the fully_shard-ed model (a graph per Block between FSDP's hooks)."""
    launch([*flags(runs["data"], tmp_path / "compiled", STEPS // 2), "--compile"])
    got, want = rows(tmp_path / "compiled")[0], rows(runs["straight"])[0]
    assert got["step"] == want["step"] == STEPS // 2
    assert got["train_loss"] == pytest.approx(want["train_loss"], abs=1e-4)
    assert got["val_loss"] == pytest.approx(want["val_loss"], abs=1e-4)


@pytest.mark.slow
def test_fsdp_resume_is_exact(runs):
    a, b = rows(runs["straight"]), rows(runs["split"])
    assert [r["step"] for r in b] == [3, 6]
    for x, y in zip(a, b, strict=True):
        assert x["train_loss"] == y["train_loss"] and x["val_loss"] == y["val_loss"]
    wa = load_file(runs["straight"] / "latest" / "model.safetensors")
    wb = load_file(runs["split"] / "latest" / "model.safetensors")
    assert set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert sorted(p.name for p in (runs["split"] / "state" / "fsdp").glob("*.distcp")) == [
        "__0_0.distcp",
        "__1_0.distcp",
    ]


def test_fsdp_refusals_are_one_line(capsys, shakespeare_char_dir, tmp_path):
    import train_ddp

    base = flags(shakespeare_char_dir, tmp_path / "r", 2)
    for extra, expected in (
        ([], "--fsdp shards over ranks"),  # one process
        (["--mixed-precision", "fp16"], "--fsdp does not scale fp16 losses"),
    ):
        assert train_ddp.main([*base, *extra]) != 0
        err = capsys.readouterr().err.strip()
        assert expected in err and "\n" not in err
