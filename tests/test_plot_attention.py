"""scripts/plot_attention.py: a PNG of per-head heat maps for a prompt, one-line errors."""

import importlib.util
from pathlib import Path

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


def test_weights_drawn_are_the_models(checkpoint):
    """The per-layer weights the plot draws are rows of a causal, normalised attention matrix."""
    from gpt.checkpoint import load_checkpoint

    model, tok = load_checkpoint(checkpoint)
    with torch.no_grad():
        _, weights = model(torch.tensor([tok.encode("abc abc")]), return_weights=True)
    w = weights[1][0]
    assert w.shape == (4, 7, 7)
    torch.testing.assert_close(w.sum(-1), torch.ones(4, 7))
    assert torch.triu(w, diagonal=1).abs().max() == 0
