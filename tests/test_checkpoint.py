import json
import os

import pytest
import torch
from safetensors.torch import save_file

from gpt.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from gpt.config import ModelConfig
from gpt.model import Transformer
from gpt.tokenizer import CharTokenizer


@pytest.fixture
def saved(tmp_path):
    cfg = ModelConfig(vocab_size=30, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16)
    model = Transformer(cfg)
    tok = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz .,\n")
    save_checkpoint(tmp_path / "ckpt", model, tok)
    return tmp_path / "ckpt", model, tok


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_save_load_bit_exact(tmp_path, tied, pos):
    cfg = ModelConfig(
        vocab_size=30,
        dim=32,
        n_layers=2,
        n_heads=4,
        max_seq_len=16,
        tie_embeddings=tied,
        pos_encoding=pos,
        attention="math",
        attention_kwargs={},
    )
    model = Transformer(cfg)
    tok = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz .,\n")
    save_checkpoint(tmp_path / "c", model, tok)
    assert sorted(os.listdir(tmp_path / "c")) == ["config.json", "model.safetensors", "tokenizer.json"]
    loaded, tok2 = load_checkpoint(tmp_path / "c")
    assert loaded.config == cfg and tok2.chars == tok.chars
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2), n1
    if tied:
        assert loaded.output.weight is loaded.tok_embeddings.weight
    idx = torch.randint(0, 30, (2, 16))
    assert torch.equal(model.eval()(idx), loaded(idx))


def test_dtype_and_device_at_load(saved):
    path, model, _ = saved
    m = load_model(path, device="cpu", dtype="bf16")
    assert m.output.weight.dtype == torch.bfloat16 and not m.training
    torch.testing.assert_close(m.output.weight.float(), model.output.weight.bfloat16().float())


def test_overwrite_is_atomic_and_leaves_no_temporaries(saved):
    path, model, tok = saved
    with torch.no_grad():
        model.output.weight.add_(1.0)
    save_checkpoint(path, model, tok)
    assert torch.equal(load_model(path).output.weight, model.output.weight)
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt"]


def test_failed_save_keeps_the_last_good_checkpoint(saved, monkeypatch):
    path, model, tok = saved
    before = load_model(path).output.weight.clone()

    def crash(*a, **k):
        raise KeyboardInterrupt  # e.g. Ctrl-C while the weights are being written

    monkeypatch.setattr("gpt.checkpoint.save_file", crash)
    with torch.no_grad():
        model.output.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model, tok)
    assert torch.equal(load_model(path).output.weight, before)
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt"]


def test_interrupted_rename_is_recovered(saved):
    path, model, _ = saved
    # a save that died between renaming the old checkpoint away and the new one in
    os.rename(path, path.parent / ".ckpt.previous")
    assert torch.equal(load_model(path).output.weight, model.output.weight)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist; train one with `python train_ddp.py`"):
        load_model(tmp_path / "nope")


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_missing_file(saved, name):
    path, _, _ = saved
    (path / name).unlink()
    with pytest.raises(CheckpointError, match=f"{name} is missing"):
        load_model(path)


def test_missing_tokenizer(saved):
    path, _, _ = saved
    (path / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="has no tokenizer.model or tokenizer.json"):
        load_checkpoint(path)


def test_truncated_weights(saved):
    path, _, _ = saved
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is truncated or corrupt") as e:
        load_model(path)
    assert "\n" not in str(e.value)


def test_corrupt_header(saved):
    path, _, _ = saved
    (path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(path)


def test_missing_and_unexpected_tensors(saved):
    path, model, _ = saved
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file({k: v for k, v in sd.items() if k != "norm.weight"}, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="lacks tensor\\(s\\) norm.weight"):
        load_model(path)
    save_file({**sd, "extra.weight": torch.zeros(2)}, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected tensor\\(s\\) extra.weight"):
        load_model(path)


def test_shape_mismatch_names_tensor_and_shapes(saved):
    path, _, _ = saved
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 64
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError,
        match=r"tensor layers.0.feed_forward.w1.weight has shape \(256, 32\) but "
        r"config.json implies \(64, 32\)",
    ):
        load_model(path)


def test_unknown_attention_variant(saved):
    path, _, _ = saved
    cfg = json.loads((path / "config.json").read_text())
    cfg["attention"] = "my_secret_attention"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json: unknown attention 'my_secret_attention'; available:"):
        load_model(path)


def test_bad_json(saved):
    path, _, _ = saved
    (path / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        load_model(path)


def test_stored_dtype_is_kept_at_load(tmp_path):
    """A bf16 checkpoint loads as bf16 ("as stored"), with the same values; --dtype still converts."""
    cfg = ModelConfig(vocab_size=30, dim=32, n_layers=2, n_heads=4, max_seq_len=16, tie_embeddings=True)
    model = Transformer(cfg).to(torch.bfloat16)
    save_checkpoint(tmp_path / "c", model, CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz .,\n"))
    loaded = load_model(tmp_path / "c")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert loaded.output.weight is loaded.tok_embeddings.weight
    for name, t in model.state_dict().items():
        assert torch.equal(t, loaded.state_dict()[name]), name
    assert load_model(tmp_path / "c", dtype="fp32").output.weight.dtype == torch.float32


_PEAK = """
import resource, sys
import torch
from gpt.checkpoint import load_model
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model = load_model(sys.argv[1])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert model.tok_embeddings.weight.dtype == torch.bfloat16
print((after - before) * 1024)
"""


@pytest.mark.slow
def test_loading_a_large_bf16_checkpoint_costs_one_copy_of_the_weights(tmp_path):
    """~1.1 GB of bf16 weights: the peak resident memory of loading stays near one copy, not the
    fp32 model plus the file that building a model and then copying into it costs."""
    import subprocess
    import sys

    cfg = ModelConfig(vocab_size=32000, dim=2048, n_layers=8, n_heads=16, max_seq_len=256)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(cfg).state_dict().items()}
    # random bf16 tensors of the model's shapes, written without building the model in fp32
    state = {k: torch.empty(s, dtype=torch.bfloat16).normal_(0, 0.02) for k, s in shapes.items()}
    nbytes = sum(t.numel() * 2 for t in state.values())
    assert nbytes > 1e9
    ckpt = tmp_path / "big"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"format_version": 1, **cfg.to_dict()}))
    save_file(state, str(ckpt / "model.safetensors"))
    del state
    done = subprocess.run([sys.executable, "-c", _PEAK, str(ckpt)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    growth = int(done.stdout.split()[-1])
    assert growth < 1.3 * nbytes, f"loading grew the peak memory by {growth / 1e9:.2f} GB for {nbytes / 1e9:.2f} GB"
