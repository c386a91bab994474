import pytest
import torch

from gpt.attention.dense import SDPAttention
from gpt.config import ModelConfig
from gpt.model import Transformer


@pytest.mark.parametrize("pos", ["rope", "sinusoidal", "learned"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("attention", ["sdpa", "math"])
def test_incremental_decoding_equals_full_forward(pos, kv_heads, attention):
    cfg = ModelConfig(
        vocab_size=50,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=kv_heads,
        max_seq_len=32,
        pos_encoding=pos,
        attention=attention,
    )
    m = Transformer(cfg).eval()
    idx = torch.randint(0, 50, (2, 24))
    with torch.no_grad():
        full = m(idx)
        m.setup_caches(max_batch_size=2, max_seq_len=32)
        steps = [m(idx[:, :7], torch.arange(7))]  # prefill
        for t in range(7, 24):  # then one token at a time
            steps.append(m(idx[:, t : t + 1], torch.tensor([t])))
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_cache_is_static_and_written_in_place():
    cfg = ModelConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=16)
    m = Transformer(cfg).eval()
    m.setup_caches(max_batch_size=3, max_seq_len=16)
    cache = m.layers[0].attention.kv_cache
    ptr = cache.k_cache.data_ptr()
    assert cache.k_cache.shape == (3, 1, 16, 16)
    with torch.no_grad():
        m(torch.randint(0, 50, (2, 5)), torch.arange(5))
    assert cache.k_cache.data_ptr() == ptr
    assert cache.k_cache[:2, :, :5].abs().sum() > 0 and cache.k_cache[:, :, 5:].abs().sum() == 0
    assert cache.k_cache[2].abs().sum() == 0  # rows beyond the batch are untouched
    assert "k_cache" not in "".join(m.state_dict())  # never saved


def test_cache_dtype_and_too_long():
    m = Transformer(ModelConfig(vocab_size=10, dim=32, n_layers=1, n_heads=2, max_seq_len=16))
    m.setup_caches(1, dtype=torch.bfloat16)
    assert m.layers[0].attention.kv_cache.k_cache.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len=16"):
        m.setup_caches(1, 17)


def test_left_padded_batch_matches_single_prompts():
    """Rows of different lengths, left-padded, with pos_offset: each row equals its prompt alone."""
    cfg = ModelConfig(
        vocab_size=50, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32, pos_encoding="learned"
    )
    m = Transformer(cfg).eval()
    a, b = torch.randint(0, 50, (9,)), torch.randint(0, 50, (5,))
    pad = torch.tensor([0, 4])
    batch = torch.stack([a, torch.cat([torch.zeros(4, dtype=torch.long), b])])
    kpm = torch.ones(2, 32, dtype=torch.bool)
    kpm[1, :4] = False
    with torch.no_grad():
        m.setup_caches(2, 32)
        out = m(batch, torch.arange(9), key_padding_mask=kpm, pos_offset=pad)
        nxt = m(torch.tensor([[3], [7]]), torch.tensor([9]), key_padding_mask=kpm, pos_offset=pad)
        m.clear_caches()
        ref_a = m(torch.cat([a, torch.tensor([3])])[None])
        ref_b = m(torch.cat([b, torch.tensor([7])])[None])
    torch.testing.assert_close(out[0], ref_a[0, :9], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, 4:], ref_b[0, :5], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(nxt[0, 0], ref_a[0, 9], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(nxt[1, 0], ref_b[0, 5], atol=1e-5, rtol=1e-5)


class RecordingSDPA(SDPAttention):
    """A replacement mixing step that overrides only forward, as gpt.fast's decode module does."""

    key_lengths: list[int] = []

    def forward(self, q, k, v, q_pos, k_pos, key_padding_mask=None, return_weights=False):
        RecordingSDPA.key_lengths.append(k.size(2))
        return super().forward(q, k, v, q_pos, k_pos, key_padding_mask, return_weights)


def test_the_mixing_step_owns_the_cache_and_a_replacement_inherits_it():
    """The variant base keeps the cache (mix.kv_cache, written by mix.attend): a module swapped in
    for `mix` that overrides only forward decodes through it and sees every slot of it."""
    cfg = ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16)
    m = Transformer(cfg).eval()
    idx = torch.randint(0, 50, (1, 10))
    with torch.no_grad():
        full = m(idx)
        for layer in m.layers:
            layer.attention.mix.__class__ = RecordingSDPA
        m.setup_caches(1, 16)
        assert all(layer.attention.mix.kv_cache is layer.attention.kv_cache is not None for layer in m.layers)
        RecordingSDPA.key_lengths.clear()
        steps = [m(idx[:, :4], torch.arange(4))] + [m(idx[:, t : t + 1], torch.tensor([t])) for t in range(4, 10)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert RecordingSDPA.key_lengths == [16] * 2 * 7  # 2 layers x (prefill + 6 steps), all 16 slots
    m.clear_caches()
    assert all(layer.attention.mix.kv_cache is None for layer in m.layers)
