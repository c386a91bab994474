"""The training loop (gpt.training) and its CLI (train_ddp.py)."""

from __future__ import annotations

import dataclasses
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
import yaml
from safetensors.torch import load_file, save_file

import gpt.checkpoint
import train_ddp
from gpt.checkpoint import load_checkpoint
from gpt.config import ModelConfig, from_preset
from gpt.model import Transformer
from gpt.training import TrainConfig, Trainer, TrainError, gathered_model, lr_at, make_optimizer, train

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


def test_gathered_fsdp_weights_load_strictly(tiny_config):
    """The FSDP save path builds its checkpoint from the gathered weights: a missing one is an error,
    not the initial value; only the alias of a tied head may be absent."""
    state = Transformer(tiny_config).state_dict()
    model = gathered_model(tiny_config, state)
    torch.testing.assert_close(model.state_dict(), state, rtol=0, atol=0)
    lacking = {k: v for k, v in state.items() if k != "layers.1.attention.wq.weight"}
    with pytest.raises(TrainError, match=r"FSDP weights .* lacks layers\.1\.attention\.wq\.weight;"):
        gathered_model(tiny_config, lacking)
    with pytest.raises(TrainError, match="has unexpected extra.weight"):
        gathered_model(tiny_config, {**state, "extra.weight": torch.zeros(1)})
    tied_config = from_preset("tiny", tie_embeddings=True)
    tied = Transformer(tied_config).state_dict()
    model = gathered_model(tied_config, {k: v for k, v in tied.items() if k != "output.weight"})
    torch.testing.assert_close(model.output.weight, tied["tok_embeddings.weight"], rtol=0, atol=0)
    with pytest.raises(TrainError, match="lacks tok_embeddings.weight, output.weight"):
        gathered_model(tied_config, {k: v for k, v in tied.items() if not k.endswith("embeddings.weight")
                                     and k != "output.weight"})  # fmt: skip


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


def rows_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a: Path, b: Path) -> None:
    """The same metrics rows (losses to 1e-6, learning rates exactly) and the same final weights."""
    ra, rb = rows_of(a), rows_of(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb, strict=True):
        assert x["train_loss"] == pytest.approx(y["train_loss"], abs=1e-6), x["step"]
        assert x["val_loss"] == pytest.approx(y["val_loss"], abs=1e-6), x["step"]
        assert x["lr"] == y["lr"]
    wa, wb = load_file(a / "latest" / "model.safetensors"), load_file(b / "latest" / "model.safetensors")
    assert set(wa) == set(wb)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-6, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_resume_is_exact(shakespeare_char_dir, tmp_path, monkeypatch, dropout):
    """2N steps in one go == N steps, then --resume for N more: same losses and weights. With dropout the
    masks come from the global RNG, so this holds only if the resume restores the RNG state."""
    n = 6
    common = dict(max_steps=2 * n, decay_steps=2 * n, eval_interval=3, grad_accum=2, dropout=dropout)
    train(tiny(shakespeare_char_dir, tmp_path / "straight", **common))
    train(tiny(shakespeare_char_dir, tmp_path / "split", **{**common, "max_steps": n}))
    assert json.loads((tmp_path / "split" / "state" / "trainer.json").read_text())["step"] == n
    if dropout:
        shutil.copytree(tmp_path / "split", tmp_path / "no-rng")
    train(tiny(shakespeare_char_dir, tmp_path / "split", **common, resume=True))
    assert [r["step"] for r in rows_of(tmp_path / "split")] == [3, 6, 9, 12]
    assert_same_run(tmp_path / "straight", tmp_path / "split")
    if dropout:
        # the control: the same resume without restoring torch's RNG state draws other dropout masks
        monkeypatch.setattr(torch, "set_rng_state", lambda state: None)
        train(tiny(shakespeare_char_dir, tmp_path / "no-rng", **common, resume=True))
        assert rows_of(tmp_path / "no-rng")[2]["train_loss"] != pytest.approx(
            rows_of(tmp_path / "straight")[2]["train_loss"], abs=1e-6
        )


@pytest.mark.slow
@pytest.mark.parametrize("first, second", [(True, False), (False, True)])
def test_compile_may_change_on_resume(shakespeare_char_dir, tmp_path, monkeypatch, first, second):
    """--compile on for the first session and off for the resumed one (and the reverse) replays the run."""
    real_compile = torch.compile
    # dynamo's wrapper (what used to rename the state's keys) without minutes of inductor code generation
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend="eager", **kw))
    common = dict(max_steps=6, decay_steps=6, eval_interval=3)
    train(tiny(shakespeare_char_dir, tmp_path / "straight", **common))
    train(tiny(shakespeare_char_dir, tmp_path / "split", **{**common, "max_steps": 3}, compile=first))
    assert not any("_orig_mod" in k for k in load_file(tmp_path / "split" / "state" / "model.safetensors"))
    train(tiny(shakespeare_char_dir, tmp_path / "split", **common, compile=second, resume=True))
    assert_same_run(tmp_path / "straight", tmp_path / "split")


@pytest.mark.slow
def test_resume_reads_a_state_with_compiled_keys(shakespeare_char_dir, tmp_path):
    """States written by --compile runs before the fix keep torch.compile's `_orig_mod.` prefix: they resume."""
    common = dict(max_steps=6, decay_steps=6, eval_interval=3)
    train(tiny(shakespeare_char_dir, tmp_path / "straight", **common))
    train(tiny(shakespeare_char_dir, tmp_path / "split", **{**common, "max_steps": 3}))
    weights = tmp_path / "split" / "state" / "model.safetensors"
    save_file({f"_orig_mod.{k}": v for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
    train(tiny(shakespeare_char_dir, tmp_path / "split", **common, resume=True))
    assert_same_run(tmp_path / "straight", tmp_path / "split")


def stop_at(trainer: Trainer, step: int, signum: int = signal.SIGTERM) -> None:
    """Send `signum` to this process during the forward of training step `step` (counted from 1)."""
    calls = {"n": 0}

    def hook(module, args, output):
        if module.training:
            calls["n"] += 1
            if calls["n"] == step * trainer.cfg.grad_accum:
                signal.raise_signal(signum)

    trainer.raw_model.register_forward_hook(hook)


@pytest.mark.slow
def test_resume_with_more_steps_keeps_the_lr_schedule(shakespeare_char_dir, tmp_path, capsys):
    """A run planned for 12 steps, stopped at 4 and resumed with --max-steps 20, keeps its cosine."""
    out = tmp_path / "run"
    planned = tiny(shakespeare_char_dir, out, max_steps=12, eval_interval=4)
    trainer = Trainer(planned)
    stop_at(trainer, 4)
    try:
        assert trainer.run()["stopped"] == "SIGTERM"
    finally:
        trainer.close()
    assert json.loads((out / "state" / "trainer.json").read_text())["step"] == 4
    capsys.readouterr()
    train(tiny(shakespeare_char_dir, out, max_steps=20, eval_interval=1, resume=True))
    note = [line for line in capsys.readouterr().out.splitlines() if line.startswith("resuming at step 4")]
    assert note == [
        "resuming at step 4 of 20: the learning rate keeps the run's schedule (cosine to --min-lr 0.0003 at step "
        "12) and stays at 0.0003 from step 12; for a longer decay start a new run with --decay-steps"
    ]
    lr = {r["step"]: r["lr"] for r in rows_of(out)}  # the row of step s logs the lr of step index s - 1
    assert lr[5] == lr_at(4, planned, 12) != lr_at(4, planned, 20)  # the first resumed step
    assert [lr[s] for s in range(5, 13)] == [lr_at(s, planned, 12) for s in range(4, 12)]
    assert all(lr[s] == planned.min_lr for s in range(13, 21))


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
    # a model flag's help is its ModelConfig field's help metadata (a generic line until it has one)
    for f in dataclasses.fields(ModelConfig):
        if f.name != "vocab_size":
            assert " ".join(f.metadata.get("help", f"the model's {f.name}").split()) in text, f.name
    assert "autocast" in text and "not a storage dtype" in text  # --mixed-precision is not --dtype


# a valid value, unlike the preset's, for each ModelConfig field; a field added later is checked with its default
MODEL_VALUES = dict(
    dim=48, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, intermediate_size=100, norm_eps=1e-4, rope_base=500.0,
    max_seq_len=40, tie_embeddings=True, dropout=0.1, attention="sliding_window", attention_kwargs={"window": 8},
    pos_encoding="learned", arch="encoder", n_encoder_layers=2, norm_position="post", ffn="relu", label_smoothing=0.1,
)  # fmt: skip


NEW_FIELD = """
import dataclasses, json, sys
import gpt.config

@dataclasses.dataclass
class ModelConfig(gpt.config.ModelConfig):  # what one edit of gpt/config.py would add
    qk_norm: bool = dataclasses.field(default=False, metadata={"help": "RMS-normalise queries and keys"})

gpt.config.ModelConfig = ModelConfig
import train_ddp
from gpt.training import model_config

cfg = train_ddp.parse_config(["--qk-norm", "true"])
with open(sys.argv[1], "w") as f:
    f.write("qk_norm: true\\n")
print(json.dumps({
    "flag": cfg.qk_norm,
    "file": train_ddp.parse_config(["--config", sys.argv[1]]).qk_norm,
    "fingerprint": cfg.fingerprint()["qk_norm"],
    "model": model_config(cfg, vocab_size=65).qk_norm,
    "help": "RMS-normalise queries and keys (default: the preset's)" in " ".join(
        train_ddp.build_parser().format_help().split()
    ),
}))
"""


@pytest.mark.slow
def test_a_new_model_field_needs_no_edit_outside_modelconfig(tmp_path):
    done = subprocess.run(
        [PY, "-c", NEW_FIELD, str(tmp_path / "c.yaml")], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.splitlines()[-1])
    assert got == {"flag": True, "file": True, "fingerprint": True, "model": True, "help": True}


def test_every_model_field_is_a_flag_a_config_key_and_reaches_the_model(shakespeare_char_dir, tmp_path):
    fields = [f for f in dataclasses.fields(ModelConfig) if f.name != "vocab_size"]  # vocab: the tokenizer's
    values = {
        f.name: MODEL_VALUES[f.name]
        if f.name in MODEL_VALUES
        else f.default_factory()
        if f.default is dataclasses.MISSING
        else f.default
        for f in fields
    }
    argv = []
    for name, value in values.items():
        text = json.dumps(value) if isinstance(value, (dict, bool)) else str(value)
        argv += [f"--{name.replace('_', '-')}", text]
    by_flags = train_ddp.parse_config(argv)
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(values))
    by_file = train_ddp.parse_config(["--config", str(tmp_path / "model.yaml")])
    assert by_flags == by_file
    fingerprint = by_flags.fingerprint()
    for name, value in values.items():
        assert getattr(by_flags, name) == value and fingerprint[name] == value, name
    cfg = dataclasses.replace(tiny(shakespeare_char_dir, tmp_path / "run"), **values)
    trainer = Trainer(cfg)
    try:
        built = trainer.raw_model.config
        for name, value in values.items():
            assert getattr(built, name) == value, name
    finally:
        trainer.close()


def test_config_file_then_flags_override(tmp_path):
    (tmp_path / "run.yaml").write_text("lr: 0.01\nbatch-size: 4\nattention_kwargs: {a: 1}\npreset: tiny\n")
    (tmp_path / "run.json").write_text(json.dumps({"lr": 0.02, "grad_clip": 0.5}))
    cfg = train_ddp.parse_config(["--config", str(tmp_path / "run.yaml"), "--batch-size", "6"])
    assert (cfg.lr, cfg.batch_size, cfg.attention_kwargs, cfg.preset) == (0.01, 6, {"a": 1}, "tiny")
    cfg = train_ddp.parse_config(["--config", str(tmp_path / "run.json")])
    assert (cfg.lr, cfg.grad_clip, cfg.batch_size) == (0.02, 0.5, TrainConfig.batch_size)


def one_line_error(capsys, argv: list[str]) -> str:
    code = train_ddp.main(argv)
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
        (["--mixed-precision", "fp8"], "argument --mixed-precision: invalid choice: 'fp8'"),
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
    (tmp_path / "c.yaml").write_text("cpu: true\n")
    err = one_line_error(capsys, ["--config", str(tmp_path / "c.yaml")])
    assert "the setting cpu was replaced by device; write device: cpu instead" in err
    (tmp_path / "c.yaml").write_text("lr: 1e-3\nbatch_size: lots\n")  # YAML reads 1e-3 as text: still a float
    assert "batch_size='lots' is not an integer" in one_line_error(capsys, ["--config", str(tmp_path / "c.yaml")])
    (tmp_path / "c.yaml").write_text("lr: 1e-3\n")
    assert train_ddp.parse_config(["--config", str(tmp_path / "c.yaml")]).lr == 1e-3


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--cpu"], "--cpu was replaced by --device cpu"),
        (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
        (["--max-tokens", "1000", "--max-steps", "5"], "--max-tokens decides the number of steps, so --max-steps"),
        (["--decay-steps", "20", "--warmup-steps", "30"], "--decay-steps 20 must be greater than --warmup-steps 30"),
    ],
)
def test_flags_that_do_nothing_are_refused(capsys, argv, expected):
    assert expected in one_line_error(capsys, argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_a_gpu(capsys, shakespeare_char_dir, tmp_path):
    argv = tiny_flags(shakespeare_char_dir, tmp_path / "r") + ["--device", "cuda"]
    assert "--device cuda: no CUDA device is available here; use --device cpu" in one_line_error(capsys, argv)


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
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_between_steps_with_a_resumable_state(shakespeare_char_dir, tmp_path, signum):
    out = tmp_path / "run"
    flags = tiny_flags(shakespeare_char_dir, out) + ["--max-steps", "100000", "--eval-interval", "5", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([PY, "train_ddp.py", *flags], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read()
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    name = signal.Signals(signum).name
    assert proc.returncode == 130, err
    step = json.loads((out / "state" / "trainer.json").read_text())["step"]
    assert 5 <= step < 100000
    # one line, naming the signal and the step, then how to continue
    assert err.strip().splitlines()[-1] == (
        f"stopped by {name} at step {step}; resumable state saved in {out}/state, "
        "continue with: python train_ddp.py --resume (same flags)"
    )
    # between steps: the checkpoint and the resumable state hold the same finished step
    latest, state = load_file(out / "latest" / "model.safetensors"), load_file(out / "state" / "model.safetensors")
    for key, value in state.items():
        torch.testing.assert_close(latest[key], value, rtol=0, atol=0)
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
def test_a_second_ctrl_c_aborts_at_once_keeping_the_last_save(shakespeare_char_dir, tmp_path, monkeypatch, capsys):
    """The first Ctrl-C comes right after the state of step 2 is saved; the second lands in the middle of
    the stop's checkpoint write (its weights written, not yet committed). latest/ and state/ keep step 2."""
    out = tmp_path / "run"
    base = tiny_flags(shakespeare_char_dir, out) + ["--eval-interval", "2", "--no-progress"]
    pressed = []
    real_save_state, real_save_file = Trainer.save_state, gpt.checkpoint.save_file

    def save_state_then_ctrl_c(self):
        real_save_state(self)
        if self.step == 2 and not pressed:
            pressed.append(1)
            signal.raise_signal(signal.SIGINT)

    def save_file_then_ctrl_c(*args, **kwargs):
        real_save_file(*args, **kwargs)
        if len(pressed) == 1:
            pressed.append(2)
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(Trainer, "save_state", save_state_then_ctrl_c)
    monkeypatch.setattr(gpt.checkpoint, "save_file", save_file_then_ctrl_c)
    assert train_ddp.main(base + ["--max-steps", "100"]) == 130
    assert pressed == [1, 2]
    err = capsys.readouterr().err.strip()
    assert err == (
        f"aborted by a second Ctrl-C; {out} keeps the last completed save (continue with: python train_ddp.py "
        "--resume, same flags)"
    )
    assert json.loads((out / "state" / "trainer.json").read_text())["step"] == 2
    latest, state = load_file(out / "latest" / "model.safetensors"), load_file(out / "state" / "model.safetensors")
    for key, value in state.items():
        torch.testing.assert_close(latest[key], value, rtol=0, atol=0)  # the weights of step 2
    load_checkpoint(out / "latest")
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no half-written save left
    monkeypatch.undo()
    assert train_ddp.main(base + ["--max-steps", "4", "--resume"]) == 0
    assert json.loads((out / "state" / "trainer.json").read_text())["step"] == 4


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
