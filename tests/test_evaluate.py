import importlib.util
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import gpt.quant
from gpt.checkpoint import quantize_checkpoint, save_checkpoint
from gpt.config import ModelConfig
from gpt.data import get_batch, load_split, prepare_dataset
from gpt.evaluate import evaluate, window_starts
from gpt.model import Transformer
from gpt.tokenizer import load_tokenizer

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "eval_ppl.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("eval_ppl", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


eval_ppl = _load_script()

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 20


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models: a second thread only adds contention (10x slower on a busy 2-core machine)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def dataset(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    prepare_dataset(str(corpus), tmp_path / "data", "char", val_fraction=0.3)
    return tmp_path / "data"


def _model(vocab: int) -> Transformer:
    return Transformer(ModelConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=4, max_seq_len=16)).eval()


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """(dataset, checkpoint) of a tiny model trained briefly on TEXT: far from uniform, so weight errors show
    in its perplexity (an untrained model's barely moves even with every linear layer zeroed)."""
    root = tmp_path_factory.mktemp("trained")
    (root / "corpus.txt").write_text(TEXT)
    prepare_dataset(str(root / "corpus.txt"), root / "data", "char", val_fraction=0.3)
    tok = load_tokenizer(root / "data")
    data = load_split(root / "data", "train")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see _one_thread (a session fixture starts before a module one)
    torch.manual_seed(0)
    model = _model(tok.vocab_size).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        x, y = get_batch(data, 16, 16, g, "cpu")
        _, loss = model(x, targets=y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    save_checkpoint(root / "ck", model.eval(), tok)
    return root / "data", root / "ck"


def _perplexity(capsys, checkpoint: Path, data: Path) -> float:
    assert eval_ppl.main(["--checkpoint", str(checkpoint), "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert "val loss" in out and "perplexity" in out
    return float(out.split("perplexity ")[1].split()[0])


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


INT8_BOUND = 0.005  # int8 weights may move the perplexity of the trained model by this fraction at most


def test_eval_ppl_cli_float_and_quantized(trained, tmp_path, capsys, monkeypatch):
    data, trained_ck = trained
    shutil.copytree(trained_ck, tmp_path / "ck")
    quantize_checkpoint(tmp_path / "ck", None, "int8")
    ppl = {name: _perplexity(capsys, tmp_path / name, data) for name in ("ck", "ck-int8")}
    vocab = load_tokenizer(data).vocab_size
    assert ppl["ck"] < vocab / 4  # trained: far below the uniform model's perplexity (the vocabulary size)
    assert abs(ppl["ck-int8"] / ppl["ck"] - 1) < INT8_BOUND

    # the bound has teeth: a quantiser that zeroes the int8 weights lands far outside it
    real = gpt.quant.quantize_model

    def zeroing(model, *args, **kwargs):
        block = real(model, *args, **kwargs)
        int8 = [v for v in model.state_dict().values() if v.dtype == torch.int8]
        assert int8, "no int8 tensor to break"
        for v in int8:
            v.zero_()
        return block

    monkeypatch.setattr(gpt.quant, "quantize_model", zeroing)
    quantize_checkpoint(tmp_path / "ck", tmp_path / "broken", "int8")
    broken = _perplexity(capsys, tmp_path / "broken", data)
    assert abs(broken / ppl["ck"] - 1) > 20 * INT8_BOUND


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
