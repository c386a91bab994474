import pytest
import torch

from gpt.attention import Attention, available, causal_mask, get_attention, register_attention
from gpt.config import ConfigError, ModelConfig
from gpt.model import Transformer


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("padded", [False, True])
def test_sdpa_equals_math(kv_heads, padded):
    cfg = ModelConfig(dim=64, n_heads=4, n_kv_heads=kv_heads)
    sdpa, ref = get_attention("sdpa")(cfg), get_attention("math")(cfg)
    q = torch.randn(2, 4, 9, 16)
    k, v = torch.randn(2, kv_heads, 9, 16), torch.randn(2, kv_heads, 9, 16)
    pos = torch.arange(9)
    kpm = torch.ones(2, 9, dtype=torch.bool)
    if padded:
        kpm[1, :3] = False
    kpm = kpm if padded else None
    torch.testing.assert_close(sdpa(q, k, v, pos, pos, kpm), ref(q, k, v, pos, pos, kpm), atol=1e-5, rtol=1e-5)
    # a single query against a longer (static-cache) key range
    qp, kp = torch.tensor([5]), torch.arange(9)
    out_s = sdpa(q[:, :, 5:6], k, v, qp, kp, kpm)
    out_m = ref(q[:, :, 5:6], k, v, qp, kp, kpm)
    torch.testing.assert_close(out_s, out_m, atol=1e-5, rtol=1e-5)
    # ... equals row 5 of the full computation (keys after 5 are invisible)
    torch.testing.assert_close(out_m, ref(q, k, v, pos, pos, kpm)[:, :, 5:6], atol=1e-5, rtol=1e-5)


def test_sdpa_equals_math_in_a_model():
    torch.manual_seed(0)
    a = Transformer(ModelConfig(vocab_size=40, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32))
    b = Transformer(
        ModelConfig(vocab_size=40, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32, attention="math")
    )
    b.load_state_dict(a.state_dict())
    idx = torch.randint(0, 40, (3, 32))
    torch.testing.assert_close(a(idx), b(idx), atol=1e-5, rtol=1e-5)


def test_key_padding_masks_out_pad_keys():
    cfg = ModelConfig(dim=32, n_heads=2)
    ref = get_attention("math")(cfg)
    q, k, v = torch.randn(1, 2, 6, 16), torch.randn(1, 2, 6, 16), torch.randn(1, 2, 6, 16)
    pos = torch.arange(6)
    kpm = torch.tensor([[False, False, True, True, True, True]])
    out, w = ref(q, k, v, pos, pos, kpm, return_weights=True)
    assert w[0, :, 2:, :2].abs().max() == 0  # real queries never read the pads
    assert torch.isfinite(out).all()  # pad queries stay finite (they see themselves)
    # the real part equals attention over the unpadded sequence alone
    alone = ref(q[:, :, 2:], k[:, :, 2:], v[:, :, 2:], pos[:4], pos[:4])
    torch.testing.assert_close(out[:, :, 2:], alone)


def test_causal_mask_shapes():
    m = causal_mask(torch.tensor([3]), torch.arange(6))
    assert m.shape == (1, 1, 1, 6) and m.tolist() == [[[[True] * 4 + [False] * 2]]]
    m = causal_mask(torch.arange(4), torch.arange(4), torch.ones(2, 4, dtype=torch.bool))
    assert m.shape == (2, 1, 4, 4)


def test_register_a_new_variant():
    @register_attention("test_uniform")
    class Uniform(Attention):
        def __init__(self, config, scale: float = 1.0):
            super().__init__(config)
            self.scale = scale

        def forward(self, q, k, v, q_pos, k_pos, key_padding_mask=None, return_weights=False):
            w = causal_mask(q_pos, k_pos, key_padding_mask).float()
            w = w / w.sum(-1, keepdim=True)
            k_rep = q.size(1) // k.size(1)
            out = (w @ v.repeat_interleave(k_rep, 1)) * self.scale
            return (out, w.expand(q.size(0), q.size(1), -1, -1)) if return_weights else out

    try:
        assert "test_uniform" in available()
        cfg = ModelConfig(
            vocab_size=30, dim=32, n_heads=2, n_layers=1, attention="test_uniform", attention_kwargs={"scale": 0.5}
        )
        m = Transformer(cfg)
        assert m.layers[0].attention.mix.scale == 0.5
        assert m(torch.randint(0, 30, (1, 8))).shape == (1, 8, 30)
        with pytest.raises(ConfigError, match="rejected attention_kwargs"):
            Transformer(cfg.__class__(**{**cfg.to_dict(), "attention_kwargs": {"bogus": 1}}))
    finally:
        from gpt import attention

        attention._REGISTRY.pop("test_uniform")


def test_register_rejects_non_attention():
    with pytest.raises(TypeError, match="subclass of gpt.attention.Attention"):
        register_attention("x")(object)
