import pytest
import torch

from gpt.config import ModelConfig, from_preset
from gpt.model import Transformer


def make(kv_heads=None, **kw):
    c = ModelConfig(vocab_size=50, dim=64, n_layers=2, n_heads=4, n_kv_heads=kv_heads, max_seq_len=32, **kw)
    return Transformer(c)


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["MHA", "GQA", "MQA"])
def test_forward_shapes(kv_heads):
    m = make(kv_heads)
    idx = torch.randint(0, 50, (3, 17))
    logits = m(idx)
    assert logits.shape == (3, 17, 50)
    assert m.layers[0].attention.wk.weight.shape == (kv_heads * 16, 64)
    logits, loss = m(idx, targets=idx)
    assert loss.ndim == 0 and torch.isfinite(loss)
    # an untrained model predicts close to uniform
    assert abs(loss.item() - torch.log(torch.tensor(50.0)).item()) < 0.5


@pytest.mark.parametrize("pos", ["rope", "sinusoidal", "learned", "none"])
@pytest.mark.parametrize("attention", ["sdpa", "math"])
def test_causality(pos, attention):
    """Changing token t+1 changes no logits at positions <= t."""
    m = make(2, pos_encoding=pos, attention=attention).eval()
    idx = torch.randint(0, 50, (2, 20))
    t = 11
    idx2 = idx.clone()
    idx2[:, t + 1] = (idx2[:, t + 1] + 1) % 50
    a, b = m(idx), m(idx2)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=0)
    assert (a[:, t + 1] - b[:, t + 1]).abs().max() > 1e-4


def test_gradient_reaches_every_parameter():
    m = make(2, pos_encoding="learned")
    idx = torch.randint(0, 50, (2, 16))
    _, loss = m(idx, targets=idx)
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_tied_embeddings_share_storage():
    m = make(tie_embeddings=True)
    assert m.output.weight is m.tok_embeddings.weight
    assert m.num_params() == sum(p.numel() for p in set(m.parameters()))


def test_init_scales_residual_projections():
    m = Transformer(from_preset("shakespeare-char"))
    std_wq = m.layers[0].attention.wq.weight.std().item()
    std_wo = m.layers[0].attention.wo.weight.std().item()
    assert abs(std_wq - 0.02) < 0.002
    assert abs(std_wo - 0.02 / (2 * m.config.n_layers) ** 0.5) < 0.001


def test_flops_per_token():
    m = make()
    n = sum(
        p.numel()
        for n_, p in m.named_parameters()
        if n_.endswith(
            ("wq.weight", "wk.weight", "wv.weight", "wo.weight", "w1.weight", "w2.weight", "w3.weight", "output.weight")
        )
    )
    c = m.config
    fwd = 2 * n + 4 * c.n_layers * c.n_heads * c.head_dim * 32
    assert m.flops_per_token(32, training=False) == fwd
    assert m.flops_per_token(32) == 3 * fwd


def test_too_long_sequence_is_refused():
    m = make()
    with pytest.raises(ValueError, match="exceeds max_seq_len=32"):
        m(torch.zeros(1, 33, dtype=torch.long))


def test_return_weights_are_causal_distributions():
    m = make(2, attention="math").eval()
    idx = torch.randint(0, 50, (2, 10))
    logits, weights = m(idx, return_weights=True)
    assert len(weights) == 2 and weights[0].shape == (2, 4, 10, 10)
    torch.testing.assert_close(weights[0].sum(-1), torch.ones(2, 4, 10))
    assert weights[0].triu(1).abs().max() == 0
    torch.testing.assert_close(logits, m(idx))
