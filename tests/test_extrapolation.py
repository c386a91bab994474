"""Length extrapolation: evaluating a model on sequences longer than the length it was built for.

The positional tables grow at load (Transformer.extend_context, load_model(max_seq_len=...)); on
the old positions they are the same numbers, so the first block's logits do not move.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from gpt.attention import available
from gpt.checkpoint import CheckpointError, load_checkpoint, load_model, quantize_checkpoint, save_checkpoint
from gpt.config import ModelConfig
from gpt.data import load_split, prepare_dataset
from gpt.errors import ConfigError
from gpt.evaluate import evaluate
from gpt.model import Transformer
from gpt.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
T = 16  # the length the models are built for
# every built-in variant, with a window shorter than T where it has one
VARIANTS = {
    "sdpa": {},
    "math": {},
    "sliding_window": {"window": 4},
    "alibi": {},
    "softcap": {"cap": 5.0},
    "sigmoid": {},
    "linear": {},
    "sinks": {"window": 4},
    "differential": {},
}
TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 20


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _config(pos: str = "rope", attention: str = "sdpa") -> ModelConfig:
    return ModelConfig(
        vocab_size=40,
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        max_seq_len=T,
        pos_encoding=pos,
        attention=attention,
        attention_kwargs=VARIANTS.get(attention, {}),
    )


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only adds contention
    yield
    torch.set_num_threads(before)


def test_the_variant_list_covers_every_builtin():
    assert set(VARIANTS) <= set(available())
    assert {"sdpa", "math", "sliding_window", "alibi", "softcap", "sigmoid", "linear", "sinks"} <= set(VARIANTS)


@pytest.mark.parametrize("pos", ["rope", "sinusoidal"])
def test_longer_tables_agree_with_the_old_ones_on_the_old_positions(pos):
    model = Transformer(_config(pos))
    names = ("rope_cos", "rope_sin") if pos == "rope" else ("sin_table",)
    before = {n: getattr(model, n).clone() for n in (*names, "pos_ids")}
    model.extend_context(8 * T)
    assert model.config.max_seq_len == 8 * T
    for n, old in before.items():
        new = getattr(model, n)
        assert new.shape[0] == 8 * T and torch.equal(new[:T], old), n
        assert n not in model.state_dict()  # still a runtime table, never saved
    assert torch.equal(model.pos_ids, torch.arange(8 * T))


@pytest.mark.parametrize("pos", ["rope", "sinusoidal", "none"])
@pytest.mark.parametrize("attention", sorted(VARIANTS))
def test_twice_the_length_runs_and_keeps_the_first_block(pos, attention):
    model = Transformer(_config(pos, attention)).eval()
    idx = torch.randint(0, 40, (2, 2 * T))
    with torch.no_grad():
        ref = model(idx[:, :T])
        with pytest.raises(ValueError, match="exceeds max_seq_len"):
            model(idx)
        model.extend_context(2 * T)
        at_1x = model(idx[:, :T])
        at_2x = model(idx)
    assert torch.equal(at_1x, ref)  # the same computation: 1x is exactly what it was
    assert at_2x.shape == (2, 2 * T, 40) and torch.isfinite(at_2x).all()
    # causal: the first T positions of the longer sequence see what they saw before
    torch.testing.assert_close(at_2x[:, :T], ref, atol=1e-5, rtol=1e-5)


def test_variants_keep_what_they_computed_from_the_built_length():
    """sigmoid's bias is -log(max_seq_len) of the model it was trained as; rebuilding at 2x would move it."""
    model = Transformer(_config("rope", "sigmoid")).eval()
    idx = torch.randint(0, 40, (1, T))
    with torch.no_grad():
        ref = model(idx)
        model.extend_context(2 * T)
        assert torch.equal(model(idx), ref)
        rebuilt = Transformer(ModelConfig.from_dict({**_config("rope", "sigmoid").to_dict(), "max_seq_len": 2 * T}))
        rebuilt.load_state_dict(model.state_dict())
        assert (rebuilt(idx) - ref).abs().max() > 1e-3  # the test has teeth: a rebuilt model is another model


def test_learned_positions_refuse_in_one_line():
    model = Transformer(_config("learned"))
    model.extend_context(T)  # not longer: nothing to do
    with pytest.raises(ConfigError) as e:
        model.extend_context(2 * T)
    msg = str(e.value)
    assert "\n" not in msg and "pos_encoding=learned" in msg and "cannot extrapolate to 32" in msg
    assert model.config.max_seq_len == T and model.pos_ids.shape == (T,)


@pytest.fixture
def checkpoint(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    prepare_dataset(str(corpus), tmp_path / "data", "char", val_fraction=0.3)
    tok = load_tokenizer(tmp_path / "data")

    def save(pos: str, attention: str = "sdpa") -> Path:
        config = ModelConfig.from_dict({**_config(pos, attention).to_dict(), "vocab_size": tok.vocab_size})
        return save_checkpoint(tmp_path / f"ck-{pos}-{attention}", Transformer(config), tok)

    return tmp_path / "data", save


@pytest.mark.parametrize("dtype", [None, "bf16"])
@pytest.mark.parametrize("pos", ["rope", "sinusoidal"])
def test_load_with_a_longer_max_seq_len(checkpoint, pos, dtype):
    _, save = checkpoint
    ck = save(pos)
    saved = (ck / "config.json").read_bytes()
    plain = load_model(ck, dtype=dtype)
    longer = load_model(ck, dtype=dtype, max_seq_len=4 * T)
    assert (ck / "config.json").read_bytes() == saved and json.loads(saved)["max_seq_len"] == T
    assert plain.config.max_seq_len == T and longer.config.max_seq_len == 4 * T
    for name, buf in plain.named_buffers():
        assert getattr(longer, name).dtype == buf.dtype and torch.equal(getattr(longer, name)[:T], buf), name
    idx = torch.randint(0, plain.config.vocab_size, (2, 4 * T))
    with torch.no_grad():
        assert torch.equal(longer(idx[:, :T]), plain(idx[:, :T]))
        assert torch.isfinite(longer(idx).float()).all()


def test_load_learned_with_a_longer_max_seq_len_refuses(checkpoint):
    _, save = checkpoint
    ck = save("learned")
    assert load_model(ck, max_seq_len=T).config.max_seq_len == T
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(ck, max_seq_len=2 * T)
    assert str(e.value).startswith(f"{ck}: pos_encoding=learned") and "\n" not in str(e.value)


def test_a_quantized_checkpoint_extends_too(checkpoint):
    _, save = checkpoint
    ck = save("rope")
    out, _ = quantize_checkpoint(ck, None, "int8")
    plain, longer = load_model(out), load_model(out, max_seq_len=2 * T)
    idx = torch.randint(0, plain.config.vocab_size, (1, 2 * T))
    with torch.no_grad():
        assert torch.equal(longer(idx[:, :T]), plain(idx[:, :T]))
        # the int8 layers pick their kernel by row count (int8 activations up to 16 rows, bf16 above), so
        # two lengths agree to the kernels' precision, not to float32's
        torch.testing.assert_close(longer(idx)[:, :T], plain(idx[:, :T]), atol=5e-3, rtol=0)


@pytest.mark.parametrize("pos", ["rope", "sinusoidal", "none"])
def test_extrapolated_evaluation_at_1x_equals_todays(checkpoint, pos):
    data_dir, save = checkpoint
    ck = save(pos, "alibi" if pos == "none" else "sdpa")
    val = load_split(data_dir, "val")
    today = evaluate(load_model(ck), val, T)
    longer = load_model(ck, max_seq_len=8 * T)
    assert evaluate(longer, val, T) == today
    assert evaluate(longer, val, 2 * T).tokens > 0


def test_eval_ppl_block_size_past_max_seq_len(checkpoint, capsys):
    eval_ppl = _load_script("eval_ppl")
    data_dir, save = checkpoint
    ck = save("rope")
    assert eval_ppl.main(["--checkpoint", str(ck), "--data", str(data_dir), "--block-size", str(T)]) == 0
    at_1x = capsys.readouterr().out
    assert f"block {T}," in at_1x and "max_seq_len" not in at_1x
    assert eval_ppl.main(["--checkpoint", str(ck), "--data", str(data_dir), "--block-size", str(2 * T)]) == 0
    at_2x = capsys.readouterr().out
    assert f"block {2 * T} = 2x max_seq_len {T}," in at_2x
    loss = float(at_2x.split(" loss ")[1].split()[0])
    ref = evaluate(load_model(ck, max_seq_len=2 * T), load_split(data_dir, "val"), 2 * T).loss
    assert loss == pytest.approx(ref, abs=5e-5)  # printed to 4 decimals

    learned = save("learned")
    assert eval_ppl.main(["--checkpoint", str(learned), "--data", str(data_dir), "--block-size", str(2 * T)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: --block-size {2 * T}: {learned} has learned positions")
    assert f"pass --block-size {T} or less" in err
    assert eval_ppl.main(["--checkpoint", str(ck), "--data", str(data_dir), "--block-size", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--block-size" in err
    assert eval_ppl.main(["--checkpoint", str(ck), "--data", str(data_dir), "--block-size", "100000"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fewer than block size + 1 = 100001; pass a smaller --block-size" in err


# -- scripts/compare_attention.py --eval-lengths ---------------------------------------------------


@pytest.fixture
def compare():
    yield _load_script("compare_attention")
    for name in [n for n in sys.modules if n.startswith(("gpt_attention_plugin_", "compare_attention"))]:
        del sys.modules[name]


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--eval-lengths", "64,abc"], "argument --eval-lengths: '64,abc' is not a comma-separated list of integers"),
        (["--eval-lengths", "0,64"], "argument --eval-lengths: '0,64': give distinct positive lengths"),
        (["--eval-lengths", "64,64"], "argument --eval-lengths: '64,64': give distinct positive lengths"),
        (["--eval-lengths", "64", "--eval-tokens", "0"], "--eval-tokens 0 must be positive"),
    ],
)
def test_eval_lengths_flag_errors_are_one_line(compare, tmp_path, capsys, extra, expected):
    out = tmp_path / "cmp"
    assert compare.main(["--variants", "sdpa", "--steps", "2", "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert not out.exists()
    assert compare.eval_lengths("512, 64,128") == [64, 128, 512]


def test_eval_lengths_longer_than_the_val_split_refuse_before_training(compare, checkpoint, tmp_path, capsys):
    data_dir, _ = checkpoint
    out = tmp_path / "cmp"
    argv = ["--variants", "sdpa", "--steps", "2", "--out", str(out), "--preset", "tiny", "--data-dir", str(data_dir),
            "--block-size", "16", "--eval-lengths", "16,100000", "--threads", "1", "--no-progress"]  # fmt: skip
    assert compare.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: --eval-lengths 100000 needs 100001 val tokens" in err, err
    assert not (out / "sdpa" / "best").exists()


@pytest.mark.slow
def test_eval_lengths_table_and_plot(compare, shakespeare_char_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = [
        "--variants", "alibi,sdpa:pos_encoding=learned", "--steps", "4", "--out", str(out), "--no-compile",
        "--decode-tokens", "4", "--preset", "tiny", "--data-dir", str(shakespeare_char_dir), "--batch-size", "4",
        "--block-size", "16", "--eval-iters", "1", "--eval-interval", "2", "--threads", "1", "--no-progress",
        "--eval-lengths", "32,16,128", "--eval-tokens", "1000",
    ]  # fmt: skip
    assert compare.main(argv) == 0
    report = (out / "comparison.md").read_text()
    table = report.split("_Length extrapolation: ")[1].splitlines()
    assert table[0].startswith("val loss (nats/token) on the first 896 val tokens")  # 1000 rounded down to 7 x 128
    assert "trained at block 16" in table[0]
    assert table[2] == "| variant | pos enc | 16 (1x) | 32 (2x) | 128 (8x) |"
    rows = [line.split(" | ") for line in table[4:6]]
    assert rows[0][:2] == ["| alibi", "none"] and rows[1][:2] == ["| sdpa:pos_encoding=learned", "learned"]
    assert rows[1][3:] == ["n/a", "n/a |"]  # learned positions past the training block
    results = json.loads((out / "comparison.json").read_text())["results"]
    # the table's numbers are the evaluation of the best checkpoint, extended, on the first 896 val tokens
    val = load_split(shakespeare_char_dir, "val")
    model = load_model(out / "alibi" / "best", max_seq_len=128)
    for n, cell in zip((16, 32, 128), rows[0][2:], strict=True):
        expected = evaluate(model, val, n, max_tokens=896)
        assert expected.tokens == 896 and float(cell.strip(" |")) == pytest.approx(expected.loss, abs=5e-5)
        assert results[0]["length_loss"][str(n)] == pytest.approx(expected.loss)
    assert (out / "length_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "length_loss.png" in capsys.readouterr().out
