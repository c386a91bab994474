"""User plug-ins: a variant from a file or a module, recorded in the checkpoint and found again."""

import json
import shutil
import sys
import textwrap

import pytest
import torch

from gpt.attention import _REGISTRY, attention_source, available, resolve_attention
from gpt.attention import plugin as plugin_mod
from gpt.attention.check import main as check_main
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
        del sys.modules[name]


def forget_plugins():
    """What a fresh process knows: only the built-ins."""
    for name in [n for n in _REGISTRY if n in plugin_mod._SOURCES]:
        del _REGISTRY[name]
    plugin_mod._SOURCES.clear()
    for name in [n for n in sys.modules if n.startswith(("gpt_attention_plugin_", "userattn"))]:
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


def test_check_cli_takes_a_plugin_spec(tmp_path, capsys):
    path = tmp_path / "warm.py"
    path.write_text(PLUGIN)
    assert check_main([f"{path}:WarmAttention", "--kwargs", '{"temperature": 0.5}', "--skip", "compile"]) == 0
    assert "all properties hold" in capsys.readouterr().out
    assert check_main([f"{tmp_path}/missing.py:X"]) == 2
    assert "error: attention plug-in file" in capsys.readouterr().err
