import math

import pytest
import torch

from gpt.attention import _REGISTRY, Attention, causal_mask, register_attention, repeat_kv
from gpt.config import ModelConfig, from_preset
from gpt.model import Transformer, sinusoidal_table


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


# -- positional encodings -------------------------------------------------------------------


def test_sinusoidal_table_is_the_closed_form():
    """PE(p, 2i) = sin(p / 10000^(2i/d)), PE(p, 2i+1) = cos(p / 10000^(2i/d)) (Vaswani et al.)."""
    table = sinusoidal_table(64, 16)
    assert table.shape == (64, 16)
    for p in (0, 1, 7, 63):
        for i in (0, 3, 7):
            angle = p / 10000 ** (2 * i / 16)
            assert table[p, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[p, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


@pytest.mark.parametrize("pos", ["sinusoidal", "learned"])
def test_positions_are_added_to_the_token_embeddings(pos):
    """The first block reads tok_embeddings + the position's row (at slot - pos_offset for a padded row)."""
    m = make(2, pos_encoding=pos).eval()
    table = m.sin_table if pos == "sinusoidal" else m.pos_embeddings.weight
    seen = []
    m.layers[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    idx = torch.randint(0, 50, (2, 9))
    offset = torch.tensor([0, 3])  # row 1 is left-padded by 3: its token 3 is at position 0
    tok_pos = (torch.arange(9)[None] - offset[:, None]).clamp(min=0)
    with torch.no_grad():
        m(idx, pos_offset=offset)
        torch.testing.assert_close(seen[0], m.tok_embeddings(idx) + table[tok_pos], rtol=0, atol=0)
        before = m(idx)
        table[5] += 1.0  # a different position 5 changes the logits from position 5 on, nothing before
        after = m(idx)
    torch.testing.assert_close(after[:, :5], before[:, :5], rtol=0, atol=0)
    assert (after[:, 5] - before[:, 5]).abs().max() > 1e-3


# -- initialisation ----------------------------------------------------------------------------


class DrawsInItsConstructor(Attention):
    """A plug-in that draws random numbers when built, some in 2-D parameters."""

    def __init__(self, config):
        super().__init__(config)
        self.proj = torch.nn.Linear(config.head_dim, config.head_dim)
        self.gain = torch.nn.Parameter(torch.randn(config.n_heads, 1))

    def forward(self, q, k, v, q_pos, k_pos, key_padding_mask=None, return_weights=False):
        k, v = repeat_kv(k, q.size(1) // k.size(1)), repeat_kv(v, q.size(1) // k.size(1))
        s = (self.proj(q) @ k.mT) * self.gain[:, :, None]
        w = s.masked_fill(~causal_mask(q_pos, k_pos, key_padding_mask), float("-inf")).softmax(-1)
        return (w @ v, w) if return_weights else w @ v


BUILTINS = ["sdpa", "math", "sliding_window", "alibi", "softcap", "sigmoid", "linear", "sinks", "differential"]


def test_every_variant_starts_from_the_same_shared_weights():
    """A comparison of variants starts each from the same embedding, projections and head, whatever
    the variant draws for itself: only tensors under `.mix.` may differ."""
    register_attention("test_draws")(DrawsInItsConstructor)
    try:
        shared = {}
        for name in [*BUILTINS, "test_draws"]:
            torch.manual_seed(1337)
            sd = make(2, attention=name).state_dict()
            shared[name] = {k: t for k, t in sd.items() if ".mix." not in k}
        for name, tensors in shared.items():
            assert tensors.keys() == shared["sdpa"].keys(), name
            for key, t in tensors.items():
                assert torch.equal(t, shared["sdpa"][key]), (name, key)
    finally:
        _REGISTRY.pop("test_draws")


def test_default_model_initial_weights_are_unchanged():
    """The default run's (shakespeare-char, seed 1337) initial weights, recorded before variants
    got their own random stream: if these move, every recorded training loss moves."""
    torch.manual_seed(1337)
    sd = Transformer(from_preset("shakespeare-char")).state_dict()
    recorded = {
        "tok_embeddings.weight": [-0.011470015160739422, 0.027157200500369072, -0.030742134898900986],
        "layers.0.attention.wq.weight": [0.005085630342364311, -0.02996828220784664, -0.02989169768989086],
        "layers.3.attention.wo.weight": [-0.0003254201146773994, -0.0018525433260947466, 0.0006183229852467775],
        "layers.3.feed_forward.w2.weight": [0.006409462541341782, 0.002540547400712967, 0.00020905662677250803],
        "output.weight": [0.0013316783588379622, -0.01636703498661518, 0.011360343545675278],
    }
    for key, values in recorded.items():
        assert torch.equal(sd[key].reshape(-1)[:3], torch.tensor(values)), key


def test_last_only_gives_the_last_row_of_the_full_logits():
    """A prefill asks for the last position only; it must be exactly the full forward's last row,
    with and without the KV cache, and with per-row left padding."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16)).eval()
    idx = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        full = model(idx)
        last = model(idx, last_only=True)
        assert last.shape == (2, 1, 50)
        torch.testing.assert_close(last, full[:, -1:], rtol=1e-5, atol=1e-6)  # one row vs a batched matmul
        offset = torch.tensor([0, 3])
        kpm = torch.arange(16)[None, :] >= offset[:, None]
        model.setup_caches(2, 16)
        cached_full = model(idx, torch.arange(7), key_padding_mask=kpm, pos_offset=offset)
        model.setup_caches(2, 16)
        cached_last = model(idx, torch.arange(7), key_padding_mask=kpm, pos_offset=offset, last_only=True)
    torch.testing.assert_close(cached_last, cached_full[:, -1:], rtol=1e-5, atol=1e-6)
