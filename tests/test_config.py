import pytest

from gpt.config import PRESETS, ConfigError, ModelConfig, from_preset, llama_intermediate_size
from gpt.model import Transformer


def test_json_round_trip(tmp_path):
    c = from_preset("tiny", attention="math", attention_kwargs={"a": 1}, pos_encoding="learned", tie_embeddings=True)
    c.to_json(tmp_path / "c.json")
    assert ModelConfig.from_json(tmp_path / "c.json") == c


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_build_configs(name):
    c = from_preset(name)
    assert c.dim % c.n_heads == 0 and c.n_heads % c.n_kv_heads == 0


def test_preset_sizes():
    assert 3.3e6 < Transformer(from_preset("shakespeare-char")).num_params() < 3.6e6
    # llama2.c's stories models share the classifier with the embedding
    assert abs(Transformer(from_preset("stories15M")).num_params() - 15.19e6) < 0.05e6
    c = from_preset("stories110M")
    assert (c.dim, c.n_layers, c.n_heads, c.vocab_size) == (768, 12, 12, 32000)
    c7 = from_preset("llama-2-7b")
    assert (c7.dim, c7.n_layers, c7.intermediate_size) == (4096, 32, 11008)
    c8 = from_preset("llama-3-8b")
    assert (c8.n_kv_heads, c8.vocab_size, c8.intermediate_size) == (8, 128256, 14336)


def test_intermediate_size_rule():
    assert llama_intermediate_size(4096) == 11008
    assert ModelConfig(dim=384, n_heads=6).intermediate_size == 1024
    assert from_preset("stories15M", dim=576, n_heads=6).intermediate_size == llama_intermediate_size(576)


def test_mha_gqa_mqa_kv_heads():
    assert ModelConfig(dim=64, n_heads=4).n_kv_heads == 4
    assert ModelConfig(dim=64, n_heads=4, n_kv_heads=2).n_kv_heads == 2
    assert ModelConfig(dim=64, n_heads=4, n_kv_heads=1).n_kv_heads == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dim=65, n_heads=4), "dim=65 is not divisible by n_heads=4"),
        (dict(dim=64, n_heads=4, n_kv_heads=3), "n_heads=4 is not divisible by n_kv_heads=3"),
        (dict(pos_encoding="alibi2"), "unknown pos_encoding 'alibi2'"),
        (dict(dropout=1.5), "dropout=1.5"),
        (dict(n_layers=0), "n_layers=0 must be a positive integer"),
    ],
)
def test_validation_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message) as e:
        ModelConfig(**kwargs)
    assert "\n" not in str(e.value)


def test_unknown_attention_is_refused_by_the_registry():
    from gpt.model import Transformer

    with pytest.raises(ConfigError, match="unknown attention 'nope'; available: .*math.*sdpa") as e:
        Transformer(ModelConfig(dim=64, n_heads=4, attention="nope"))
    assert "\n" not in str(e.value)


def test_overriding_heads_keeps_the_ffn_width():
    """The SwiGLU width depends on dim only; head_dim follows dim and n_heads."""
    c = from_preset("llama-3-8b", n_heads=16)
    assert (c.intermediate_size, c.head_dim) == (14336, 256)
    c = from_preset("llama-3-8b", dim=2048)
    assert (c.intermediate_size, c.head_dim) == (llama_intermediate_size(2048), 64)


def test_unknown_preset_lists_them():
    expected = "unknown preset 'gpt5'; available: tiny, shakespeare-char, shakespeare-char-large, stories15M"
    with pytest.raises(ConfigError, match=expected):
        from_preset("gpt5")


def test_unknown_field_is_refused():
    with pytest.raises(ConfigError, match="unknown config field"):
        ModelConfig.from_dict({"dim": 64, "n_heads": 4, "n_head": 4})
