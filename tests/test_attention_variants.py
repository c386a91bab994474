"""Built-in variants against hand-written references, and the flex / dense paths of score_mod variants."""

import math

import pytest
import torch

from gpt.attention import _REGISTRY, build_attention, get_attention
from gpt.attention.alibi import alibi_slopes
from gpt.attention.flex import ModAttention, register_mods
from gpt.config import ConfigError, ModelConfig
from gpt.model import Transformer


def cfg(attention="math", kwargs=None, **over):
    base = dict(vocab_size=40, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16)
    return ModelConfig(**{**base, **over, "attention": attention, "attention_kwargs": kwargs or {}})


def qkv(b=2, t=9, tk=None):
    tk = tk or t
    return torch.randn(b, 4, t, 8), torch.randn(b, 2, tk, 8), torch.randn(b, 2, tk, 8)


def reference(q, k, v, allowed, score_fn=lambda s: s):
    """Softmax attention written out with an explicit (.., Tq, Tk) boolean mask."""
    k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    s = score_fn(q @ k.mT / math.sqrt(q.size(-1)))
    return s.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


def padded_mask(b=2, t=9):
    kpm = torch.ones(b, t, dtype=torch.bool)
    kpm[1, :3] = False
    return kpm


# -- values vs references -----------------------------------------------------------------


def test_sliding_window_sees_only_the_last_window_positions():
    q, k, v = qkv()
    pos = torch.arange(9)
    mix = build_attention(cfg("sliding_window", {"window": 3}))
    d = pos[:, None] - pos[None, :]
    torch.testing.assert_close(mix(q, k, v, pos, pos), reference(q, k, v, (d >= 0) & (d < 3)), atol=1e-5, rtol=1e-5)
    # a window as long as the sequence is plain causal attention
    wide = build_attention(cfg("sliding_window", {"window": 9}))
    torch.testing.assert_close(wide(q, k, v, pos, pos), reference(q, k, v, d >= 0), atol=1e-5, rtol=1e-5)


def test_alibi_slopes_follow_the_paper():
    assert alibi_slopes(8).tolist() == [2.0**-i for i in range(1, 9)]
    # 6 heads: the 4-head slopes, then every other one of the 8-head slopes
    assert alibi_slopes(6).tolist() == pytest.approx([2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3])


@pytest.mark.parametrize("n_heads", [1, 3, 4, 6, 8, 12])
def test_alibi_slope_of_a_head_index_equals_the_table(n_heads):
    mix = build_attention(cfg("alibi", dim=8 * n_heads, n_heads=n_heads, n_kv_heads=n_heads))
    torch.testing.assert_close(mix.slope(torch.arange(n_heads)).float(), alibi_slopes(n_heads))


def test_alibi_penalises_distance_per_head():
    q, k, v = qkv()
    pos = torch.arange(9)
    mix = build_attention(cfg("alibi", pos_encoding="none"))
    d = (pos[:, None] - pos[None, :]).float()
    slopes = alibi_slopes(4).view(1, 4, 1, 1)
    want = reference(q, k, v, d >= 0, lambda s: s - slopes * d)
    torch.testing.assert_close(mix(q, k, v, pos, pos), want, atol=1e-5, rtol=1e-5)


def test_softcap_caps_the_scores():
    q, k, v = qkv()
    q = q * 20  # large scores, so the cap matters
    pos = torch.arange(9)
    causal = pos[None, :] <= pos[:, None]
    mix = build_attention(cfg("softcap", {"cap": 5.0}))
    _, w = mix(q, k, v, pos, pos, return_weights=True)
    want = reference(q, k, v, causal, lambda s: 5.0 * torch.tanh(s / 5.0))
    torch.testing.assert_close(mix(q, k, v, pos, pos), want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(want, reference(q, k, v, causal), atol=1e-3)


def test_sigmoid_weights_are_sigmoid_of_score_minus_log_n():
    q, k, v = qkv()
    pos = torch.arange(9)
    mix = build_attention(cfg("sigmoid"))  # n = max_seq_len = 16
    out, w = mix(q, k, v, pos, pos, return_weights=True)
    s = q @ k.repeat_interleave(2, 1).mT / math.sqrt(8) - math.log(16)
    want_w = torch.sigmoid(s) * (pos[None, :] <= pos[:, None])
    torch.testing.assert_close(w, want_w, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out, want_w @ v.repeat_interleave(2, 1), atol=1e-5, rtol=1e-5)


def test_sinks_take_weight_away_from_the_keys():
    q, k, v = qkv()
    pos = torch.arange(9)
    causal = pos[None, :] <= pos[:, None]
    mix = build_attention(cfg("sinks"))
    with torch.no_grad():
        mix.sinks.fill_(-1e4)  # a sink nobody visits: plain softmax attention
    torch.testing.assert_close(mix(q, k, v, pos, pos), reference(q, k, v, causal), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        mix.sinks.copy_(torch.tensor([0.0, 1.0, 2.0, 3.0]))
    _, w = mix(q, k, v, pos, pos, return_weights=True)
    # each row's weight on the keys is 1 - weight on the sink, which grows with the sink logit
    sink_share = 1 - w.sum(-1).mean(dim=(0, 2))
    assert torch.all(sink_share > 0) and torch.all(sink_share.diff() > 0)
    # the sinks are trained parameters saved with the model
    assert "layers.0.attention.mix.sinks" in Transformer(cfg("sinks")).state_dict()


def test_differential_attention_is_a_normalised_difference_of_two_softmax_maps():
    q, k, v = qkv()
    pos = torch.arange(9)
    causal = pos[None, :] <= pos[:, None]
    mix = build_attention(cfg("differential", {"lambda_init": 0.5}))
    with torch.no_grad():
        for name, val in [("lambda_q1", 0.3), ("lambda_k1", 0.2), ("lambda_q2", 0.1), ("lambda_k2", -0.4)]:
            getattr(mix, name).fill_(val)
    lam = math.exp(4 * 0.3 * 0.2) - math.exp(4 * 0.1 * -0.4) + 0.5  # 4 = head_dim / 2
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    a1 = (q[..., :4] @ kk[..., :4].mT / 2).masked_fill(~causal, float("-inf")).softmax(-1)
    a2 = (q[..., 4:] @ kk[..., 4:].mT / 2).masked_fill(~causal, float("-inf")).softmax(-1)
    o = (a1 - lam * a2) @ vv
    want = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + 1e-5) * 0.5
    out, w = mix(q, k, v, pos, pos, return_weights=True)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w, a1 - lam * a2, atol=1e-6, rtol=1e-5)


def test_linear_attention_equals_its_recurrence():
    q, k, v = qkv(b=1, t=7)
    pos = torch.arange(7)
    mix = build_attention(cfg("linear"))
    phi = lambda x: torch.nn.functional.elu(x) + 1
    fq, fk, vv = phi(q), phi(k).repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    state, norm, outs = torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8), []
    for t in range(7):  # the RNN form: S += φ(k) vᵀ, z += φ(k); out = φ(q)S / φ(q)·z
        state = state + fk[:, :, t, :, None] * vv[:, :, t, None, :]
        norm = norm + fk[:, :, t]
        num = (fq[:, :, t, :, None] * state).sum(-2)
        outs.append(num / ((fq[:, :, t] * norm).sum(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(mix(q, k, v, pos, pos), torch.stack(outs, 2), atol=1e-5, rtol=1e-5)


def test_linear_attention_keeps_a_fixed_size_state_instead_of_a_kv_cache():
    m = Transformer(cfg("linear", max_seq_len=64)).eval()
    m.setup_caches(2, 64)
    layer = m.layers[0].attention
    assert layer.kv_cache is None
    assert tuple(layer.mix.state.shape) == (2, 2, 8, 8) and tuple(layer.mix.normalizer.shape) == (2, 2, 8)
    assert m.cache_len == 64
    m.clear_caches()
    assert layer.mix.state is None and m.cache_len is None


def test_bad_kwargs_are_one_line_config_errors():
    for name, kwargs, match in [
        ("sliding_window", {"window": 0}, "window=0 must be a positive integer"),
        ("softcap", {"cap": -1}, "cap=-1 must be positive"),
        ("linear", {"feature_map": "tanh"}, "feature_map='tanh' is not one of elu, relu"),
        ("alibi", {"backend": "cuda"}, "backend='cuda' is not one of auto, flex, dense"),
        ("differential", {"lambda": 1}, "unexpected keyword argument 'lambda'"),
    ]:
        with pytest.raises(ConfigError, match=match):
            build_attention(cfg(name, kwargs))


# each variant's own parameters: a variant that lost them would train vacuously
OWN_PARAMETERS = {
    "sliding_window": set(),
    "alibi": set(),
    "softcap": set(),
    "sigmoid": set(),
    "linear": set(),
    "sinks": {"sinks"},
    "differential": {"lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"},
}


@pytest.mark.parametrize("name", sorted(OWN_PARAMETERS))
def test_variants_train(name):
    """On the CPU's dense path: non-zero, finite gradients reach the variant's own parameters and
    every projection, and a few AdamW steps on one batch lower the loss."""
    m = Transformer(cfg(name, {"window": 4} if name == "sliding_window" else {})).train()
    own = {n.rsplit(".", 1)[-1] for n, _ in m.layers[0].attention.mix.named_parameters()}
    assert own == OWN_PARAMETERS[name]
    idx = torch.randint(0, 40, (4, 13))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    losses = []
    for step in range(5):
        _, loss = m(idx[:, :-1], targets=idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        if step == 0:
            for pname, p in m.named_parameters():
                if ".mix." in pname or ".attention.w" in pname:
                    assert p.grad is not None and torch.isfinite(p.grad).all(), pname
                    assert p.grad.abs().max() > 0, pname
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


# -- score_mod / mask_mod: the flex and dense paths agree -----------------------------------


@pytest.fixture
def user_mods():
    """A user's variant from plain functions: a score bias per head plus a "no odd gaps" mask."""
    bias = torch.tensor([0.0, 0.5, -0.5, 1.0])
    register_mods(
        "test_mods",
        score_mod=lambda s, b, h, q, kv: s + bias[h] * torch.cos(q - kv),
        mask_mod=lambda b, h, q, kv: ((q - kv) % 2 == 0) | (q - kv < 2),
    )
    yield "test_mods"
    _REGISTRY.pop("test_mods")


MOD_VARIANTS = [("sliding_window", {"window": 3}), ("alibi", {}), ("softcap", {"cap": 2.0}), ("test_mods", {})]


@pytest.mark.parametrize("name,kwargs", MOD_VARIANTS)
def test_flex_and_dense_paths_agree(name, kwargs, user_mods):
    flex = build_attention(cfg(name, {**kwargs, "backend": "flex"})).eval()
    dense = build_attention(cfg(name, {**kwargs, "backend": "dense"})).eval()
    q, k, v = qkv()
    q = 3 * q
    pos, kpm = torch.arange(9), padded_mask()
    with torch.no_grad():
        for mask in (None, kpm):  # a full forward, with and without left padding
            torch.testing.assert_close(flex(q, k, v, pos, pos, mask), dense(q, k, v, pos, pos, mask), atol=1e-5, rtol=0)
        # one query at slot 6 against a 16-slot static cache (slots 7.. not written yet)
        q1, kc, vc = qkv(t=1, tk=16)
        kpm16 = torch.cat([kpm, torch.ones(2, 7, dtype=torch.bool)], 1)
        a = flex(q1, kc, vc, torch.tensor([6]), torch.arange(16), kpm16)
        torch.testing.assert_close(a, dense(q1, kc, vc, torch.tensor([6]), torch.arange(16), kpm16), atol=1e-5, rtol=0)


def test_dense_mod_path_equals_the_written_out_reference(user_mods):
    q, k, v = qkv()
    pos = torch.arange(9)
    mix = build_attention(cfg("test_mods"))
    d = pos[:, None] - pos[None, :]
    bias = torch.tensor([0.0, 0.5, -0.5, 1.0]).view(1, 4, 1, 1)
    allowed = (d >= 0) & ((d % 2 == 0) | (d < 2))
    want = reference(q, k, v, allowed, lambda s: s + bias * torch.cos(d.float()))
    torch.testing.assert_close(mix(q, k, v, pos, pos), want, atol=1e-5, rtol=1e-5)


def test_auto_backend_uses_flex_inside_compile_and_dense_for_training():
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    torch._dynamo.reset()
    mix = build_attention(cfg("softcap", {"cap": 2.0})).eval()
    q, k, v = qkv(t=1, tk=16)
    step = torch.compile(
        lambda q, k, v, p: mix(q, k, v, p, torch.arange(16)), backend=recording_backend, fullgraph=True
    )
    with torch.no_grad():
        compiled = step(q, k, v, torch.tensor([5]))
    assert any("flex_attention" in code for code in graphs)
    dense = build_attention(cfg("softcap", {"cap": 2.0, "backend": "dense"}))
    torch.testing.assert_close(compiled, dense(q, k, v, torch.tensor([5]), torch.arange(16)), atol=1e-5, rtol=0)
    # with gradients the same variant takes the dense path and trains
    q.requires_grad_()
    mix(q, k, v, torch.tensor([5]), torch.arange(16)).sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_flex_backend_refuses_to_train_on_cpu():
    mix = build_attention(cfg("alibi", {"backend": "flex"}))
    q, k, v = qkv()
    with pytest.raises(RuntimeError, match="no backward on the CPU; train with backend='auto' or 'dense'"):
        mix(q.requires_grad_(), k, v, torch.arange(9), torch.arange(9))


def test_register_mods_needs_a_mod():
    with pytest.raises(TypeError, match="needs a score_mod, a mask_mod or both"):
        register_mods("nothing")
    assert issubclass(get_attention("alibi"), ModAttention)
