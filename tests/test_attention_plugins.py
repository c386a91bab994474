"""User plug-ins: a variant from a file or a module, recorded in the checkpoint and found again."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import train_ddp
from gpt.attention import _REGISTRY, attention_source, available, resolve_attention
from gpt.attention import plugin as plugin_mod
from gpt.attention.check import main as suite_main
from gpt.checkpoint import CheckpointError, load_model, save_checkpoint
from gpt.config import ConfigError, ModelConfig
from gpt.model import Transformer

PLUGIN = textwrap.dedent(
    '''
    """A user's variant: softmax attention at a temperature."""
    import math

    from gpt.attention import Attention, causal_mask, repeat_kv


    class WarmAttention(Attention):
        def __init__(self, config, temperature: float = 2.0):
            super().__init__(config)
            self.temperature = temperature

        def forward(self, q, k, v, q_pos, k_pos, key_padding_mask=None, return_weights=False):
            n = q.size(1) // k.size(1)
            k, v = repeat_kv(k, n), repeat_kv(v, n)
            s = q @ k.mT / (math.sqrt(q.size(-1)) * self.temperature)
            w = s.masked_fill(~causal_mask(q_pos, k_pos, key_padding_mask), -math.inf).softmax(-1)
            return (w @ v, w) if return_weights else w @ v
    '''
)

SELF_REGISTERING = textwrap.dedent(
    """
    import torch
    from gpt.attention.flex import register_mods

    register_mods("test_halfcap", score_mod=lambda s, b, h, q, kv: 0.5 * torch.tanh(s))
    """
)


PLUGIN_MODULES = ("gpt_attention_plugin_", "userattn")


@pytest.fixture(autouse=True)
def clean_registry():
    """Plug-ins register globally: put the registry, the recorded sources and sys.modules back."""
    registry, sources, modules = dict(_REGISTRY), dict(plugin_mod._SOURCES), set(sys.modules)
    yield
    _REGISTRY.clear()
    _REGISTRY.update(registry)
    plugin_mod._SOURCES.clear()
    plugin_mod._SOURCES.update(sources)
    for name in set(sys.modules) - modules:
        if name.startswith(PLUGIN_MODULES):  # not torch's lazily imported modules: those register ops once
            del sys.modules[name]


def forget_plugins():
    """What a fresh process knows: only the built-ins."""
    for name in [n for n in _REGISTRY if n in plugin_mod._SOURCES]:
        del _REGISTRY[name]
    plugin_mod._SOURCES.clear()
    for name in [n for n in sys.modules if n.startswith(PLUGIN_MODULES)]:
        del sys.modules[name]


def tiny(attention, **kw):
    return ModelConfig(
        vocab_size=30, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16, attention=attention, **kw
    )


def test_registered_names_pass_through():
    assert resolve_attention("sdpa") == "sdpa"
    assert attention_source("sdpa") is None


def test_load_a_class_from_a_file(tmp_path):
    path = tmp_path / "warm.py"
    path.write_text(PLUGIN)
    name = resolve_attention(f"{path}:WarmAttention")
    assert name == "WarmAttention" and name in available()
    assert attention_source(name) == f"{path.resolve()}:WarmAttention"
    m = Transformer(tiny(name, attention_kwargs={"temperature": 4.0}))
    assert m.layers[0].attention.mix.temperature == 4.0
    # loading it again neither re-executes the file nor changes the answer
    assert resolve_attention(f"{path}:WarmAttention") == name


def test_a_file_that_registers_its_own_name(tmp_path):
    path = tmp_path / "halfcap.py"
    path.write_text(SELF_REGISTERING)
    assert resolve_attention(f"{path}:test_halfcap") == "test_halfcap"
    assert attention_source("test_halfcap").endswith("halfcap.py:test_halfcap")


def test_load_from_a_module(tmp_path, monkeypatch):
    pkg = tmp_path / "userattn"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "warm.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_attention("userattn.warm:WarmAttention") == "WarmAttention"
    assert attention_source("WarmAttention") == "userattn.warm:WarmAttention"


def test_one_line_errors_name_what_is_missing(tmp_path):
    with pytest.raises(ConfigError, match=r"attention plug-in file nowhere/x\.py not found"):
        resolve_attention("nowhere/x.py:X")
    with pytest.raises(ConfigError, match=r"attention plug-in module 'no_such_pkg\.attn' cannot be imported"):
        resolve_attention("no_such_pkg.attn:X")
    path = tmp_path / "warm.py"
    path.write_text(PLUGIN)
    with pytest.raises(ConfigError, match=r"warm\.py defines no attention 'Cold'"):
        resolve_attention(f"{path}:Cold")
    (tmp_path / "bad.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ConfigError, match=r"bad\.py failed to import: RuntimeError: boom"):
        resolve_attention(f"{tmp_path / 'bad.py'}:X")
    with pytest.raises(ConfigError, match=r"unknown attention 'nope'; available: .*math.*sdpa.*file\.py:NAME"):
        resolve_attention("nope")


def test_checkpoint_records_the_plugin_and_reloads_it(tmp_path):
    src = tmp_path / "plugins" / "warm.py"
    src.parent.mkdir()
    src.write_text(PLUGIN)
    name = resolve_attention(f"{src}:WarmAttention")
    torch.manual_seed(0)
    model = Transformer(tiny(name, attention_kwargs={"temperature": 3.0})).eval()
    save_checkpoint(tmp_path / "ckpt", model)
    raw = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert raw["attention"] == "WarmAttention" and raw["attention_source"] == f"{src.resolve()}:WarmAttention"

    forget_plugins()  # as in a new process (generate.py)
    assert "WarmAttention" not in available()
    loaded = load_model(tmp_path / "ckpt")
    assert loaded.layers[0].attention.mix.temperature == 3.0
    idx = torch.randint(0, 30, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), model(idx))

    forget_plugins()
    shutil.move(src, tmp_path / "elsewhere.py")
    with pytest.raises(CheckpointError, match=r"config\.json: attention plug-in file .*warm\.py not found"):
        load_model(tmp_path / "ckpt")


def test_checkpoint_of_a_builtin_has_no_source(tmp_path):
    save_checkpoint(tmp_path / "ckpt", Transformer(tiny("alibi", pos_encoding="none")))
    raw = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert "attention_source" not in raw and load_model(tmp_path / "ckpt").config.attention == "alibi"


def check_main(argv):
    return suite_main(argv, model_factory=Transformer)


def test_check_cli_takes_a_plugin_spec(tmp_path, capsys):
    path = tmp_path / "warm.py"
    path.write_text(PLUGIN)
    assert check_main([f"{path}:WarmAttention", "--kwargs", '{"temperature": 0.5}', "--skip", "compile"]) == 0
    assert "all properties hold" in capsys.readouterr().out
    assert check_main([f"{tmp_path}/missing.py:X"]) == 2
    assert "error: attention plug-in file" in capsys.readouterr().err


ROOT = Path(__file__).resolve().parent.parent


def generate_in_a_new_process(*args: str) -> subprocess.CompletedProcess:
    """A fresh interpreter knows only the built-in variants, like a user's later session."""
    cmd = [sys.executable, str(ROOT / "generate.py"), "--prompt", "ROMEO:", "--max-new-tokens", "5"]
    cmd += ["--temperature", "0", "--threads", "1", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.mark.slow
def test_train_ddp_with_a_plugin_file_then_generate_reloads_it(shakespeare_char_dir, tmp_path, capsys):
    src = tmp_path / "plugins" / "warm.py"
    src.parent.mkdir()
    src.write_text(PLUGIN)
    out = tmp_path / "run"
    argv = [
        "--preset", "tiny", "--data-dir", str(shakespeare_char_dir), "--out", str(out), "--batch-size", "4",
        "--block-size", "32", "--max-steps", "2", "--eval-interval", "2", "--eval-iters", "1", "--threads", "1",
        "--peak-tflops", "1", "--no-progress", "--attention", f"{src}:WarmAttention",
        "--attention-kwargs", '{"temperature": 3.0}',
    ]  # fmt: skip
    assert train_ddp.main(argv) == 0
    raw = json.loads((out / "best" / "config.json").read_text())
    assert raw["attention"] == "WarmAttention" and raw["attention_kwargs"] == {"temperature": 3.0}
    assert raw["attention_source"] == f"{src.resolve()}:WarmAttention"

    done = generate_in_a_new_process("--checkpoint", str(out / "best"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ROMEO:") and "tokens/s" in done.stderr

    moved = tmp_path / "moved" / "warm2.py"
    moved.parent.mkdir()
    shutil.move(src, moved)
    done = generate_in_a_new_process("--checkpoint", str(out / "best"))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ")
    assert f"attention plug-in file {src.resolve()} not found" in done.stderr
    assert "--attention NEW/PATH.py:WarmAttention" in done.stderr
    # pointing at its new place loads it
    done = generate_in_a_new_process("--checkpoint", str(out / "best"), "--attention", f"{moved}:WarmAttention")
    assert done.returncode == 0, done.stderr


def test_train_ddp_names_a_missing_plugin_in_one_line(shakespeare_char_dir, tmp_path, capsys):
    argv = ["--preset", "tiny", "--data-dir", str(shakespeare_char_dir), "--out", str(tmp_path / "r")]
    assert train_ddp.main(argv + ["--attention", f"{tmp_path}/gone.py:X"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: attention plug-in file {tmp_path}/gone.py not found" in err
    assert train_ddp.main(argv + ["--attention", "no_such_pkg.attn:X"]) == 2
    assert "error: attention plug-in module 'no_such_pkg.attn' cannot be imported" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # refused before any run directory is made
