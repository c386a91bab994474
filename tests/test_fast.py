"""gpt.fast: the decode-speed tricks compute the same numbers as the plain ops, and are switchable."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gpt.fast as fast
from gpt import kernels
from gpt.attention import causal_mask
from gpt.attention.dense import MathAttention, SDPAttention
from gpt.config import ModelConfig
from gpt.fast import (
    ColmajorLinear,
    DecodeSDPAttention,
    MatvecLinear,
    apply_tricks,
    decode_attention,
    matvec,
    matvec_int8,
    parse_tricks,
)
from gpt.generation import GenerationError, Generator
from gpt.model import Block, FeedForward, SelfAttention, Transformer
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
    with pytest.raises(GenerationError, match=r"unknown speed trick\(s\) fused \(--tricks\); choose from matvec"):
        parse_tricks("matvec,fused")


def test_apply_tricks_builds_a_copy_sharing_the_weights_and_leaves_the_model_alone():
    cfg = ModelConfig(vocab_size=40, dim=32, n_layers=1, n_heads=4, max_seq_len=16, tie_embeddings=True)
    m = Transformer(cfg)
    weight = m.layers[0].attention.wq.weight
    fast_model = apply_tricks(m, "all")
    wq = fast_model.layers[0].attention.wq
    assert type(wq) is MatvecLinear and wq.weight is weight
    assert type(fast_model.layers[0].attention.mix) is DecodeSDPAttention
    assert fast_model.output.weight is fast_model.tok_embeddings.weight is m.tok_embeddings.weight  # still tied
    # the caller's model is exactly as it was
    assert type(m.layers[0].attention.wq) is nn.Linear and type(m.layers[0].attention.mix) is SDPAttention
    # and a change to a shared weight is seen by both
    with torch.no_grad():
        weight.add_(1.0)
    assert wq.weight is weight
    assert type(apply_tricks(m, "none").layers[0].attention.wq) is nn.Linear


def test_colmajor_head_uses_a_column_major_snapshot_and_leaves_the_model_alone():
    """The vocabulary projection reads a column-major copy of its weight and gives the same logits;
    the caller's weight (shared with the tied embedding) keeps its layout, so checkpoints are unchanged."""
    cfg = ModelConfig(vocab_size=600, dim=32, n_layers=1, n_heads=4, max_seq_len=16, tie_embeddings=True)
    torch.manual_seed(0)
    m = Transformer(cfg).eval()
    idx = torch.tensor([[1, 7, 599]])
    with torch.no_grad():
        ref = m(idx)
        fast_model = apply_tricks(m, "colmajor_head")
        head = fast_model.output
        assert type(head) is ColmajorLinear and head.colmajor_weight.stride() == (1, 600)
        assert m.output.weight.is_contiguous() and type(m.output) is nn.Linear
        assert type(fast_model.layers[0].attention.wq) is nn.Linear  # 32 x 32 is not wide
        torch.testing.assert_close(fast_model(idx), ref, atol=1e-5, rtol=1e-5)
        half = apply_tricks(Transformer(cfg).to(torch.bfloat16), "colmajor_head")
        assert type(half.output) is nn.Linear  # bf16 stays row-major
        torch.testing.assert_close(m(idx), ref, atol=0, rtol=0)


class _Wrapped(torch.Tensor):
    """Stands in for a quantised tensor subclass (e.g. torchao's) that only knows matmul."""


def test_apply_tricks_leaves_tensor_subclass_weights_alone():
    lin = nn.Linear(8, 4, bias=False)
    lin.weight = nn.Parameter(lin.weight.detach().as_subclass(_Wrapped), requires_grad=False)
    assert type(apply_tricks(nn.Sequential(lin), "all")[0]) is nn.Linear


@pytest.mark.slow
def test_two_generators_on_one_model_do_not_disturb_each_other():
    """A Generator compiled with every trick (lean guards, a column-major head) keeps decoding the
    same tokens after another Generator on the same model compiled without tricks, and back."""
    torch._dynamo.reset()
    tok = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz " + "".join(chr(0x100 + i) for i in range(260)))
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=16, n_layers=2, n_heads=2, max_seq_len=64)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    eager = Generator(model, tok, temperature=0.0).generate(["hello wor"], 20).tokens
    fast_gen = Generator(model, tok, temperature=0.0, compile=True, tricks="all")
    assert type(model.output) is nn.Linear and model.output.weight.is_contiguous()  # the model is not touched
    assert fast_gen.generate(["hello wor"], 20).tokens == eager
    plain_gen = Generator(model, tok, temperature=0.0, compile=True, tricks="none")
    assert plain_gen.generate(["hello wor"], 20).tokens == eager
    assert fast_gen.generate(["hello wor"], 20).tokens == eager
    assert type(model.output) is nn.Linear and model.output.weight.is_contiguous()


def _traced_calls(model: nn.Module, tricks: str) -> str:
    """The functions dynamo traces in one compiled decode step, as one string."""
    fast_model = apply_tricks(model, tricks)
    seen: list[str] = []

    def record(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    fast_model.setup_caches(1, 16)
    step = torch.compile(lambda t, p: fast_model(t, p), backend=record, fullgraph=True, dynamic=False)
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
        # up to 16 rows the layer calls gpt.kernels' C++ op when it is built, torch's packed kernel otherwise
        matmul = "gpt_kernels.int8_linear" if kernels.available() else "_weight_int8pack_mm"
    plain = _traced_calls(model, "none")
    assert matmul in plain and "scaled_dot_product_attention" in plain
    kept = quantized and kernels.available()  # the matvec trick leaves an int8 layer with gpt.kernels' op alone
    tricks = _traced_calls(model, "all")
    assert (matmul in tricks) == kept and "scaled_dot_product_attention" not in tricks
    only_matvec = _traced_calls(model, "matvec")
    assert (matmul in only_matvec) == kept and "scaled_dot_product_attention" in only_matvec


def test_regional_traces_one_block_and_calls_it_for_every_layer():
    """The regional trick: one subgraph in the compiled step, invoked once per layer (so inductor
    generates and compiles one Block's code instead of n_layers copies)."""
    cfg = ModelConfig(vocab_size=40, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=16)
    model = Transformer(cfg).eval()
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    for tricks, calls, subgraphs in (("regional", 3, 1), ("none", 0, 0)):
        fast_model = apply_tricks(model, tricks)
        fast_model.setup_caches(1, 16)
        torch._dynamo.reset()
        graphs.clear()
        step = torch.compile(fast_model, backend=record, fullgraph=True, dynamic=False)
        with torch.no_grad():
            step(torch.tensor([[1]]), torch.tensor([3]))
        (gm,) = graphs
        targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
        assert targets.count("invoke_subgraph") == calls
        assert sum(name.startswith("subgraph") for name, _ in gm.named_children()) == subgraphs
    assert type(model.layers[0]) is Block and type(apply_tricks(model, "regional").layers[0]) is fast.RegionBlock


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
    tricks = ["colmajor_head", "decode_attention", "fuse_int8", "lean_guards", "matvec", "regional"]
    assert compiled.report.tricks == tricks
    assert "tricks: " + ", ".join(tricks) in compiled.report.format()


@pytest.mark.slow
def test_compiled_decoding_through_a_colmajor_head_matches_eager():
    """A model whose vocabulary projection is wide enough for colmajor_head decodes the same tokens."""
    torch._dynamo.reset()
    tok = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz " + "".join(chr(0x100 + i) for i in range(260)))
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=16, n_layers=2, n_heads=2, max_seq_len=64)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    eager = Generator(model, tok, temperature=0.0).generate(["hello wor"], 20)
    gen = Generator(model, tok, temperature=0.0, compile=True)
    compiled = gen.generate(["hello wor"], 20)
    assert type(gen.net.output) is ColmajorLinear and gen.net.output.colmajor_weight.stride() == (1, tok.vocab_size)
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


@pytest.mark.skipif(not kernels.available(), reason="gpt.kernels unavailable")
def _recording_backend(seen: list[str]):
    """A torch.compile backend that records the functions the graph calls, then runs it as traced."""

    def record(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    return record


def test_a_few_fp32_rows_go_to_the_f32_op_and_match_the_model():
    """The server's batched decode step (2..16 rows of fp32 weights) runs gpt.kernels' f32_linear
    for every projection, the column-major head included, with the model's numbers."""
    cfg = ModelConfig(vocab_size=600, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    fast_model = apply_tricks(model, "all")
    assert fast_model.output.f32_op and fast_model.layers[0].attention.wq.f32_op
    for rows, expect_op in ((4, True), (1, False), (17, False)):
        seen: list[str] = []
        record = _recording_backend(seen)
        torch._dynamo.reset()
        model.setup_caches(rows, 16)
        fast_model.setup_caches(rows, 16)
        toks, pos = torch.randint(0, 600, (rows, 1)), torch.tensor([3])
        step = torch.compile(lambda t, p: fast_model(t, p), backend=record, fullgraph=True, dynamic=False)
        with torch.no_grad():
            got = step(toks, pos)
            want = model(toks, pos)
        calls = " ".join(seen)
        assert ("gpt_kernels.f32_linear" in calls) == expect_op, rows
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    x = torch.randn(5, 32)
    layer = fast_model.layers[0].attention.wq
    torch.testing.assert_close(layer(x), F.linear(x, model.layers[0].attention.wq.weight), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not kernels.available(), reason="gpt.kernels unavailable")
def test_fuse_int8_makes_one_call_per_group_and_keeps_the_numbers():
    """q, k, v (and w1, w3) of an int8 model: one int8_linear_cat each, the same values as the
    separate per-matrix calls; int4, a bias or more than MAX_M rows keep the separate layers."""
    cfg = ModelConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    quantize_model(model, "int8")
    fused = apply_tricks(model, "fuse_int8")
    assert type(fused.layers[0].attention) is fast.FusedInt8Attention
    assert type(fused.layers[0].feed_forward) is fast.FusedInt8FeedForward
    assert type(model.layers[0].attention) is not fast.FusedInt8Attention  # the caller's model untouched
    for rows, expect_cat in ((3, True), (kernels.MAX_M + 1, False)):
        seen: list[str] = []
        record = _recording_backend(seen)
        torch._dynamo.reset()
        model.setup_caches(rows, 32)
        fused.setup_caches(rows, 32)
        toks, pos = torch.randint(0, 97, (rows, 1)), torch.tensor([5])
        with torch.no_grad():
            want = model(toks, pos)
            torch.testing.assert_close(fused(toks, pos), want, rtol=0, atol=0)  # eager: bit-for-bit
            fused.setup_caches(rows, 32)
            step = torch.compile(lambda t, p: fused(t, p), backend=record, fullgraph=True, dynamic=False)
            got = step(toks, pos)
        calls = " ".join(seen)
        assert calls.count("gpt_kernels.int8_linear_cat") == (4 if expect_cat else 0), rows
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    int4 = Transformer(cfg).eval()
    quantize_model(int4, "int4", group_size=32)
    assert type(apply_tricks(int4, "fuse_int8").layers[0].attention) is SelfAttention
    biased = Transformer(cfg).eval()
    quantize_model(biased, "int8")
    biased.layers[0].feed_forward.w1.bias = torch.nn.Parameter(torch.zeros(cfg.intermediate_size))
    assert type(apply_tricks(biased, "fuse_int8").layers[0].feed_forward) is FeedForward
