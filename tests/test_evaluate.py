import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt.checkpoint import save_checkpoint
from gpt.config import ModelConfig
from gpt.data import load_split, prepare_dataset
from gpt.evaluate import evaluate, window_starts
from gpt.model import Transformer
from gpt.quant import quantize_checkpoint
from gpt.tokenizer import load_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import eval_ppl  # noqa: E402

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 20


@pytest.fixture
def dataset(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    prepare_dataset(str(corpus), tmp_path / "data", "char", val_fraction=0.3)
    return tmp_path / "data"


def _model(vocab: int) -> Transformer:
    return Transformer(ModelConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=4, max_seq_len=16)).eval()


def test_evaluate_is_the_mean_loss_over_consecutive_windows(dataset):
    data = load_split(dataset, "val")
    model = _model(load_tokenizer(dataset).vocab_size)
    res = evaluate(model, data, block_size=16, batch_size=3)
    starts = window_starts(len(data), 16)
    assert starts[:3] == [0, 16, 32] and len(starts) == (len(data) - 1) // 16
    with torch.no_grad():
        losses = [
            model(
                torch.from_numpy(data[s : s + 16].astype(np.int64))[None],
                targets=torch.from_numpy(data[s + 1 : s + 17].astype(np.int64))[None],
            )[1].item()
            for s in starts
        ]
    assert res.tokens == 16 * len(starts)
    assert math.isclose(res.loss, sum(losses) / len(losses), rel_tol=1e-5)
    assert math.isclose(res.perplexity, math.exp(res.loss))
    # max_tokens limits the windows (the same ones for every model)
    assert evaluate(model, data, 16, max_tokens=48).tokens == 48


def test_eval_ppl_cli_float_and_quantized(dataset, tmp_path, capsys):
    tok = load_tokenizer(dataset)
    save_checkpoint(tmp_path / "ck", _model(tok.vocab_size), tok)
    quantize_checkpoint(tmp_path / "ck", None, "int8")
    results = {}
    for name in ("ck", "ck-int8"):
        assert eval_ppl.main(["--checkpoint", str(tmp_path / name), "--data", str(dataset)]) == 0
        out = capsys.readouterr().out
        assert "val loss" in out and "perplexity" in out
        results[name] = float(out.split("perplexity ")[1].split()[0])
    # an untrained model is near-uniform: perplexity close to the vocabulary size, and int8 barely moves it
    assert abs(results["ck"] - tok.vocab_size) < 0.2 * tok.vocab_size
    assert abs(results["ck-int8"] / results["ck"] - 1) < 0.01


def test_eval_ppl_cli_errors(dataset, tmp_path, capsys):
    assert eval_ppl.main(["--checkpoint", str(tmp_path / "none"), "--data", str(dataset)]) == 2
    assert capsys.readouterr().err.startswith("error: checkpoint directory")
    tok = load_tokenizer(dataset)
    other = tmp_path / "other"
    other.mkdir()
    (other / "c.txt").write_text("xyz\n" * 200)
    prepare_dataset(str(other / "c.txt"), tmp_path / "otherdata", "char")
    save_checkpoint(tmp_path / "ck", _model(tok.vocab_size), tok)
    assert eval_ppl.main(["--checkpoint", str(tmp_path / "ck"), "--data", str(tmp_path / "otherdata")]) == 2
    err = capsys.readouterr().err
    assert "pass the --data the model was trained on" in err and err.count("\n") == 1
