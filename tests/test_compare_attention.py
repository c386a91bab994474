"""scripts/compare_attention.py: variants trained on equal terms, a markdown table and a val-loss PNG."""

import importlib.util
import json
import sys
import textwrap
from pathlib import Path

import pytest

from gpt.attention import _REGISTRY
from gpt.attention import plugin as plugin_mod
from gpt.config import ConfigError
from gpt.training import TrainConfig, TrainError

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "compare_attention.py"

PLUGIN = textwrap.dedent(
    '''
    """Softmax attention at a temperature: a user's variant in a file."""
    import math

    from gpt.attention import Attention, causal_mask, repeat_kv


    class CompareWarm(Attention):
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


@pytest.fixture
def compare():
    spec = importlib.util.spec_from_file_location("compare_attention", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    registry, sources = dict(_REGISTRY), dict(plugin_mod._SOURCES)
    yield mod
    _REGISTRY.clear()
    _REGISTRY.update(registry)
    plugin_mod._SOURCES.clear()
    plugin_mod._SOURCES.update(sources)
    for name in [n for n in sys.modules if n.startswith(("gpt_attention_plugin_", "compare_attention"))]:
        del sys.modules[name]


def test_variant_syntax(compare):
    v = compare.parse_variant("sliding_window:window=64")
    assert (v.spec, v.kwargs, v.pos_encoding, v.label) == (
        "sliding_window",
        {"window": 64},
        None,
        "sliding_window:window=64",
    )
    v = compare.parse_variant("/some/dir/my_attn.py:Cos:temperature=0.5:name=x:pos_encoding=none")
    assert v.spec == "/some/dir/my_attn.py:Cos" and v.kwargs == {"temperature": 0.5, "name": "x"}
    assert v.pos_encoding == "none" and v.label == "my_attn.py:Cos:temperature=0.5:name=x:pos_encoding=none"
    assert compare.parse_variant("mypkg.attn:cos").spec == "mypkg.attn:cos"
    assert [v.spec for v in compare.parse_variants("sdpa, alibi,sliding_window:window=8")] == [
        "sdpa",
        "alibi",
        "sliding_window",
    ]
    with pytest.raises(TrainError, match="settings last"):
        compare.parse_variant("sliding_window:window=8:extra")
    with pytest.raises(TrainError, match="names a variant twice"):
        compare.parse_variants("sdpa,sdpa")


def test_alibi_trains_without_rope_unless_told(compare, tmp_path):
    base = TrainConfig(preset="tiny")
    assert compare.variant_config(base, compare.parse_variant("alibi"), tmp_path).pos_encoding == "none"
    assert compare.variant_config(base, compare.parse_variant("sdpa"), tmp_path).pos_encoding is None  # the preset's
    v = compare.parse_variant("alibi:pos_encoding=rope")
    assert compare.variant_config(base, v, tmp_path).pos_encoding == "rope"


def test_a_missing_plugin_is_one_line_before_any_training(compare, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert compare.main(["--variants", f"sdpa,{tmp_path}/gone.py:X", "--steps", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: attention plug-in file {tmp_path}/gone.py not found" in err
    assert not out.exists()
    with pytest.raises(ConfigError):
        compare.variant_config(TrainConfig(), compare.parse_variant("nope"), out)
    assert compare.main(["--steps", "2"]) == 2
    assert capsys.readouterr().err == (
        "error: the following arguments are required: --variants (see python scripts/compare_attention.py --help)\n"
    )


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--max-steps", "9"], "--max-steps does nothing here (--steps decides it); drop it"),
        (["--max-tokens", "900"], "--max-tokens does nothing here (--steps decides it); drop it"),
        (["--attention", "alibi"], "--attention does nothing here (--variants decides it); drop it"),
        (["--resume"], "--resume is not supported here"),
        (["--evals", "3", "--eval-interval", "2"], "--evals does nothing with --eval-interval"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag (see python train_ddp.py --help)"),
        (["--steps", "0"], "--steps, --evals and --decode-tokens must be positive"),
    ],
)
def test_flags_that_would_do_nothing_are_refused_in_one_line(compare, tmp_path, capsys, extra, expected):
    out = tmp_path / "cmp"
    assert compare.main(["--variants", "sdpa", "--steps", "2", "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert not out.exists()


def test_training_settings_come_from_flags_and_a_config_file(compare, tmp_path):
    (tmp_path / "run.yaml").write_text("preset: tiny\nlr: 1e-3\neval_interval: 3\n")
    args, _ = compare.build_parser().parse_known_args(["--variants", "sdpa", "--steps", "12"])
    cfg = compare.base_config(args, ["--config", str(tmp_path / "run.yaml"), "--lr", "0.004"])
    assert (cfg.preset, cfg.lr, cfg.eval_interval, cfg.max_steps) == ("tiny", 0.004, 3, 12)
    cfg = compare.base_config(args, ["--preset", "tiny"])
    assert cfg.eval_interval == 1  # --steps 12 // the default 10 evaluations


@pytest.mark.slow
def test_two_variants_end_to_end(compare, shakespeare_char_dir, tmp_path, capsys):
    plugin = tmp_path / "warm.py"
    plugin.write_text(PLUGIN)
    out = tmp_path / "cmp"
    argv = [
        "--variants", f"alibi,{plugin}:CompareWarm:temperature=2", "--steps", "4", "--out", str(out),
        "--no-compile", "--decode-tokens", "8", "--preset", "tiny", "--data-dir", str(shakespeare_char_dir),
        "--batch-size", "4", "--block-size", "32", "--eval-iters", "1", "--eval-interval", "2", "--threads", "1",
        "--peak-tflops", "1", "--no-progress",
    ]  # fmt: skip
    assert compare.main(argv) == 0
    table = (out / "comparison.md").read_text().splitlines()
    assert table[0].startswith(f"_4 steps of preset tiny on {shakespeare_char_dir.name} (char tokens), 128 tokens/step")
    assert "decode: batch 1, greedy, median of 3, eager" in table[0]
    rows = [line.split(" | ") for line in table[4:]]
    assert [r[0] for r in rows] == ["| alibi", "| warm.py:CompareWarm:temperature=2"]
    assert [r[1] for r in rows] == ["none", "rope"]
    assert rows[0][2] == rows[1][2]  # the same parameter budget, so no "+N"
    results = json.loads((out / "comparison.json").read_text())["results"]
    for r in results:
        assert [step for step, _ in r["curve"]] == [2, 4]
        assert r["final_val_loss"] == r["curve"][-1][1] and r["best_val_loss"] <= r["final_val_loss"]
        assert r["train_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0 and r["peak_memory_mb"] > 0
    assert results[1]["attention"] == "CompareWarm" and results[1]["attention_kwargs"] == {"temperature": 2}
    saved = json.loads((out / "warm.py_CompareWarm_temperature=2" / "best" / "config.json").read_text())
    assert saved["attention_source"] == f"{plugin.resolve()}:CompareWarm"
    assert (out / "val_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["encoder", "seq2seq"])
def test_variants_compare_in_the_encoder_and_the_encoder_decoder(compare, shakespeare_char_dir, tmp_path, arch):
    """--arch: the same seed, batches (and MLM masks) and steps for every variant, in that architecture."""
    if arch == "seq2seq":
        corpus = tmp_path / "corpus"
        corpus.mkdir()
        for split in ("train", "val"):
            rows = [{"src": f"Haue {i} loue", "tgt": f"Have {i} love", "play": "p"} for i in range(40)]
            (corpus / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        data = ["--data", str(corpus), "--data-dir", str(tmp_path / "pairs")]
    else:
        data = ["--data-dir", str(shakespeare_char_dir)]
    out = tmp_path / "cmp"
    argv = [
        "--arch", arch, "--variants", "sdpa,alibi,linear", "--steps", "4", "--out", str(out), "--no-compile",
        "--decode-tokens", "8", "--preset", "tiny", "--batch-size", "4", "--block-size", "32", "--eval-iters", "1",
        "--eval-interval", "2", "--threads", "1", "--peak-tflops", "1", "--no-progress", *data,
    ]  # fmt: skip
    assert compare.main(argv) == 0
    table = (out / "comparison.md").read_text().splitlines()
    assert table[0].startswith(f"_4 steps of preset tiny, arch={arch} on ")
    results = json.loads((out / "comparison.json").read_text())["results"]
    assert [r["arch"] for r in results] == [arch] * 3
    runs = [json.loads((out / slug / "run.json").read_text()) for slug in ("sdpa", "alibi", "linear")]
    assert all(r["model"]["arch"] == arch for r in runs)
    # the same data order: every variant's first batch holds the same tokens
    assert (
        runs[0]["rank_first_batch_tokens"] == runs[1]["rank_first_batch_tokens"] == runs[2]["rank_first_batch_tokens"]
    )
    assert len({r["final_val_loss"] for r in results}) == 3  # and the variants differ
    if arch == "encoder":
        assert all(r["decode_tokens_per_s"] is None for r in results) and "| n/a |" in table[4]
    else:
        assert all(r["decode_tokens_per_s"] > 0 for r in results)
