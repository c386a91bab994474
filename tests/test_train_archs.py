"""The training loop trains every architecture: the encoder on masked LM, the encoder-decoder on a parallel corpus."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import train_ddp
from gpt.checkpoint import load_checkpoint
from gpt.config import ModelConfig
from gpt.encoder import MaskedLM, special_ids
from gpt.pairs import load_pairs, pair_batch, prepare_pairs
from gpt.seq2seq import EncoderDecoder
from gpt.training import TrainConfig, TrainError, train

WORDS = "haue you had quiet guard not a mouse stirring well good night giue me your hand loue liue".split()


@pytest.fixture(scope="module")
def pair_corpus(tmp_path_factory) -> Path:
    """Folio-like -> modern pairs in the gpt.parallel format: u for v, and a final e dropped."""
    d = tmp_path_factory.mktemp("pairs")
    rng = random.Random(0)
    for split, n in (("train", 400), ("val", 60), ("test", 20)):
        rows = []
        for _ in range(n):
            src = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 7)))
            tgt = src.replace("haue", "have").replace("giue", "give").replace("loue", "love").replace("liue", "live")
            rows.append(json.dumps({"src": src.capitalize(), "tgt": tgt.capitalize() + ".", "play": "p"}))
        (d / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    return d


def tiny(data_dir: Path, out: Path, **kw) -> TrainConfig:
    settings = dict(
        preset="tiny", data_dir=str(data_dir), out=str(out), batch_size=8, block_size=32, lr=3e-3, min_lr=3e-4,
        warmup_steps=2, max_steps=8, eval_interval=4, eval_iters=2, progress=False, peak_tflops=1.0, threads=1,
    )  # fmt: skip
    settings.update(kw)
    return TrainConfig(**settings)


def rows_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_pairs_are_tokenized_once_and_batched_with_bos_eos_and_padding(pair_corpus, tmp_path):
    meta = prepare_pairs(pair_corpus, tmp_path / "d")
    assert meta["kind"] == "pairs" and meta["train_pairs"] == 400 and meta["val_pairs"] == 60
    pairs = load_pairs(tmp_path / "d", "train")
    ids = special_ids(ModelConfig(vocab_size=meta["vocab_size"] + 4, dim=8, n_heads=1, n_layers=1, arch="seq2seq"))
    b = pair_batch(pairs, 4, 48, ids, torch.Generator().manual_seed(0))
    again = pair_batch(pairs, 4, 48, ids, torch.Generator().manual_seed(0))
    assert all(torch.equal(b[k], again[k]) for k in b)
    assert b["tgt"][:, 0].eq(ids.bos).all()
    for r in range(4):
        n_src = int(b["src_mask"][r].sum())
        assert b["src"][r, n_src:].eq(ids.pad).all() and b["src"][r, :n_src].lt(ids.pad).all()
        real = b["targets"][r] != -100
        n = int(real.sum())
        assert b["targets"][r, n - 1] == ids.eos and torch.equal(b["tgt"][r, 1:n], b["targets"][r, : n - 1])
        assert b["tgt"][r, n:].eq(ids.pad).all()


@pytest.mark.parametrize(
    "arch,extra",
    [
        ("encoder", {}),
        ("seq2seq", dict(norm_position="post", ffn="relu", pos_encoding="sinusoidal", label_smoothing=0.1)),
        ("seq2seq", dict(attention="alibi", pos_encoding="none", tie_embeddings=True)),
    ],
)
def test_each_architecture_trains_and_lowers_its_loss(arch, extra, shakespeare_char_dir, pair_corpus, tmp_path):
    data_dir = tmp_path / "pairs-char" if arch == "seq2seq" else shakespeare_char_dir
    data = dict(data=str(pair_corpus)) if arch == "seq2seq" else {}
    out = tmp_path / "run"
    summary = train(tiny(data_dir, out, arch=arch, max_steps=40, eval_interval=10, **data, **extra))
    rows = rows_of(out)
    assert summary["stopped"] == "finished" and [r["step"] for r in rows] == [10, 20, 30, 40]
    # measured val losses at steps 10..40: encoder 3.575 3.480 3.439 3.417; seq2seq post-norm 2.920 2.376
    # 2.143 2.072; seq2seq alibi 2.617 2.053 1.811 1.716
    first = json.loads((out / "run.json").read_text())
    losses = [r["val_loss"] for r in rows]
    assert losses == sorted(losses, reverse=True) and losses[-1] < losses[0] - 0.1, losses
    model, tok = load_checkpoint(out / "best")
    assert isinstance(model, MaskedLM if arch == "encoder" else EncoderDecoder)
    assert model.config.arch == arch and model.config.vocab_size == tok.vocab_size + 4
    assert first["model"]["arch"] == arch


@pytest.mark.parametrize("arch", ["encoder", "seq2seq"])
def test_resume_is_exact(arch, shakespeare_char_dir, pair_corpus, tmp_path):
    """N steps then --resume for N more == 2N steps in one go (with dropout: the RNG state is restored)."""
    n = 4
    data_dir = tmp_path / "pairs-char" if arch == "seq2seq" else shakespeare_char_dir
    data = dict(data=str(pair_corpus)) if arch == "seq2seq" else {}
    common = dict(arch=arch, max_steps=2 * n, decay_steps=2 * n, eval_interval=2, dropout=0.1, **data)
    train(tiny(data_dir, tmp_path / "straight", **common))
    train(tiny(data_dir, tmp_path / "split", **{**common, "max_steps": n}))
    train(tiny(data_dir, tmp_path / "split", **common, resume=True))
    a, b = rows_of(tmp_path / "straight"), rows_of(tmp_path / "split")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [2, 4, 6, 8]
    for x, y in zip(a, b, strict=True):
        assert x["train_loss"] == pytest.approx(y["train_loss"], abs=1e-6)
        assert x["val_loss"] == pytest.approx(y["val_loss"], abs=1e-6)
    wa = load_checkpoint(tmp_path / "straight" / "latest")[0].state_dict()
    wb = load_checkpoint(tmp_path / "split" / "latest")[0].state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_seq2seq_needs_a_parallel_corpus_in_one_line(shakespeare_char_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("some text\n" * 50)
    argv = ["--preset", "tiny", "--arch", "seq2seq", "--data", str(text), "--out", str(tmp_path / "o"), "--no-progress"]
    assert train_ddp.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--arch seq2seq trains on a parallel corpus" in err
    with pytest.raises(TrainError, match="was not prepared from a parallel corpus"):
        train(tiny(shakespeare_char_dir, tmp_path / "o2", arch="seq2seq"))


def test_train_ddp_cli_trains_an_encoder_decoder(pair_corpus, tmp_path):
    out = tmp_path / "cli"
    argv = [
        "--preset", "tiny", "--arch", "seq2seq", "--data", str(pair_corpus), "--data-dir", str(tmp_path / "d"),
        "--out", str(out), "--max-steps", "4", "--eval-interval", "2", "--eval-iters", "1", "--batch-size", "4",
        "--block-size", "32", "--threads", "1", "--peak-tflops", "1", "--no-progress", "--norm-position", "post",
    ]  # fmt: skip
    assert train_ddp.main(argv) == 0
    model, tok = load_checkpoint(out / "best")
    assert model.config.norm_position == "post" and isinstance(model, EncoderDecoder)
    src = torch.as_tensor(np.asarray(tok.encode("Haue you")))[None]
    assert isinstance(model.greedy(src, None, 5), list)


def test_eval_arch_scores_both_architectures(pair_corpus, shakespeare_char_dir, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "eval_arch", Path(__file__).parent.parent / "scripts" / "eval_arch.py"
    )
    eval_arch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_arch)
    train(tiny(tmp_path / "d", tmp_path / "s2s", arch="seq2seq", data=str(pair_corpus), max_steps=2, eval_interval=2))
    argv = [
        "--checkpoint",
        str(tmp_path / "s2s" / "best"),
        "--data",
        str(pair_corpus),
        "--json",
        str(tmp_path / "s.json"),
    ]
    assert eval_arch.main(argv + ["--chunk", "16"]) == 0
    result = json.loads((tmp_path / "s.json").read_text())
    assert result["split"] == "test" and result["model"]["n"] == result["copy_baseline"]["n"] == 20
    assert "copy baseline  chrF" in capsys.readouterr().out
    train(tiny(shakespeare_char_dir, tmp_path / "enc", arch="encoder", max_steps=2, eval_interval=2))
    argv = ["--checkpoint", str(tmp_path / "enc" / "best"), "--data", str(shakespeare_char_dir), "--blocks", "8"]
    assert eval_arch.main(argv + ["--json", str(tmp_path / "e.json")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert 0 <= result["masked_accuracy"] <= 1 and result["masked_tokens"] > 0
    train(tiny(shakespeare_char_dir, tmp_path / "dec", max_steps=2, eval_interval=2))
    assert eval_arch.main(["--checkpoint", str(tmp_path / "dec" / "best"), "--data", str(shakespeare_char_dir)]) == 2
    assert "is a decoder model; use scripts/eval_ppl.py" in capsys.readouterr().err
