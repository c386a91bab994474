"""Cross-attention built on the registry: shapes, padding invariance, gradients."""

import math

import pytest
import torch

from gpt.attention.cross import CrossAttention
from gpt.config import ModelConfig


def cfg(attention="sdpa", **kw):
    return ModelConfig(vocab_size=8, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, attention=attention, **kw)


@pytest.mark.parametrize("attention", ["sdpa", "math", "softcap", "sigmoid", "linear", "sinks"])
def test_shapes_and_weights(attention):
    xattn = CrossAttention(cfg(attention), source_dim=24).eval()
    x, src = torch.randn(2, 5, 32), torch.randn(2, 11, 24)
    out, w = xattn(x, src, return_weights=True)
    assert out.shape == (2, 5, 32) and w.shape == (2, 4, 5, 11)
    assert torch.isfinite(out).all()
    # nothing in the source is "future": every query puts weight on the last source token
    assert (w[..., -1] > 0).all()


def test_equals_unmasked_softmax_attention_over_the_whole_source():
    xattn = CrossAttention(cfg("math"), source_dim=24).eval()
    x, src = torch.randn(2, 5, 32), torch.randn(2, 11, 24)
    q = xattn.wq(x).view(2, 5, 4, 8).transpose(1, 2)
    k = xattn.wk(src).view(2, 11, 2, 8).transpose(1, 2).repeat_interleave(2, 1)
    v = xattn.wv(src).view(2, 11, 2, 8).transpose(1, 2).repeat_interleave(2, 1)
    ref = (q @ k.mT / math.sqrt(8)).softmax(-1) @ v
    want = xattn.wo(ref.transpose(1, 2).reshape(2, 5, 32))
    torch.testing.assert_close(xattn(x, src), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ["sdpa", "math", "sigmoid", "linear"])
def test_padding_the_source_changes_nothing(attention):
    xattn = CrossAttention(cfg(attention), source_dim=24).eval()
    x = torch.randn(2, 5, 32)
    short, long = torch.randn(1, 6, 24), torch.randn(1, 11, 24)
    # row 0: 6 real tokens then 5 junk pads; row 1: 11 real tokens
    src = torch.cat([torch.cat([short, 100 * torch.randn(1, 5, 24)], 1), long])
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[0, 6:] = False
    with torch.no_grad():
        batched = xattn(x, src, mask)
        torch.testing.assert_close(batched[0], xattn(x[:1], short)[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batched[1], xattn(x[1:], long)[0], atol=1e-5, rtol=1e-5)


def test_gradients():
    xattn = CrossAttention(cfg("sdpa"), source_dim=24).double()
    x = torch.randn(1, 3, 32, dtype=torch.float64, requires_grad=True)
    src = torch.randn(1, 4, 24, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True, True, False]])
    assert torch.autograd.gradcheck(lambda x, s: xattn(x, s, mask), (x, src), fast_mode=True)
    xattn.float().zero_grad()
    xattn(torch.randn(2, 3, 32), torch.randn(2, 4, 24), mask.expand(2, -1)).pow(2).sum().backward()
    for name, p in xattn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # a padded source token gets no gradient
    src = torch.randn(1, 4, 24, requires_grad=True)
    xattn(torch.randn(1, 3, 32), src, mask).sum().backward()
    assert src.grad[0, 3].abs().max() == 0 and src.grad[0, :3].abs().max() > 0
