"""The training loop (gpt.training) and its CLI (train_ddp.py)."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_ddp
from gpt.checkpoint import load_checkpoint
from gpt.config import from_preset
from gpt.model import Transformer
from gpt.training import TrainConfig, Trainer, TrainError, lr_at, make_optimizer, train

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))


def tiny(data_dir: Path, out: Path, **kw) -> TrainConfig:
    settings = dict(
        preset="tiny",
        data_dir=str(data_dir),
        out=str(out),
        batch_size=8,
        block_size=32,
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=2,
        max_steps=8,
        eval_interval=4,
        eval_iters=2,
        progress=False,
        peak_tflops=1.0,
        threads=1,
    )
    settings.update(kw)
    return TrainConfig(**settings)


def tiny_flags(data_dir: Path, out: Path) -> list[str]:
    return [
        "--preset", "tiny", "--data-dir", str(data_dir), "--out", str(out), "--batch-size", "8",
        "--block-size", "32", "--warmup-steps", "2", "--eval-iters", "2", "--peak-tflops", "1",
    ]  # fmt: skip


# -- pieces ---------------------------------------------------------------------------------------


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    lrs = [lr_at(s, cfg, 110) for s in range(110)]
    assert lrs[0] == pytest.approx(1e-3 / 11)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11], strict=True))  # rising during warmup
    assert lrs[10] == pytest.approx(1e-3)  # peak right after warmup
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))  # then monotone down
    assert lrs[60] == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4))  # cosine midpoint
    assert lr_at(110, cfg, 110) == pytest.approx(1e-4)
    # an explicit decay length lets a short run follow a longer run's schedule exactly
    short = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, decay_steps=110)
    assert [lr_at(s, short, 50) for s in range(50)] == lrs[:50]


def test_weight_decay_only_on_matrices(tiny_config):
    model = Transformer(tiny_config)
    opt = make_optimizer(model, TrainConfig(weight_decay=0.1))
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decayed["params"]) and all(p.dim() == 1 for p in plain["params"])
    norms = {id(m.weight) for n, m in model.named_modules() if n.endswith("norm")}
    assert norms == {id(p) for p in plain["params"]}
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


# -- single device ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_training_lowers_val_loss_and_writes_records(shakespeare_char_dir, tmp_path):
    out = tmp_path / "run"
    summary = train(tiny(shakespeare_char_dir, out, max_steps=60, eval_interval=20, eval_iters=4))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [20, 40, 60]
    assert set(rows[0]) >= {"step", "train_loss", "val_loss", "lr", "tokens_per_s", "elapsed_s", "mfu"}
    # untrained, the loss is about ln(vocab) = 4.4; 60 steps of a 0.1M model reach well under 3
    assert rows[-1]["val_loss"] < 3.0 < math.log(85)
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] - 0.1
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["world_size"] == 1 and summary["stopped"] == "finished"
    # best and latest load in the foundation format and reproduce the logged val loss ballpark
    model, tok = load_checkpoint(out / "best")
    assert model.config.vocab_size == tok.vocab_size
    best = min(r["val_loss"] for r in rows)
    assert json.loads((out / "state" / "trainer.json").read_text())["best_val"] == pytest.approx(best)
    latest = load_file(out / "latest" / "model.safetensors")
    assert set(latest) == set(model.state_dict())


@pytest.mark.slow
def test_resume_is_exact(shakespeare_char_dir, tmp_path):
    """2N steps in one go == N steps, then --resume for N more: same losses and weights."""
    n = 6
    common = dict(max_steps=2 * n, decay_steps=2 * n, eval_interval=3, grad_accum=2)
    train(tiny(shakespeare_char_dir, tmp_path / "straight", **common))
    train(tiny(shakespeare_char_dir, tmp_path / "split", **{**common, "max_steps": n}))
    assert json.loads((tmp_path / "split" / "state" / "trainer.json").read_text())["step"] == n
    train(tiny(shakespeare_char_dir, tmp_path / "split", **common, resume=True))

    def rows(run):
        return [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    a, b = rows("straight"), rows("split")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [3, 6, 9, 12]
    for ra, rb in zip(a, b, strict=True):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], abs=1e-6)
        assert ra["val_loss"] == pytest.approx(rb["val_loss"], abs=1e-6)
        assert ra["lr"] == rb["lr"]
    wa = load_file(tmp_path / "straight" / "latest" / "model.safetensors")
    wb = load_file(tmp_path / "split" / "latest" / "model.safetensors")
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-6, rtol=0)


def test_nan_loss_stops_naming_the_step(shakespeare_char_dir, tmp_path):
    trainer = Trainer(tiny(shakespeare_char_dir, tmp_path / "run", max_steps=10, eval_interval=2))
    calls = {"n": 0}

    def poison(module, args, output):  # training forwards only: 1 per step (+ eval forwards)
        if module.training:
            calls["n"] += 1
            if calls["n"] == 4:
                return output * float("nan")
        return output

    trainer.raw_model.norm.register_forward_hook(poison)
    try:
        with pytest.raises(TrainError, match=r"loss is nan at step 3; .*last good checkpoint is .*latest"):
            trainer.run()
    finally:
        trainer.close()
    # the checkpoint of step 2 survives, untouched by the poisoned step
    cfg, _ = load_checkpoint(tmp_path / "run" / "latest")
    assert json.loads((tmp_path / "run" / "state" / "trainer.json").read_text())["step"] == 2


# -- the CLI -----------------------------------------------------------------------------------------


def test_help_lists_every_flag_with_its_default():
    text = " ".join(train_ddp.build_parser().format_help().split())
    for f in TrainConfig.__dataclass_fields__:
        assert f"--{f.replace('_', '-')}" in text, f
    assert text.count("(default:") >= len(TrainConfig.__dataclass_fields__)
    assert "(default: shakespeare-char)" in text and "(default: out/shakespeare-char)" in text


def test_config_file_then_flags_override(tmp_path):
    (tmp_path / "run.yaml").write_text("lr: 0.01\nbatch-size: 4\nattention_kwargs: {a: 1}\npreset: tiny\n")
    (tmp_path / "run.json").write_text(json.dumps({"lr": 0.02, "grad_clip": 0.5}))
    cfg = train_ddp.parse_config(["--config", str(tmp_path / "run.yaml"), "--batch-size", "6"])
    assert (cfg.lr, cfg.batch_size, cfg.attention_kwargs, cfg.preset) == (0.01, 6, {"a": 1}, "tiny")
    cfg = train_ddp.parse_config(["--config", str(tmp_path / "run.json")])
    assert (cfg.lr, cfg.grad_clip, cfg.batch_size) == (0.02, 0.5, TrainConfig.batch_size)


def one_line_error(capsys, argv: list[str]) -> str:
    try:
        code = train_ddp.main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--batch-size", "0"], "--batch-size=0 must be a positive integer"),
        (["--bogus-flag"], "unrecognized arguments: --bogus-flag"),
        (["--lr", "fast"], "invalid float value: 'fast'"),
        (["--mixed-precision", "fp8"], "--mixed-precision 'fp8' is not one of no, bf16, fp16"),
        (["--attention-kwargs", "[1]"], "is not a JSON object"),
        (["--data", "/no/such/corpus.txt"], "data file /no/such/corpus.txt does not exist"),
        (["--config", "/no/such.yaml"], "config file /no/such.yaml does not exist"),
    ],
)
def test_bad_flags_give_one_line_errors(capsys, argv, expected):
    assert expected in one_line_error(capsys, argv)


def test_bad_config_file_key(capsys, tmp_path):
    (tmp_path / "c.json").write_text('{"learning_rate": 1}')
    assert "unknown setting(s) learning_rate" in one_line_error(capsys, ["--config", str(tmp_path / "c.json")])


def test_block_size_beyond_context(capsys, shakespeare_char_dir, tmp_path):
    argv = tiny_flags(shakespeare_char_dir, tmp_path / "r") + ["--block-size", "65"]
    assert "--block-size 65 exceeds the model's max_seq_len 64" in one_line_error(capsys, argv)


def test_fsdp_refused_on_cpu(capsys, monkeypatch, shakespeare_char_dir, tmp_path):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    err = one_line_error(capsys, tiny_flags(shakespeare_char_dir, tmp_path / "r"))
    assert "FSDP does not run on the CPU" in err


@pytest.mark.slow
def test_mismatched_resume_state_is_refused(capsys, shakespeare_char_dir, tmp_path):
    out = tmp_path / "run"
    base = tiny_flags(shakespeare_char_dir, out) + ["--max-steps", "2", "--eval-interval", "2", "--no-progress"]
    assert train_ddp.main(base) == 0
    capsys.readouterr()
    err = one_line_error(capsys, base + ["--resume", "--lr", "0.005"])
    assert f"{out / 'state'} was written with lr=0.002 but this run has lr=0.005" in err
    trainer_file = out / "state" / "trainer.json"
    meta = json.loads(trainer_file.read_text())
    trainer_file.write_text(json.dumps({**meta, "world_size": 2}))
    err = one_line_error(capsys, base + ["--resume"])
    assert "was written by 2 process(es), this run has 1" in err
    shutil.rmtree(out / "state")
    assert "there is no resumable state" in one_line_error(capsys, base + ["--resume"])


# -- processes: Ctrl-C and 2-rank DDP ------------------------------------------------------------------


@pytest.mark.slow
def test_sigint_leaves_a_resumable_state(shakespeare_char_dir, tmp_path):
    out = tmp_path / "run"
    flags = tiny_flags(shakespeare_char_dir, out) + ["--max-steps", "100000", "--eval-interval", "5", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([PY, "train_ddp.py", *flags], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "stopped by SIGINT" in err and "--resume" in err
    step = json.loads((out / "state" / "trainer.json").read_text())["step"]
    assert 5 <= step < 100000
    load_checkpoint(out / "latest")
    # and the state really resumes: a few more steps from where it stopped
    done = subprocess.run(
        [PY, "train_ddp.py", *flags[:-5], "--max-steps", str(step + 3), "--eval-interval", "5", "--resume"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    # --max-steps may change on resume; everything else must match
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "state" / "trainer.json").read_text())["step"] == step + 3


@pytest.mark.slow
def test_two_rank_cpu_ddp(shakespeare_char_dir, tmp_path):
    """The launch line the README documents: two synchronised gloo ranks."""
    out = tmp_path / "ddp"
    cmd = [
        ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "train_ddp.py",
        *tiny_flags(shakespeare_char_dir, out), "--max-steps", "6", "--eval-interval", "3", "--grad-accum", "2",
        "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "1"}
    env.pop("ACCELERATE_USE_FSDP", None)
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es)" in done.stdout and "8 x 2 accum x 2 ranks x 32 tokens = 1,024 tokens/step" in done.stdout
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 2 and run["threads_per_rank"] == max(1, len(os.sched_getaffinity(0)) // 2)
    first = run["rank_first_batch_tokens"]
    assert len(first) == 2 and first[0] != first[1]  # each rank reads its own batches
    sums = run["rank_param_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]  # DDP kept the replicas identical (bitwise)
    # ... and they trained: the weights moved away from the seed's initialisation
    torch.manual_seed(1337)
    init = Transformer(from_preset("tiny", vocab_size=run["model"]["vocab_size"]))
    assert sum(p.double().sum().item() for p in init.parameters()) != pytest.approx(sums[0][0], abs=1e-6)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6]
    model, tok = load_checkpoint(out / "latest")
    assert sum(p.double().sum().item() for p in model.parameters()) == pytest.approx(sums[0][0], rel=1e-12)
    assert json.loads((out / "state" / "trainer.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in (out / "state").glob("random_states_*")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]


def test_unusable_corpus_is_one_line(capsys, tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    argv = ["--data", str(tmp_path / "empty.txt"), "--data-dir", str(tmp_path / "d"), "--out", str(tmp_path / "r")]
    assert "is empty" in one_line_error(capsys, argv)
