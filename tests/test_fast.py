"""gpt.fast: the decode-speed tricks compute the same numbers as the plain ops, and are switchable."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gpt.fast as fast
from gpt.attention import causal_mask
from gpt.attention.dense import MathAttention
from gpt.checkpoint import model_state_for_saving
from gpt.config import ModelConfig
from gpt.fast import MatvecLinear, apply_tricks, decode_attention, matvec, matvec_int8, parse_tricks
from gpt.generation import GenerationError, Generator
from gpt.model import Transformer
from gpt.quant import Int8Linear, dequantize_int8, quantize_model
from gpt.tokenizer import CharTokenizer


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_matvec_equals_linear(dtype, tol):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 80, generator=g).to(dtype)
    x = torch.randn(1, 1, 80, generator=g).to(dtype)
    y = matvec(x, w)
    assert y.shape == (1, 1, 48) and y.dtype == dtype
    torch.testing.assert_close(y.float(), F.linear(x.float(), w.float()), atol=tol, rtol=tol)


def test_matvec_int8_equals_the_dequantized_product():
    g = torch.Generator().manual_seed(1)
    lin = nn.Linear(64, 40, bias=False)
    q = Int8Linear.from_linear(lin)
    x = torch.randn(1, 1, 64, generator=g)
    ref = F.linear(x, dequantize_int8(q.qweight, q.scales))
    torch.testing.assert_close(matvec_int8(x, q.qweight, q.scales), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_decode_attention_equals_the_math_reference(n_heads, n_kv_heads):
    """One query per row against a static cache, with GQA and a left-padded row."""
    g = torch.Generator().manual_seed(2)
    b, s, d = 2, 10, 8
    q = torch.randn(b, n_heads, 1, d, generator=g)
    k = torch.randn(b, n_kv_heads, s, d, generator=g)
    v = torch.randn(b, n_kv_heads, s, d, generator=g)
    q_pos, k_pos = torch.tensor([6]), torch.arange(s)
    kpm = torch.ones(b, s, dtype=torch.bool)
    kpm[1, :3] = False  # row 1 is left-padded by three slots
    mask = causal_mask(q_pos, k_pos, kpm)
    cfg = ModelConfig(vocab_size=10, dim=n_heads * d, n_layers=1, n_heads=n_heads, n_kv_heads=n_kv_heads)
    ref = MathAttention(cfg)(q, k, v, q_pos, k_pos, kpm)
    torch.testing.assert_close(decode_attention(q, k, v, mask), ref, atol=1e-5, rtol=1e-5)


def test_parse_tricks():
    assert parse_tricks(None) == set(fast.DEFAULT_TRICKS)
    assert parse_tricks("none") == set() and parse_tricks("all") == set(fast.TRICKS)
    assert parse_tricks("matvec") == {"matvec"}
    with pytest.raises(ValueError, match=r"unknown speed trick\(s\) fused \(--tricks\); choose from matvec"):
        parse_tricks("matvec,fused")


def test_apply_tricks_swaps_in_place_and_back():
    cfg = ModelConfig(vocab_size=40, dim=32, n_layers=1, n_heads=4, max_seq_len=16, tie_embeddings=True)
    m = Transformer(cfg)
    weight = m.layers[0].attention.wq.weight
    apply_tricks(m, "all")
    assert type(m.layers[0].attention.wq) is MatvecLinear and m.layers[0].attention.wq.weight is weight
    assert m.output.weight is m.tok_embeddings.weight  # tied weights stay tied
    assert m.layers[0].attention.mix.decode_attention
    apply_tricks(m, "none")
    assert type(m.layers[0].attention.wq) is nn.Linear and not m.layers[0].attention.mix.decode_attention


def test_colmajor_head_relays_out_the_wide_fp32_head_in_place_and_back():
    """The vocabulary projection becomes column-major (shared with the tied embedding), gives the
    same logits, and a checkpoint written meanwhile still round-trips."""
    cfg = ModelConfig(vocab_size=600, dim=32, n_layers=1, n_heads=4, max_seq_len=16, tie_embeddings=True)
    torch.manual_seed(0)
    m = Transformer(cfg).eval()
    idx = torch.tensor([[1, 7, 599]])
    with torch.no_grad():
        ref = m(idx)
        apply_tricks(m, "colmajor_head")
        w = m.output.weight
        assert w.stride() == (1, 600) and m.tok_embeddings.weight is w and m.output.colmajor
        assert not m.layers[0].attention.wq.colmajor  # 32 x 32 is not wide
        torch.testing.assert_close(m(idx), ref, atol=1e-5, rtol=1e-5)
        half = apply_tricks(Transformer(cfg).to(torch.bfloat16), "colmajor_head")
        assert half.output.weight.is_contiguous() and not half.output.colmajor  # bf16 stays row-major
        apply_tricks(m, "all")
        sd = model_state_for_saving(m)
        assert all(t.is_contiguous() for t in sd.values())
        torch.testing.assert_close(sd["tok_embeddings.weight"], w.detach().float())
        apply_tricks(m, "none")
        assert m.output.weight.is_contiguous() and type(m.output) is nn.Linear
        torch.testing.assert_close(m(idx), ref, atol=1e-5, rtol=1e-5)


class _Wrapped(torch.Tensor):
    """Stands in for a quantised tensor subclass (e.g. torchao's) that only knows matmul."""


def test_apply_tricks_leaves_tensor_subclass_weights_alone():
    lin = nn.Linear(8, 4, bias=False)
    lin.weight = nn.Parameter(lin.weight.detach().as_subclass(_Wrapped), requires_grad=False)
    apply_tricks(nn.Sequential(lin), "all")
    assert type(lin) is nn.Linear


def _traced_calls(model: nn.Module, tricks: str) -> str:
    """The functions dynamo traces in one compiled decode step, as one string."""
    apply_tricks(model, tricks)
    seen: list[str] = []

    def record(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    model.setup_caches(1, 16)
    step = torch.compile(lambda t, p: model(t, p), backend=record, fullgraph=True, dynamic=False)
    with torch.no_grad():
        step(torch.tensor([[1]]), torch.tensor([3]))
    return " ".join(seen)


@pytest.mark.parametrize("quantized", [False, True])
def test_tricks_replace_the_matmul_and_attention_kernels_in_the_traced_step(quantized):
    cfg = ModelConfig(vocab_size=40, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, max_seq_len=16)
    model = Transformer(cfg).eval()
    matmul = "linear"
    if quantized:
        quantize_model(model, "int8")
        matmul = "_weight_int8pack_mm"
    plain = _traced_calls(model, "none")
    assert matmul in plain and "scaled_dot_product_attention" in plain
    tricks = _traced_calls(model, "all")
    assert matmul not in tricks and "scaled_dot_product_attention" not in tricks
    only_matvec = _traced_calls(model, "matvec")
    assert matmul not in only_matvec and "scaled_dot_product_attention" in only_matvec


@pytest.mark.slow
@pytest.mark.parametrize("quantized", [False, True])
def test_compiled_decoding_with_tricks_matches_eager(quantized):
    """Greedy tokens through the compiled step with the tricks equal the eager model's."""
    torch._dynamo.reset()
    tok = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz ")
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    if quantized:
        quantize_model(model, "int8")
    eager = Generator(model, tok, temperature=0.0).generate(["hello wor"], 20)
    compiled = Generator(model, tok, temperature=0.0, compile=True).generate(["hello wor"], 20)
    assert compiled.tokens == eager.tokens
    assert compiled.report.tricks == ["colmajor_head", "decode_attention", "lean_guards", "matvec"]
    assert "tricks: colmajor_head, decode_attention, lean_guards, matvec" in compiled.report.format()


@pytest.mark.slow
def test_compiled_decoding_through_a_colmajor_head_matches_eager():
    """A model whose vocabulary projection is wide enough for colmajor_head decodes the same tokens."""
    torch._dynamo.reset()
    tok = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz " + "".join(chr(0x100 + i) for i in range(260)))
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=16, n_layers=2, n_heads=2, max_seq_len=64)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    eager = Generator(model, tok, temperature=0.0).generate(["hello wor"], 20)
    compiled = Generator(model, tok, temperature=0.0, compile=True).generate(["hello wor"], 20)
    assert model.output.colmajor and model.output.weight.stride() == (1, tok.vocab_size)
    assert compiled.tokens == eager.tokens


def test_lean_guards_is_a_compile_option():
    assert fast.compile_options("none") == {}
    opts = fast.compile_options("lean_guards")["options"]
    assert opts["guard_filter_fn"] is torch.compiler.skip_guard_on_inbuilt_nn_modules_unsafe


def test_generator_rejects_unknown_tricks():
    tok = CharTokenizer.from_text("ab")
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=16, n_layers=1, n_heads=2, max_seq_len=8))
    with pytest.raises(GenerationError, match="unknown speed trick"):
        Generator(model, tok, compile=True, tricks="turbo")
