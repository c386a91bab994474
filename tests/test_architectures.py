"""Encoder-only (masked LM) and encoder-decoder models: padding, permutation, caching, compile, checkpoints."""

import pytest
import torch

from gpt.arch import build_model
from gpt.attention import _REGISTRY, Attention, causal_mask, register_attention, repeat_kv
from gpt.attention.flex import ModAttention
from gpt.checkpoint import load_model, save_checkpoint
from gpt.config import ConfigError, ModelConfig
from gpt.encoder import MaskedLM, masked_accuracy, mlm_mask, special_ids
from gpt.seq2seq import EncoderDecoder


def cfg(arch="encoder", **kw):
    base = dict(vocab_size=24, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16, arch=arch)
    return ModelConfig(**{**base, **kw})


def model(arch="encoder", seed=0, **kw):
    torch.manual_seed(seed)
    return build_model(cfg(arch, **kw)).eval()


# -- encoder ------------------------------------------------------------------------------------


class CappedWindow(ModAttention):
    def score_mod(self, score, b, h, q_idx, kv_idx):
        return 5.0 * torch.tanh(score / 5.0)

    def mask_mod(self, b, h, q_idx, kv_idx):
        return q_idx - kv_idx < 2


@pytest.fixture
def capped_window():
    register_attention("test_capped_window")(CappedWindow)
    yield
    _REGISTRY.pop("test_capped_window")


@pytest.mark.parametrize(
    "attention,kwargs,pos",
    [
        ("sdpa", {}, "rope"),
        ("alibi", {}, "none"),
        ("linear", {}, "learned"),
        # a window shorter than the padding: pad queries see no real key (only their own slot)
        ("sliding_window", {"window": 2}, "rope"),
        ("sinks", {"window": 2}, "none"),
        ("test_capped_window", {}, "rope"),  # score_mod + mask_mod: the written-out softmax path
    ],
)
@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_encoder_is_invariant_to_padding(attention, kwargs, pos, norm_position, capped_window):
    m = model(attention=attention, attention_kwargs=kwargs, pos_encoding=pos, norm_position=norm_position)
    a, b = torch.randint(0, 20, (1, 9)), torch.randint(0, 20, (1, 5))
    batch = torch.cat([a, torch.cat([b, torch.full((1, 4), 3)], 1)])  # row 1: 4 pad tokens at the end
    kpm = torch.ones(2, 9, dtype=torch.bool)
    kpm[1, 5:] = False
    with torch.no_grad():
        out = m(batch, key_padding_mask=kpm)
        torch.testing.assert_close(out[0], m(a)[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[1, :5], m(b)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ["sdpa", "sigmoid", "linear", "differential"])
def test_encoder_without_positions_is_permutation_equivariant(attention):
    m = model(attention=attention, pos_encoding="none")
    x = torch.randint(0, 20, (2, 11))
    perm = torch.randperm(11)
    with torch.no_grad():
        torch.testing.assert_close(m(x[:, perm]), m(x)[:, perm], atol=1e-5, rtol=1e-5)
    # with positions the order matters (so the test above can fail)
    m = model(attention=attention, pos_encoding="rope")
    with torch.no_grad():
        assert (m(x[:, perm]) - m(x)[:, perm]).abs().max() > 3e-5  # fp32 noise above: ~1e-7


def test_encoder_sees_both_sides_and_the_decoder_only_the_past():
    x = torch.randint(0, 20, (1, 10))
    y = x.clone()
    y[0, -1] = (x[0, -1] + 1) % 20
    with torch.no_grad():
        enc, dec = model("encoder"), model("decoder")
        assert (enc(x)[0, 0] - enc(y)[0, 0]).abs().max() > 1e-4
        assert (dec(x)[0, 0] - dec(y)[0, 0]).abs().max() == 0


def test_mlm_masking_is_bert_80_10_10_and_deterministic():
    c = cfg(vocab_size=104)  # 100 real tokens + 4 specials
    x = torch.randint(0, 100, (64, 256))
    gen = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    inputs, targets = mlm_mask(x, c, gen())
    chosen = targets != -100
    assert torch.equal(targets[chosen], x[chosen])
    assert torch.equal(inputs[~chosen], x[~chosen])
    rate = chosen.float().mean().item()
    masked = (inputs[chosen] == special_ids(c).mask).float().mean().item()
    kept = (inputs[chosen] == x[chosen]).float().mean().item()
    # measured: 0.1505 chosen; of those 0.80 <mask>, 0.10 random (+ 1% of them drawn equal), 0.10 kept
    assert abs(rate - 0.15) < 0.005 and abs(masked - 0.8) < 0.01 and abs(kept - 0.101) < 0.01
    assert chosen.any(1).all()  # every row has a target
    again = mlm_mask(x, c, gen())
    assert torch.equal(again[0], inputs) and torch.equal(again[1], targets)
    # the loss is on the chosen tokens only
    m = model(vocab_size=104)
    logits, loss = m(inputs[:2, :16], targets[:2, :16])
    t = targets[:2, :16]
    ref = torch.nn.functional.cross_entropy(logits[t != -100], t[t != -100])
    torch.testing.assert_close(loss, ref)
    correct, total = masked_accuracy(m, inputs[:2, :16], t)
    assert total == int((t != -100).sum()) and 0 <= correct <= total


class CausalOnly(Attention):
    """A plug-in that never heard of modes: causal softmax attention."""

    def forward(self, q, k, v, q_pos, k_pos, key_padding_mask=None, return_weights=False):
        k, v = repeat_kv(k, 2), repeat_kv(v, 2)
        w = (q @ k.mT).masked_fill(~causal_mask(q_pos, k_pos, key_padding_mask), float("-inf")).softmax(-1)
        return w @ v


def test_a_causal_only_variant_is_refused_at_build_time_and_still_decodes():
    register_attention("test_causal_only")(CausalOnly)
    try:
        with pytest.raises(ConfigError, match="'test_causal_only' does not support bidirectional attention"):
            build_model(cfg("encoder", attention="test_causal_only"))
        with pytest.raises(ConfigError, match="does not support bidirectional attention"):
            build_model(cfg("seq2seq", attention="test_causal_only"))
        m = build_model(cfg("decoder", attention="test_causal_only"))  # the decoder needs only causal
        assert m(torch.randint(0, 20, (1, 5))).shape == (1, 5, 24)
    finally:
        _REGISTRY.pop("test_causal_only")


# -- encoder-decoder ----------------------------------------------------------------------------


S2S = dict(norm_position="post", ffn="relu", pos_encoding="sinusoidal", tie_embeddings=True)


def padded_sources():
    src = torch.randint(0, 20, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    return src, mask


@pytest.mark.parametrize("kw", [S2S, dict(norm_position="pre", attention="alibi", pos_encoding="none")])
def test_cached_greedy_equals_the_uncached_forward(kw):
    m = model("seq2seq", **kw)
    src, mask = padded_sources()
    ids = special_ids(m.config)
    with torch.no_grad():
        m.setup_caches(2, 12, 9)
        m.start(src, mask)
        tgt = torch.full((2, 1), ids.bos)
        cached = []
        for t in range(10):
            cached.append(m.step(tgt[:, -1:], torch.tensor([t])))
            tgt = torch.cat([tgt, cached[-1][:, -1].argmax(-1, keepdim=True)], 1)
        full = m(src, tgt[:, :-1], src_mask=mask)
        torch.testing.assert_close(torch.cat(cached, 1), full, atol=1e-5, rtol=1e-5)
        # greedy() returns the same tokens (cut at <eos>) and a padded row equals its source alone
        rows = m.greedy(src, mask, 10)
        want = [r[: r.index(ids.eos)] if ids.eos in r else r for r in tgt[:, 1:].tolist()]
        assert rows == want
        assert m.greedy(src[1:, :6], None, 10) == rows[1:]


def test_cross_attention_gets_no_gradient_from_padded_source_tokens():
    m = model("seq2seq", **S2S).train()
    src, mask = padded_sources()
    memory = m.encode(src, mask)
    memory.retain_grad()
    tgt = torch.randint(0, 20, (2, 5))
    m.decode(tgt, memory, mask).pow(2).sum().backward()
    assert memory.grad[1, 6:].abs().max() == 0
    assert memory.grad[1, :6].abs().min() > 0 and memory.grad[0].abs().min() > 0


def test_compiled_step_equals_eager():
    """The one-token step captures as one graph (fullgraph, static shapes) and gives eager's numbers."""
    m = model("seq2seq", **S2S)
    src, mask = padded_sources()
    with torch.no_grad():
        m.setup_caches(2, 8, 9)
        m.start(src, mask)
        toks = torch.randint(0, 20, (2, 6))
        eager = [m.step(toks[:, t : t + 1], torch.tensor([t])) for t in range(6)]
        m.start(src, mask)  # the same source again: the self-attention slots are overwritten in order
        torch._dynamo.reset()
        step = torch.compile(m.step, fullgraph=True, dynamic=False, backend="eager")
        compiled = [step(toks[:, t : t + 1], torch.tensor([t])) for t in range(6)]
    torch.testing.assert_close(torch.cat(compiled, 1), torch.cat(eager, 1), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_inductor_compiled_greedy_equals_eager_greedy():
    m = model("seq2seq", **S2S)
    src, mask = padded_sources()
    torch._dynamo.reset()
    assert m.greedy(src, mask, 6, compile=True) == m.greedy(src, mask, 6)


# -- both ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,kw", [("encoder", {}), ("seq2seq", S2S), ("seq2seq", dict(n_encoder_layers=3))])
def test_checkpoint_round_trips_bit_exactly(tmp_path, arch, kw):
    m = model(arch, **kw)
    save_checkpoint(tmp_path / "ckpt", m)
    loaded = load_model(tmp_path / "ckpt")
    assert type(loaded) is type(m) and loaded.config == m.config
    sd, sd2 = m.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    x = torch.randint(0, 20, (2, 7))
    with torch.no_grad():
        if arch == "encoder":
            assert torch.equal(m(x), loaded(x))
        else:
            assert torch.equal(m(x, x[:, :5]), loaded(x, x[:, :5]))
            assert m.greedy(x, None, 5) == loaded.greedy(x, None, 5)
    assert isinstance(loaded, MaskedLM if arch == "encoder" else EncoderDecoder)


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="unknown arch 'bert'; choose one of decoder, encoder, seq2seq"):
        cfg("bert")
    with pytest.raises(ConfigError, match="the decoder is pre-norm SwiGLU"):
        cfg("decoder", norm_position="post")
    with pytest.raises(ConfigError, match="label_smoothing=1.5 must be in"):
        cfg("seq2seq", label_smoothing=1.5)


def test_decoder_only_tools_refuse_the_other_architectures_in_one_line(tmp_path):
    from gpt.errors import GenerationError, HFError
    from gpt.generation import Generator
    from gpt.hf import export_hf
    from gpt.tokenizer import CharTokenizer

    m = model("seq2seq")
    with pytest.raises(GenerationError, match="arch=.seq2seq.: the Generator continues text with a decoder"):
        Generator(m, CharTokenizer(list("abc")))
    save_checkpoint(tmp_path / "enc", model("encoder"), CharTokenizer([chr(97 + i) for i in range(20)]))
    with pytest.raises(HFError, match="arch='encoder' cannot be exported"):
        export_hf(tmp_path / "enc", tmp_path / "hf")


def test_translate_in_chunks_joins_the_pieces_of_a_long_source():
    from gpt.arch_eval import split_words, translate
    from gpt.tokenizer import CharTokenizer

    assert split_words("aa bb cc dd", 5) == ["aa bb", "cc dd"]
    assert split_words("a verylongword b", 4) == ["a", "verylongword", "b"]
    tok = CharTokenizer([chr(97 + i) for i in range(19)] + [" "])
    m = model("seq2seq", **S2S)
    whole = translate(m, tok, ["ab cd", "ef"])
    assert translate(m, tok, ["ab cd ef"], chunk=5) == [f"{whole[0]} {whole[1]}"]
