"""Hugging Face LLaMA interop: parity with transformers (an implementation nobody here wrote).

Every HF model is built locally from a LlamaConfig (no network). Weights are drawn with std 0.2,
well above the default init, so that a wrong layout cannot hide under near-uniform attention.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from gpt.checkpoint import load_checkpoint, load_model, save_checkpoint
from gpt.config import ModelConfig
from gpt.data import shakespeare_files
from gpt.generation import generate
from gpt.hf import (
    HFError,
    convert_hf_checkpoint,
    export_hf,
    from_hf_config,
    from_hf_state_dict,
    hf_config_dict,
    hf_to_ours_name,
    to_hf_state_dict,
)
from gpt.model import Transformer
from gpt.tokenizer import CharTokenizer, train_sentencepiece

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 384  # the sentencepiece model below; byte fallback needs at least 256 + a few pieces
PROMPT, NEW_TOKENS = "To be, or not to be", 32


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _weights(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """std 0.2 everywhere; norm gains around 1 (so a swapped norm shows too)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32) * 0.2
            p.copy_((1 + noise) if "norm" in name else noise)


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sp")
    text = out / "text.txt"
    text.write_text(next(f for f in shakespeare_files() if f.name == "hamlet_gut.txt").read_text()[:100_000])
    train_sentencepiece([text], out, vocab_size=VOCAB)
    return out


def _hf_llama(tied: bool, head_dim: int | None, seed: int) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA
        head_dim=head_dim,
        max_position_embeddings=64,
        rms_norm_eps=1e-3,  # not our default, so a dropped eps would show
        rope_parameters={"rope_theta": 500.0, "rope_type": "default"},  # nor is this
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=None,  # generation runs its full 32 tokens
    )
    model = LlamaForCausalLM(cfg)
    _randomize(model, seed)
    return model.eval()


# (untied, default head_dim) and (tied, head_dim 32 != hidden/heads = 16)
CASES = {"untied": (False, None), "tied-head_dim32": (True, 32)}


@pytest.fixture(scope="module", params=list(CASES))
def hf_case(request, tmp_path_factory, sp_dir):
    """An HF checkpoint saved single-file and sharded, both converted to our format."""
    tied, head_dim = CASES[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    hf = _hf_llama(tied, head_dim, seed=1 + tied)
    hf.save_pretrained(tmp / "hf-single")
    hf.save_pretrained(tmp / "hf-sharded", max_shard_size="40KB")
    for d in ("hf-single", "hf-sharded"):
        (tmp / d / "tokenizer.model").write_bytes((sp_dir / "tokenizer.model").read_bytes())
        convert_hf_checkpoint(tmp / d, tmp / f"ours-{d}", log=lambda s: None)
    return hf, tmp


def _greedy_uncached(model: Transformer, prompt: torch.Tensor, n: int) -> torch.Tensor:
    ids = prompt
    for _ in range(n):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def _greedy_ours(model: Transformer, tok, compile: bool = False) -> torch.Tensor:
    """Prompt + greedy continuation through gpt.generation (prefill, static KV cache, optionally the
    compiled fullgraph step): the path generate.py serves."""
    r = generate(model, tok, PROMPT, NEW_TOKENS, temperature=0.0, compile=compile)
    return torch.tensor([r.prompt_tokens[0] + r.tokens[0]])


# -- import: HF -> ours --------------------------------------------------------------------------


def test_converted_logits_match_transformers(hf_case):
    hf, tmp = hf_case
    model, tok = load_checkpoint(tmp / "ours-hf-single")  # what generate.py loads
    assert tok.vocab_size == VOCAB
    idx = torch.randint(0, VOCAB, (2, 48))
    with torch.no_grad():
        ref = hf(idx).logits
        ours = model(idx)
    assert ref.abs().max() > 1.0  # the logits are far from uniform: layout bugs would show
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def _hf_greedy(hf: LlamaForCausalLM, prompt: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    assert ref.shape == (1, prompt.size(1) + NEW_TOKENS)  # no early eos: all 32 tokens are compared
    assert len(set(ref[0, prompt.size(1) :].tolist())) > 3  # not one token repeated
    return ref


def test_greedy_generation_matches_transformers(hf_case):
    hf, tmp = hf_case
    model, tok = load_checkpoint(tmp / "ours-hf-single")
    cached = _greedy_ours(model, tok)
    prompt = cached[:, : cached.size(1) - NEW_TOKENS]
    ref = _hf_greedy(hf, prompt)
    with torch.no_grad():
        uncached = _greedy_uncached(model, prompt, NEW_TOKENS)
    assert uncached.tolist() == ref.tolist()
    assert cached.tolist() == ref.tolist()


@pytest.mark.slow
def test_compiled_cached_decode_matches_transformers(tmp_path, sp_dir):
    """The serving path: static cache + torch.compile(fullgraph=True) one-token step."""
    torch._dynamo.reset()
    hf = _hf_llama(tied=False, head_dim=None, seed=3)
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.model").write_bytes((sp_dir / "tokenizer.model").read_bytes())
    convert_hf_checkpoint(tmp_path / "hf", tmp_path / "ours", log=lambda s: None)
    model, tok = load_checkpoint(tmp_path / "ours")
    ours = _greedy_ours(model, tok, compile=True)
    assert ours.tolist() == _hf_greedy(hf, ours[:, : ours.size(1) - NEW_TOKENS]).tolist()


def test_sharded_converts_identically_to_single_file(hf_case):
    _, tmp = hf_case
    n_shards = len(list((tmp / "hf-sharded").glob("model-*.safetensors")))
    assert n_shards > 3
    single, sharded = (
        _weights(tmp / "ours-hf-single/model.safetensors"),
        _weights(tmp / "ours-hf-sharded/model.safetensors"),
    )
    assert single.keys() == sharded.keys()
    assert all(torch.equal(single[k], sharded[k]) for k in single)
    assert (tmp / "ours-hf-single/config.json").read_text() == (tmp / "ours-hf-sharded/config.json").read_text()
    assert (tmp / "ours-hf-single/tokenizer.model").read_bytes() == (
        tmp / "ours-hf-sharded/tokenizer.model"
    ).read_bytes()


def test_legacy_pytorch_model_bin_converts_like_safetensors(hf_case, tmp_path):
    hf, tmp = hf_case
    (tmp_path / "config.json").write_text((tmp / "hf-single/config.json").read_text())
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")  # read back with weights_only=True
    convert_hf_checkpoint(tmp_path, tmp_path / "ours", log=lambda s: None)
    a, b = _weights(tmp / "ours-hf-single/model.safetensors"), _weights(tmp_path / "ours/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_convert_without_a_sentencepiece_tokenizer_warns_and_keeps_the_weights(hf_case, tmp_path, capsys):
    _, tmp = hf_case
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((tmp / "hf-single" / name).read_bytes())
    (tmp_path / "tokenizer.model").write_text("IHNoaXMgaXMgbm90 0\n")  # a tiktoken-style file, as in Llama 3
    convert_hf_checkpoint(tmp_path, tmp_path / "ours", log=lambda s: None)
    err = capsys.readouterr().err
    assert err.startswith("warning: ") and "not a readable sentencepiece model" in err and "has no tokenizer" in err
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["config.json", "model.safetensors"]
    a, b = _weights(tmp / "ours-hf-single/model.safetensors"), _weights(tmp_path / "ours/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_converted_config_reads_every_field(hf_case):
    hf, tmp = hf_case
    cfg = load_model(tmp / "ours-hf-single").config
    c = hf.config
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads) == (64, 2, 4, 2)
    assert (cfg.head_dim, cfg.intermediate_size, cfg.vocab_size) == (c.head_dim, 96, VOCAB)
    assert (cfg.norm_eps, cfg.rope_base, cfg.max_seq_len, cfg.tie_embeddings) == (
        1e-3,
        500.0,
        64,
        c.tie_word_embeddings,
    )


def test_convert_casts_dtype_and_caps_max_seq_len(hf_case, tmp_path):
    _, tmp = hf_case
    convert = _script("convert_hf_checkpoint")
    out = tmp_path / "bf16"
    assert (
        convert.main(["--hf-dir", str(tmp / "hf-sharded"), "--out", str(out), "--dtype", "bf16", "--max-seq-len", "32"])
        == 0
    )
    model = load_model(out)
    assert model.config.max_seq_len == 32
    ref = _weights(tmp / "ours-hf-single/model.safetensors")
    got = _weights(out / "model.safetensors")
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], ref[k].bfloat16()) for k in ref)


# -- export: ours -> HF ----------------------------------------------------------------------------


def _our_checkpoint(path: Path, sp_dir: Path, tied: bool, dtype=torch.float32) -> Transformer:
    from gpt.tokenizer import load_tokenizer

    cfg = ModelConfig(
        vocab_size=VOCAB,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=24 if tied else None,
        intermediate_size=80,
        norm_eps=1e-3,
        rope_base=300.0,
        max_seq_len=48,
        tie_embeddings=tied,
    )
    model = Transformer(cfg)
    _randomize(model, seed=7 + tied)
    model = model.to(dtype).eval()
    save_checkpoint(path, model, load_tokenizer(sp_dir))
    return model


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_exported_checkpoint_loads_in_transformers_with_our_logits(tmp_path, sp_dir, tied):
    model = _our_checkpoint(tmp_path / "ours", sp_dir, tied)
    export = _script("export_hf")
    assert export.main(["--checkpoint", str(tmp_path / "ours"), "--out", str(tmp_path / "hf")]) == 0
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.tie_word_embeddings == tied
    idx = torch.randint(0, VOCAB, (2, 40))
    with torch.no_grad():
        ours, ref = model(idx), hf(idx).logits
    assert ref.abs().max() > 1.0
    torch.testing.assert_close(ref, ours, atol=1e-4, rtol=0)


def test_exported_tokenizer_matches_ours_in_transformers(tmp_path, sp_dir):
    _our_checkpoint(tmp_path / "ours", sp_dir, tied=False)
    export_hf(tmp_path / "ours", tmp_path / "hf")
    _, tok = load_checkpoint(tmp_path / "ours")
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in ["HAMLET:\nTo be, or not to be,  that is the question.", "Grüße 2024 ☃", "a\n\nb"]:
        ids = tok.encode(text, bos=True)
        assert hf_tok(text)["input_ids"] == ids
        assert hf_tok.decode(ids, skip_special_tokens=True) == text


@pytest.mark.parametrize("tied,dtype", [(False, torch.float32), (True, torch.bfloat16)], ids=["fp32", "bf16-tied"])
def test_round_trip_ours_hf_ours_is_bit_exact(tmp_path, sp_dir, tied, dtype):
    _our_checkpoint(tmp_path / "ours", sp_dir, tied, dtype)
    export_hf(tmp_path / "ours", tmp_path / "hf")
    convert_hf_checkpoint(tmp_path / "hf", tmp_path / "back", log=lambda s: None)
    a, b = _weights(tmp_path / "ours/model.safetensors"), _weights(tmp_path / "back/model.safetensors")
    assert a.keys() == b.keys()
    assert all(a[k].dtype == dtype and a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "ours/config.json").read_text()) == json.loads(
        (tmp_path / "back/config.json").read_text()
    )
    assert (tmp_path / "ours/tokenizer.model").read_bytes() == (tmp_path / "back/tokenizer.model").read_bytes()


def test_state_dict_mapping_is_a_bijection():
    cfg = ModelConfig(vocab_size=50, dim=32, n_layers=3, n_heads=4, n_kv_heads=1)
    sd = Transformer(cfg).state_dict()
    hf_sd = to_hf_state_dict(sd, cfg)
    assert hf_sd.keys() == LlamaForCausalLM(LlamaConfig(**hf_config_dict(cfg))).state_dict().keys()
    back = from_hf_state_dict(hf_sd, cfg)
    assert back.keys() == sd.keys() and all(back[k] is sd[k] for k in sd)


def test_config_round_trip_through_hf_dict():
    cfg = ModelConfig(
        vocab_size=50,
        dim=48,
        n_layers=3,
        n_heads=6,
        n_kv_heads=2,
        head_dim=16,
        norm_eps=1e-6,
        rope_base=5e5,
        max_seq_len=100,
        tie_embeddings=True,
        intermediate_size=130,
    )
    assert from_hf_config(hf_config_dict(cfg)) == cfg


# -- what the HF config.json may say -----------------------------------------------------------------

BASE = {
    "model_type": "llama",
    "vocab_size": 50,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 128,
}


def test_from_hf_config_reads_old_and_new_rope_theta_and_hf_defaults():
    old = from_hf_config({**BASE, "rope_theta": 1e6, "rope_scaling": None, "rms_norm_eps": 1e-5})
    new = from_hf_config({**BASE, "rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}})
    assert (old.rope_base, old.norm_eps) == (1e6, 1e-5)
    assert new.rope_base == 5e5
    assert new.norm_eps == 1e-6  # transformers' default when config.json omits it
    assert (new.n_kv_heads, new.head_dim, new.tie_embeddings) == (4, 8, False)  # MHA, hidden/heads, untied
    assert from_hf_config({**BASE, "num_key_value_heads": 1, "head_dim": 16}).head_dim == 16
    assert from_hf_config(BASE, max_seq_len=64).max_seq_len == 64
    assert from_hf_config(BASE, max_seq_len=128).max_seq_len == 128
    with pytest.raises(HFError, match="--max-seq-len 129 is above config.json field max_position_embeddings=128"):
        from_hf_config(BASE, max_seq_len=129)  # a cap that would do nothing is refused


@pytest.mark.parametrize(
    "patch,field",
    [
        ({"rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0}}, "rope_parameters.rope_type"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling.rope_type='linear'"),
        ({"rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.5}}, "partial_rotary_factor"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"model_type": "mistral"}, "model_type='mistral'"),
        ({"architectures": ["LlamaForSequenceClassification"]}, "architectures"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
        ({"num_key_value_heads": 3}, "n_kv_heads=3"),
    ],
)
def test_from_hf_config_refuses_what_we_do_not_implement(patch, field):
    with pytest.raises(HFError, match=re.escape(field)) as e:
        from_hf_config({**BASE, **patch})
    assert str(e.value).startswith("config.json ") and "\n" not in str(e.value)


def test_unknown_tensors_are_refused_by_name():
    with pytest.raises(HFError, match=r"model.layers.0.self_attn.q_proj.bias .*biases are not supported"):
        hf_to_ours_name("model.layers.0.self_attn.q_proj.bias")
    assert hf_to_ours_name("model.layers.3.self_attn.rotary_emb.inv_freq") is None


@pytest.mark.parametrize(
    "change,reason",
    [
        ({"attention": "linear"}, "attention='linear'.*standard softmax attention"),
        ({"attention_kwargs": {"window": 8}}, "attention_kwargs"),
        ({"pos_encoding": "learned"}, "pos_encoding='learned'.*rotary"),
    ],
)
def test_hf_config_dict_refuses_what_llama_cannot_express(change, reason):
    cfg = ModelConfig(vocab_size=50, dim=32, n_layers=1, n_heads=4)
    for k, v in change.items():
        setattr(cfg, k, v)  # after validation: any registered variant would do, none is registered here
    with pytest.raises(HFError, match=reason):
        hf_config_dict(cfg)


# -- CLI errors: one line on stderr, exit status 2 ----------------------------------------------------


def test_export_refuses_char_tokenizer_and_quantized(tmp_path, capsys):
    export = _script("export_hf")
    cfg = ModelConfig(vocab_size=30, dim=32, n_layers=1, n_heads=4)
    save_checkpoint(tmp_path / "char", Transformer(cfg), CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz .,\n"))
    assert export.main(["--checkpoint", str(tmp_path / "char"), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "char tokenizer" in err
    assert not (tmp_path / "hf").exists()

    raw = json.loads((tmp_path / "char/config.json").read_text())
    (tmp_path / "char/config.json").write_text(json.dumps({**raw, "quantization": {"bits": 8}}))
    assert export.main(["--checkpoint", str(tmp_path / "char"), "--out", str(tmp_path / "hf")]) == 2
    assert "quantised weights" in capsys.readouterr().err


def test_convert_errors(tmp_path, capsys, hf_case):
    _, tmp = hf_case
    convert = _script("convert_hf_checkpoint")

    def run(hf_dir) -> str:
        assert convert.main(["--hf-dir", str(hf_dir), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1
        return err

    assert "is not a directory" in run(tmp_path / "nope")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tmp / "hf-sharded/config.json").read_text())
    assert "no model.safetensors" in run(broken)
    (broken / "model.safetensors.index.json").write_text((tmp / "hf-sharded/model.safetensors.index.json").read_text())
    err = run(broken)
    assert "lists shard(s) model-00001-of-" in err and "missing" in err
    cfg = json.loads((tmp / "hf-single/config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    (broken / "model.safetensors.index.json").unlink()
    (broken / "model.safetensors").write_bytes((tmp / "hf-single/model.safetensors").read_bytes())
    assert "lacks tensor(s) model.layers.2." in run(broken)
    weights = _weights(tmp / "hf-single/model.safetensors")
    weights["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(weights, str(broken / "model.safetensors"))
    (broken / "config.json").write_text(json.dumps(cfg))
    assert "model.safetensors: tensor model.layers.0.self_attn.q_proj.bias is not part of" in run(broken)
    (broken / "config.json").write_text(json.dumps({**cfg, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}))
    assert "rope_parameters.rope_type='yarn'" in run(broken)
    (broken / "config.json").write_text(json.dumps({**cfg, "vocab_size": 100}))
    (broken / "tokenizer.model").write_bytes((tmp / "hf-single/tokenizer.model").read_bytes())
    assert f"has {VOCAB} tokens but config.json vocab_size is 100" in run(broken)
    assert not (tmp_path / "out").exists()


def test_convert_cli_error_is_one_line_without_traceback(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "attention_bias": True}))
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts/convert_hf_checkpoint.py"), "--hf-dir", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert (
        r.stderr
        == f"error: {tmp_path}/config.json field attention_bias=true is not supported: this model has no bias terms\n"
    )


# VmHWM (peak resident set) starts afresh at exec, unlike ru_maxrss, which a child inherits from pytest.
# A first tiny conversion loads the code paths (~70 MB, whatever the model size) before measuring.
_PEAK_RSS = """
import sys
from gpt.hf import convert_hf_checkpoint
def status(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024
convert_hf_checkpoint(sys.argv[1], sys.argv[2] + "-warmup", log=lambda s: None)
before = status("VmRSS")
convert_hf_checkpoint(sys.argv[3], sys.argv[4], log=lambda s: None)
print(status("VmHWM") - before)
"""


@pytest.mark.slow
def test_convert_streams_shards_in_about_one_checkpoint_of_memory(tmp_path):
    """Peak memory of a conversion is the converted weights plus about one shard, not two copies."""
    cfg = LlamaConfig(
        vocab_size=16000, hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6
    )
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf", max_shard_size="16MB")
    _hf_llama(tied=False, head_dim=None, seed=0).save_pretrained(tmp_path / "tiny")
    size = sum(f.stat().st_size for f in (tmp_path / "hf").glob("*.safetensors"))
    r = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS, *(str(tmp_path / d) for d in ("tiny", "tiny-ours", "hf", "ours"))],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    extra = int(r.stdout.split()[-1])
    assert size > 80e6 and (tmp_path / "ours/model.safetensors").stat().st_size > 0.99 * size
    assert extra < 1.35 * size, (
        f"conversion took {extra / 1e6:.0f} MB over its baseline for a {size / 1e6:.0f} MB checkpoint"
    )
