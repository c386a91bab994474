"""scripts/plot_attention.py: a PNG of per-head heat maps for a prompt, one-line errors."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt.checkpoint import save_checkpoint
from gpt.config import ModelConfig
from gpt.model import Transformer
from gpt.tokenizer import CharTokenizer

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "plot_attention.py"


def load_script():
    spec = importlib.util.spec_from_file_location("plot_attention", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def checkpoint(tmp_path):
    tok = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz ROMEO:\n")
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4, max_seq_len=32, attention="alibi")
    return save_checkpoint(tmp_path / "ckpt", Transformer(cfg), tok)


def test_writes_a_png_grid_of_heads(checkpoint, tmp_path, capsys):
    out = tmp_path / "attn.png"
    plot = load_script()
    assert (
        plot.main(["--checkpoint", str(checkpoint), "--prompt", "ROMEO: but soft", "--layer", "-1", "--out", str(out)])
        == 0
    )
    assert f"wrote {out}: 4 heads x 15 tokens, layer 1 of 2" in capsys.readouterr().out
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    import matplotlib.image

    h, w, _ = matplotlib.image.imread(out).shape
    assert w >= 400 and h >= 400  # a 2x2 grid of readable maps


def test_token_labels_make_whitespace_visible():
    plot = load_script()
    tok = CharTokenizer.from_text("ab \n")
    assert plot.token_labels(tok, tok.encode("a b\n")) == ["a", "␣", "b", "⏎"]


def test_bad_input_is_one_line_exit_2(checkpoint, tmp_path, capsys):
    plot = load_script()
    assert plot.main(["--checkpoint", str(tmp_path / "none"), "--prompt", "ab"]) == 2
    assert capsys.readouterr().err.startswith("error: checkpoint directory")
    assert plot.main(["--checkpoint", str(checkpoint), "--prompt", "ab", "--layer", "5"]) == 2
    assert "error: --layer 5 is out of range; the model has 2 layers" in capsys.readouterr().err
    assert plot.main(["--checkpoint", str(checkpoint), "--prompt", "a" * 40]) == 2
    assert "error: --prompt is 40 tokens; give 1 to 32" in capsys.readouterr().err
    assert plot.main(["--checkpoint", str(checkpoint), "--prompt", "ab€"]) == 2
    assert "error: character '€' is not in the char vocabulary" in capsys.readouterr().err


@pytest.fixture
def drawn(monkeypatch):
    """Every heat map the script draws: (the array, imshow's keyword arguments)."""
    import matplotlib.axes

    maps = []
    imshow = matplotlib.axes.Axes.imshow

    def recording_imshow(self, x, *args, **kwargs):
        maps.append((np.array(x), kwargs))
        return imshow(self, x, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", recording_imshow)
    return maps


def model_weights(checkpoint, prompt, layer):
    from gpt.checkpoint import load_checkpoint

    model, tok = load_checkpoint(checkpoint)
    with torch.no_grad():
        _, weights = model(torch.tensor([tok.encode(prompt)]), return_weights=True)
    return weights[layer][0]


def test_weights_drawn_are_the_models(checkpoint, tmp_path, drawn):
    """The maps the script draws are the chosen layer's weights, one per head, on a scale from 0."""
    out = tmp_path / "attn.png"
    assert (
        load_script().main(["--checkpoint", str(checkpoint), "--prompt", "abc abc", "--layer", "1", "--out", str(out)])
        == 0
    )
    want = model_weights(checkpoint, "abc abc", 1)
    assert len(drawn) == 4
    for h, (x, kwargs) in enumerate(drawn):
        torch.testing.assert_close(torch.from_numpy(x), want[h], rtol=0, atol=0)
        assert kwargs["vmin"] == 0.0  # softmax weights: nothing below 0 to show
    w = torch.from_numpy(np.stack([x for x, _ in drawn]))
    torch.testing.assert_close(w.sum(-1), torch.ones(4, 7))  # rows of a causal, normalised matrix
    assert torch.triu(w, diagonal=1).abs().max() == 0


def test_negative_weights_get_a_diverging_scale_centred_on_zero(tmp_path, drawn):
    """Differential attention's weights go negative: the scale must show them, not clip them at 0."""
    tok = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz ROMEO:\n")
    cfg = ModelConfig(
        vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4, max_seq_len=32, attention="differential"
    )
    model = Transformer(cfg)
    with torch.no_grad():  # sharper maps than at init, so their difference goes below 0
        for layer in model.layers:
            layer.attention.wq.weight.mul_(20)
            layer.attention.wk.weight.mul_(20)
    ckpt = save_checkpoint(tmp_path / "ckpt", model, tok)
    want = model_weights(ckpt, "abc abc", 0)
    assert want.min() < -0.1
    assert load_script().main(["--checkpoint", str(ckpt), "--prompt", "abc abc", "--out", str(tmp_path / "a.png")]) == 0
    assert len(drawn) == 4
    for h, (x, kwargs) in enumerate(drawn):
        torch.testing.assert_close(torch.from_numpy(x), want[h], rtol=0, atol=0)
        assert kwargs["cmap"] in ("RdBu_r", "RdBu", "coolwarm", "bwr", "seismic")
        assert kwargs["vmin"] == -kwargs["vmax"]  # 0 in the middle of the map
        assert kwargs["vmin"] <= x.min() and x.max() <= kwargs["vmax"]  # nothing clipped
