"""The C++ int8 / int4 CPU kernels (gpt.kernels) against torch references, on every code path this CPU runs.

Two references per op:
- "exact": the same int8 activation the kernel uses (checked bit-for-bit against a torch
  re-implementation), integer block dot products in float64; the kernel may differ only by fp32
  summation order, so the bound is ~1e-5 of the summed magnitudes (a wrong lane, block, row,
  nibble or scale is off by O(1)).
- "float": the dequantised weights times the float activation: the error that activation
  quantisation costs, bounded at 2% (relative, whole output) even with outlier channels.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from gpt import kernels
from gpt.quant import (
    Int4Linear,
    Int8Linear,
    dequantize_int4,
    dequantize_int8,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)

pytestmark = pytest.mark.skipif(
    not kernels.available(), reason=f"gpt.kernels unavailable: {kernels.unavailable_reason()}"
)

PATHS = kernels.supported_paths() if kernels.available() else []
SIZES = [(1, 1), (3, 31), (5, 33), (7, 100), (64, 96), (130, 200), (257, 768)]  # (N, K): odd N and K included
MS = (1, 2, 5, 16)
GROUPS = (32, 64, 128, 256)


def _activation(m: int, k: int, outliers: bool = True) -> torch.Tensor:
    x = torch.randn(m, k)
    if outliers:  # a few large channels, as LLM activations have
        x[:, :: max(1, k // 5)] *= 40.0
    return x


def _quantize_activation_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' activation quantisation in torch: per 32 channels d = max|x|/127, q = round(x/d)."""
    m, k = x.shape
    kb = (k + 31) // 32
    xb = F.pad(x.float(), (0, kb * 32 - k)).reshape(m, kb, 32)
    d = xb.abs().amax(-1) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(xb * inv[..., None]).clamp(-127, 127)
    return q.reshape(m, kb * 32).to(torch.int8), d


def _block_dots(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """(M, KB*32) x (N, KB*32) integers -> (M, N, KB) per-block integer dot products in float64."""
    m, kp = xq.shape
    kb = kp // 32
    return torch.einsum("mbi,nbi->mnb", xq.double().reshape(m, kb, 32), wq.double().reshape(-1, kb, 32))


def _int8_exact_ref(x, q, s):
    """(value, magnitude): the kernel's arithmetic in float64, and the sum of |terms| for the tolerance."""
    xq, d = _quantize_activation_ref(x)
    wq = F.pad(q, (0, xq.shape[1] - q.shape[1]))
    terms = _block_dots(xq, wq) * d.double()[:, None, :] * s.double()[None, :, None]
    return terms.sum(-1), terms.abs().sum(-1)


def _int4_exact_ref(x, packed, sz, group, k):
    """sum_g s_g * (sum_k q * xq * d - 8 * sum_k xq * d) + zero_g * sum_k x, in float64 (the kernel's terms)."""
    xq, d = _quantize_activation_ref(x)
    n = packed.shape[0]
    q = unpack_int4(packed).double()[:, :k]
    kp = xq.shape[1]
    q = F.pad(q, (0, kp - k))
    kb = kp // 32
    scale, zero = sz.half().double().transpose(0, 1).unbind(-1)  # (N, Kp/g), as the kernel stores them
    blk_group = torch.arange(kb) * 32 // group
    s_blk = scale[:, blk_group.clamp(max=scale.shape[1] - 1)]  # (N, KB)
    dots = _block_dots(xq, q) * d.double()[:, None, :] * s_blk[None]  # (M, N, KB), the unsigned nibbles
    xqd = (xq.double().reshape(x.shape[0], kb, 32).sum(-1) * d.double())[:, None, :] * s_blk[None]  # (M, N, KB)
    xs = F.pad(x.double(), (0, scale.shape[1] * group - k)).reshape(x.shape[0], -1, group).sum(-1)  # (M, Kp/g)
    zterm = xs[:, None, :] * zero[None]
    value = dots.sum(-1) - 8.0 * xqd.sum(-1) + zterm.sum(-1)
    # the magnitudes the kernel's fp32 sums see: q in [0, 15] is not centred, its "- 8" comes out per group
    mag = dots.abs().sum(-1) + 8.0 * xqd.abs().sum(-1) + zterm.abs().sum(-1)
    assert value.shape == (x.shape[0], n)
    return value, mag


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref.double()).norm() / ref.double().norm().clamp(min=1e-30)).item()


# -- the activation quantisation ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,k", [(1, 1), (3, 33), (16, 100), (2, 768)])
def test_activation_quantisation_is_exactly_the_reference(m, k, dtype):
    x = _activation(m, k).to(dtype)
    x[0, 0] = 0.0
    if k >= 64:
        x[:, 32:64] = 0.0  # an all-zero block: scale 0, values 0
    q, d = kernels.quantize_activation(x)
    q_ref, d_ref = _quantize_activation_ref(x)
    assert torch.equal(q, q_ref)
    assert torch.equal(d, d_ref)


# -- int8 --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("n,k", SIZES)
def test_int8_matches_exact_and_float_references(path, n, k):
    w = torch.randn(n, k)
    q, s = quantize_int8(w)
    packed = kernels.int8_pack(q)
    for m in MS:
        x = _activation(m, k)
        y = kernels.int8_linear(x, packed, s, n, k, path)
        assert y.shape == (m, n) and y.dtype == torch.float32
        value, mag = _int8_exact_ref(x, q, s)
        assert (y.double() - value).abs().le(1e-5 * mag + 1e-6).all(), f"M={m}"
        ref = x.double() @ dequantize_int8(q, s).double().T
        assert _rel(y, ref) < 0.02, f"M={m}"


@pytest.mark.parametrize("path", PATHS)
def test_int8_every_m_up_to_16_and_bf16(path):
    n, k = 67, 161
    q, s = quantize_int8(torch.randn(n, k))
    packed = kernels.int8_pack(q)
    for m in range(1, 17):
        x = _activation(m, k).bfloat16()
        y = kernels.int8_linear(x, packed, s, n, k, path)
        assert y.dtype == torch.bfloat16 and y.shape == (m, n)
        value, mag = _int8_exact_ref(x, q, s)
        # the fp32 result is rounded to bf16 once (relative 2^-8)
        assert (y.double() - value).abs().le(4e-3 * value.abs() + 1e-5 * mag + 1e-6).all(), f"M={m}"


def test_int8_extreme_weights_do_not_saturate():
    """q = ±127 everywhere and x at full scale: the AVX2 int16 pair sums are at their maximum."""
    n, k = 8, 256
    q = torch.full((n, k), 127, dtype=torch.int8)
    q[1::2] = -127
    s = torch.ones(n)
    x = torch.full((1, k), 3.0)
    for path in PATHS:
        y = kernels.int8_linear(x, kernels.int8_pack(q), s, n, k, path)
        expected = torch.tensor([127.0 * 3.0 * k if i % 2 == 0 else -127.0 * 3.0 * k for i in range(n)])
        torch.testing.assert_close(y[0], expected, rtol=1e-6, atol=0)


def test_int8_larger_m_is_still_correct():
    n, k, m = 40, 96, 40  # M beyond 16: the op loops (the layers fall back there for speed)
    q, s = quantize_int8(torch.randn(n, k))
    x = _activation(m, k)
    value, mag = _int8_exact_ref(x, q, s)
    y = kernels.int8_linear(x, kernels.int8_pack(q), s, n, k)
    assert (y.double() - value).abs().le(1e-5 * mag + 1e-6).all()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("k", [31, 100, 768])
def test_int8_cat_is_the_separate_products_side_by_side(path, k):
    """Same activation quantisation, same row kernels: bit-for-bit the per-matrix op, concatenated."""
    ns = [7, 130, 1, 64]  # odd sizes: the matrices' row groups are split across threads unevenly
    qs = [quantize_int8(torch.randn(n, k)) for n in ns]
    packed = [kernels.int8_pack(q) for q, _ in qs]
    scales = [s for _, s in qs]
    for m in (1, 2, 5, 16, 17):
        for dtype in (torch.float32, torch.bfloat16):
            x = _activation(m, k).to(dtype)
            y = kernels.int8_linear_cat(x, packed, scales, ns, k, path)
            assert y.shape == (m, sum(ns)) and y.dtype == torch.float32
            parts = [
                kernels.int8_linear(x.float(), p, s, n, k, path) for p, s, n in zip(packed, scales, ns, strict=True)
            ]
            assert torch.equal(y, torch.cat(parts, dim=-1)), f"M={m} {dtype}"


def test_int8_cat_refuses_mismatched_lists():
    q, s = quantize_int8(torch.randn(8, 64))
    packed = kernels.int8_pack(q)
    x = torch.randn(1, 64)
    with pytest.raises(RuntimeError, match="as many packed weights"):
        kernels.int8_linear_cat(x, [packed, packed], [s], [8, 8], 64)
    with pytest.raises(RuntimeError, match=r"packed\[1\] is not int8_pack's output"):
        kernels.int8_linear_cat(x, [packed, packed], [s, s], [8, 12], 64)
    with pytest.raises(RuntimeError, match=r"scales\[0\] must be contiguous float32"):
        kernels.int8_linear_cat(x, [packed], [s.bfloat16()], [8], 64)


# -- fp32 small-M ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("n,k", SIZES + [(5, 16), (9, 17), (6, 48)])
def test_f32_matches_a_float64_matmul_for_every_m_up_to_16(path, n, k):
    w = torch.randn(n, k)
    for m in range(1, 17):
        x = _activation(m, k)
        y = kernels.f32_linear(x, w, path)
        assert y.shape == (m, n) and y.dtype == torch.float32
        ref = x.double() @ w.double().T
        mag = x.double().abs() @ w.double().abs().T  # only summation order may differ
        assert (y.double() - ref).abs().le(1e-6 * mag + 1e-6).all(), f"M={m}"


def test_f32_reads_strided_inputs_and_larger_m():
    w = torch.randn(40, 130).T.contiguous().T  # column-major: the op makes its own row-major copy
    x = torch.randn(50, 300)[:, ::2][:, :130]
    torch.testing.assert_close(kernels.f32_linear(x, w), x @ w.T, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="weight must be float32"):
        kernels.f32_linear(x, w.bfloat16())
    with pytest.raises(RuntimeError, match="x must be float32"):
        kernels.f32_linear(x.bfloat16(), w)


# -- int4 --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("n,k", SIZES)
def test_int4_matches_exact_and_float_references(path, group, n, k):
    w = torch.randn(n, k)
    packed, sz = quantize_int4(w, group)
    kp, ks = kernels.int4_pack(packed, sz, group)
    for m in MS:
        x = _activation(m, k)
        y = kernels.int4_linear(x, kp, ks, n, k, group, path)
        assert y.shape == (m, n) and y.dtype == torch.float32
        value, mag = _int4_exact_ref(x, packed, sz, group, k)
        assert (y.double() - value).abs().le(1e-5 * mag + 1e-6).all(), f"M={m}"
        ref = x.double() @ dequantize_int4(packed, sz, group)[:, :k].double().T
        assert _rel(y, ref) < 0.02, f"M={m}"


@pytest.mark.parametrize("path", PATHS)
def test_int4_every_m_up_to_16_and_bf16(path):
    n, k, group = 45, 130, 32
    packed, sz = quantize_int4(torch.randn(n, k), group)
    kp, ks = kernels.int4_pack(packed, sz, group)
    for m in range(1, 17):
        x = _activation(m, k).bfloat16()
        y = kernels.int4_linear(x, kp, ks, n, k, group, path)
        assert y.dtype == torch.bfloat16 and y.shape == (m, n)
        value, mag = _int4_exact_ref(x, packed, sz, group, k)
        assert (y.double() - value).abs().le(4e-3 * value.abs() + 1e-5 * mag + 1e-6).all(), f"M={m}"


# -- dispatch, errors, build ---------------------------------------------------------------------------


def test_cpu_path_is_the_best_supported_one():
    assert kernels.cpu_path() in kernels.PATHS
    assert kernels.supported_paths()[0] == "scalar"
    if not os.environ.get("GPT_KERNELS_PATH"):
        assert kernels.cpu_path() == kernels.supported_paths()[-1]
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if " avx2 " in flags and " fma " in flags:
        assert "avx2" in kernels.supported_paths()
    if " avx512_vnni " in flags and " avx512bw " in flags and " avx512vl " in flags:
        assert "avx512_vnni" in kernels.supported_paths()


def test_env_var_lowers_the_default_path():
    code = "from gpt import kernels; print(kernels.cpu_path())"
    env = {**os.environ, "GPT_KERNELS_PATH": "scalar"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "scalar"


def test_bad_calls_raise():
    q, s = quantize_int8(torch.randn(8, 64))
    packed = kernels.int8_pack(q)
    with pytest.raises(kernels.KernelError):
        kernels.int8_linear(torch.randn(1, 64), packed, s, 8, 64, path="no-such-path")
    with pytest.raises(RuntimeError, match="columns"):
        kernels.int8_linear(torch.randn(1, 63), packed, s, 8, 64)
    with pytest.raises(RuntimeError, match="packed"):
        kernels.int8_linear(torch.randn(1, 64), packed[:-1].contiguous(), s, 8, 64)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        kernels.int8_linear(torch.randn(1, 64).half(), packed, s, 8, 64)


def test_failed_build_warns_once_and_reports_unavailable(monkeypatch):
    saved = dict(kernels._state)
    try:
        kernels._state.clear()

        def boom() -> None:
            raise RuntimeError("Error building extension 'gpt_kernels'\nmore lines")

        monkeypatch.setattr(kernels, "_build_and_load", boom)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert not kernels.available()
            assert not kernels.available()
            assert kernels.cpu_path() == "none"
        lines = [str(w.message) for w in caught]
        assert len(lines) == 1 and "\n" not in lines[0] and "unavailable" in lines[0]
        with pytest.raises(kernels.KernelError):
            kernels.int8_pack(torch.zeros(4, 4, dtype=torch.int8))
    finally:
        kernels._state.clear()
        kernels._state.update(saved)


@pytest.mark.slow
def test_two_processes_building_at_once_share_one_cache(tmp_path):
    """A fresh cache, two builders racing: both load the same .so, neither corrupts the other."""
    code = (
        "from gpt import kernels; assert kernels.available(), kernels.unavailable_reason(); print(kernels.cpu_path())"
    )
    env = {**os.environ, "GPT_KERNELS_CACHE": str(tmp_path / "cache")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
        assert out.strip() == kernels.cpu_path()
    assert len(list((tmp_path / "cache").glob("*/*.so"))) == 1


# -- inside torch.compile ----------------------------------------------------------------------------


def test_ops_inside_fullgraph_compile():
    torch._dynamo.reset()
    n, k, group = 70, 96, 32
    w = torch.randn(n, k)
    q8, s8 = quantize_int8(w)
    p8 = kernels.int8_pack(q8)
    q4, sz = quantize_int4(w, group)
    p4, s4 = kernels.int4_pack(q4, sz, group)

    def f(x):
        h = torch.nn.functional.silu(x) * 2.0
        a = torch.ops.gpt_kernels.int8_linear(h, p8, s8, n, k)
        b = torch.ops.gpt_kernels.int4_linear(h, p4, s4, n, k, group)
        return a + b

    compiled = torch.compile(f, fullgraph=True)
    for m in (1, 3):
        x = torch.randn(m, k)
        torch.testing.assert_close(compiled(x), f(x), rtol=1e-5, atol=1e-5)


# -- the quantised layers ----------------------------------------------------------------------------


def _layers(k: int = 96, n: int = 70, group: int = 32, bias: bool = True):
    lin = torch.nn.Linear(k, n, bias=bias)
    return Int8Linear.from_linear(lin), Int4Linear.from_linear(lin, group)


def test_layers_use_the_ops_up_to_their_row_limits_and_torch_beyond():
    l8, l4 = _layers()
    assert l8._packed is not None and l4._packed is not None
    assert "gpt_kernels.int8_linear" in repr(l8) and "gpt_kernels.int4_linear" in repr(l4)
    for shape in [(1, 96), (1, 1, 96), (2, 8, 96), (16, 96)]:
        x = torch.randn(*shape)
        flat = x.reshape(-1, 96)
        y8 = kernels.int8_linear(flat, l8._packed, l8.scales, 70, 96) + l8.bias
        assert torch.equal(l8(x), y8.reshape(*shape[:-1], 70))
        if flat.shape[0] <= kernels.INT4_MAX_M:
            y4 = kernels.int4_linear(flat, l4._packed, l4._packed_scales, 70, 96, 32) + l4.bias
            assert torch.equal(l4(x), y4.reshape(*shape[:-1], 70))
    x = torch.randn(kernels.MAX_M + 1, 96)  # beyond MAX_M: torch's packed kernels, as before
    today8 = torch.ops.aten._weight_int8pack_mm(x.bfloat16(), l8.qweight, l8.scales.bfloat16()).float() + l8.bias
    assert torch.equal(l8(x), today8)
    x = torch.randn(kernels.INT4_MAX_M + 1, 96)
    today4 = torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), l4._kernel_weight, 32, l4._kernel_sz)
    assert torch.equal(l4(x), today4[:, :70].float() + l4.bias)
    for layer in (l8, l4):  # fp16 is not an op dtype: the layer falls back
        layer(torch.randn(1, 96).half())
    l4.to(torch.bfloat16)  # a module-wide cast reaches the derived scales: the layer falls back, no error
    assert l4(torch.randn(1, 96)).shape == (1, 70)


def test_fallback_when_unavailable_is_todays_path(monkeypatch):
    monkeypatch.setattr(kernels, "available", lambda: False)
    l8, l4 = _layers(bias=False)
    assert l8._packed is None and l4._packed is None
    x = torch.randn(1, 96)
    today8 = torch.ops.aten._weight_int8pack_mm(x.bfloat16(), l8.qweight, l8.scales.bfloat16()).float()
    today4 = torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), l4._kernel_weight, 32, l4._kernel_sz)
    assert torch.equal(l8(x), today8)
    assert torch.equal(l4(x), today4[:, :70].float())


def test_quantised_layers_in_a_fullgraph_compile():
    torch._dynamo.reset()
    l8, l4 = _layers(k=96, n=96)
    model = torch.nn.Sequential(l8, torch.nn.SiLU(), l4).eval()
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    x = torch.randn(1, 96)
    with torch.no_grad():
        eager = model(x)
        torch.compile(model, backend=recording_backend, fullgraph=True)(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    assert len(graphs) == 1 and "gpt_kernels.int8_linear" in graphs[0] and "gpt_kernels.int4_linear" in graphs[0]
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
