"""Decode-speed tricks: a one-way transform that builds a decode-specialised copy of a model.

    fast = apply_tricks(model, "all")          # new module objects, the SAME Parameters and buffers
    step = torch.compile(lambda t, p: fast(t, p), fullgraph=True, **compile_options("all"))
    (Generator(compile=True) does both, with DEFAULT_TRICKS unless told otherwise)

The caller's model is never changed: its modules keep their classes and its weights their
layout, so two Generators on one model cannot disturb each other, and removing this module
leaves everything else working (slower). Nothing in the model, the attention variants or the
quantised layers knows these tricks exist. PERF-NOTES.md has each trick's prediction and
measurement.

Decoding one token multiplies a single activation row by every weight matrix: a
matrix-vector product whose speed is how fast the weights stream from memory, and torch's CPU
matmul kernels are built for matrices, not for one row.

"matvec": nn.Linear (and int8 layers without a native kernel) become layers that write a
one-row product as an elementwise multiply and a sum; inside torch.compile inductor turns that
into one vectorised C++ reduction per matrix, converting bf16 / int8 to fp32 in registers.
Eager, the expression would materialise the whole (N, K) product, so it acts only while
compiling and only for one row; otherwise the layer runs the original op. A few rows (the
server's slots decoding together, 2..16) of fp32 weights go to gpt.kernels' f32_linear where it
is built: torch's BLAS reads the weights at a third to a half of its one-row speed for 4-8 rows
here, the op streams them once for all rows.

"decode_attention": one query against the static KV cache is a few thousand multiply-adds per
head, but SDPA's CPU kernel costs ~0.2 ms per call in set-up. "sdpa" mixing steps become a
subclass that computes one query as multiply-sum, softmax, multiply-sum, which inductor fuses
with the cache update around it.

"colmajor_head": the vocabulary projection of a small model is very wide and shallow (32000 x
288 at stories15M, 62 % of the weight bytes). Stored column-major, the BLAS reads it as a
stream of axpys, ~1.3x faster here than 32000 short dot products. fp32 linears with
out_features >= 16 x in_features get a column-major copy of their weight (a snapshot: the
caller's weight and a tied embedding are untouched; memory grows by that one matrix). bf16
keeps the reduction: the BLAS's bf16 path is slower here.

"regional": every Block of the model runs the same code on weights of the same shapes, but
inductor generates and compiles C++ for each of them again, which is most of the cold start.
The copy's Blocks become a subclass whose forward is a torch.compiler.nested_compile_region:
dynamo traces one Block, inductor emits its code once and calls it for every layer, still inside
one graph (no per-layer guard checks or graph breaks). The price is per step: nothing fuses across
a region's edge and each call of it runs its own wrapper code (stories15M int8: 9 % fewer tokens/s
for 7 s less cold and 4.4 s less warm start, docs/bench_startup.md). A one-shot `generate.py --compile` gains; the
serving engine, which decodes for hours, uses SERVE_TRICKS (all but this one).

"fuse_int8": an int8 layer's q, k and v projections read the same activation row, and so do the
feed-forward's w1 and w3. Through gpt.kernels' int8_linear_cat each group is one call: one
activation quantisation and one parallel loop that streams from one matrix into the next,
instead of three (two) calls that each pay the op's fixed cost and a fork / join of the threads.

"lean_guards": dynamo's guards on torch's built-in layers cost ~0.4 ms per token at
stories15M; skipping them is safe here because the compiled step closes over this private copy
of the module tree, which nobody else re-types or re-lays out.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpt import kernels
from gpt.attention import causal_mask
from gpt.attention.dense import SDPAttention
from gpt.errors import GenerationError
from gpt.model import Block, FeedForward, SelfAttention
from gpt.quant import Int8Linear, takes_own_kernel

TRICKS = ("matvec", "decode_attention", "lean_guards", "colmajor_head", "regional", "fuse_int8")
DEFAULT_TRICKS = TRICKS
# A server pays its start-up once and decodes for hours: "regional" saves seconds of compiling
# but each call of the shared Block region costs time in every step (PERF-NOTES.md: stories15M
# int8, one slot, 6 % fewer tokens/s with it), so the serving engine's default leaves it out.
SERVE_TRICKS = tuple(t for t in TRICKS if t != "regional")


def parse_tricks(spec: str | Iterable[str] | None, default: Iterable[str] = DEFAULT_TRICKS) -> frozenset[str]:
    """'matvec' / 'none' / 'all' / an iterable of names -> a set of trick names (one-line error if
    unknown); None -> `default`."""
    if spec is None:
        return frozenset(default)
    if isinstance(spec, str):
        spec = [] if spec in ("", "none") else list(TRICKS) if spec == "all" else spec.split(",")
    names = frozenset(s.strip() for s in spec if s.strip())
    unknown = sorted(names - set(TRICKS))
    if unknown:
        raise GenerationError(
            f"unknown speed trick(s) {', '.join(unknown)} (--tricks); choose from {', '.join(TRICKS)}, all or none"
        )
    return names


def compile_options(tricks: Iterable[str] | str | None = DEFAULT_TRICKS) -> dict:
    """Extra torch.compile options for the named tricks."""
    if "lean_guards" in parse_tricks(tricks):
        return {"options": {"guard_filter_fn": torch.compiler.skip_guard_on_inbuilt_nn_modules_unsafe}}
    return {}


# -- the kernels ----------------------------------------------------------------------------


def _one_compiled_row(x: Tensor) -> bool:
    # both facts are static in a compiled graph (shapes are specialised): no data-dependent branch
    return x.numel() == x.shape[-1] and torch.compiler.is_compiling()


def matvec(x: Tensor, weight: Tensor) -> Tensor:
    """x @ weightᵀ for one row x (..., K) and a float weight (N, K), accumulated in fp32."""
    y = (weight.float() * x.reshape(-1).float()).sum(-1)
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def matvec_int8(x: Tensor, qweight: Tensor, scales: Tensor) -> Tensor:
    """One row times int8 weights (N, K) with a scale per output channel."""
    y = (qweight.float() * x.reshape(-1).float()).sum(-1) * scales.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], qweight.shape[0])


def decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """softmax(q kᵀ/√d, masked) v for one query per row: q (B, H, 1, D), k/v (B, Hkv, S, D),
    mask (B or 1, 1, 1, S) boolean, True = may attend. Grouped heads share their kv head without
    a repeat: the query heads of a group sit on their own axis."""
    b, h, _, d = q.shape
    hkv, s = k.size(1), k.size(2)
    qg = q.float().view(b, hkv, h // hkv, 1, d)
    scores = (qg * k.float()[:, :, None]).sum(-1) / math.sqrt(d)  # (B, Hkv, rep, S)
    scores = scores.masked_fill(~mask.reshape(mask.size(0), 1, 1, s), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = (probs[..., None] * v.float()[:, :, None]).sum(-2)  # (B, Hkv, rep, D)
    return out.reshape(b, h, 1, d).to(q.dtype)


# -- the decode-specialised layers (each a subclass of the layer it replaces) ---------------


def _few_fp32_rows(layer: nn.Linear, x: Tensor) -> Tensor | None:
    """gpt.kernels' f32_linear for 2..F32_MAX_M fp32 rows (None where it does not apply)."""
    rows = x.numel() // x.shape[-1]
    if not (layer.f32_op and 2 <= rows <= kernels.F32_MAX_M and x.dtype == torch.float32):
        return None
    y = torch.ops.gpt_kernels.f32_linear(x.reshape(rows, x.shape[-1]), layer.weight)
    y = y.reshape(*x.shape[:-1], layer.out_features)
    return y if layer.bias is None else y + layer.bias


class MatvecLinear(nn.Linear):
    """nn.Linear whose one-row product is a reduction inside a compiled graph (and whose few
    fp32 rows go to gpt.kernels' f32 op, where `f32_op` is set)."""

    f32_op = False

    def forward(self, x: Tensor) -> Tensor:
        if not _one_compiled_row(x):
            y = _few_fp32_rows(self, x)
            return super().forward(x) if y is None else y
        y = matvec(x, self.weight)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class ColmajorLinear(nn.Linear):
    """nn.Linear over a column-major snapshot of the weight (same shape and values), sent to the
    BLAS; a few fp32 rows go to gpt.kernels' f32 op on the row-major weight, where `f32_op` is set."""

    f32_op = False

    def forward(self, x: Tensor) -> Tensor:
        y = _few_fp32_rows(self, x)
        return F.linear(x, self.colmajor_weight, self.bias) if y is None else y


class MatvecInt8Linear(Int8Linear):
    """Int8Linear whose one-row product is a reduction inside a compiled graph."""

    def forward(self, x: Tensor) -> Tensor:
        if not _one_compiled_row(x):
            return super().forward(x)
        y = matvec_int8(x, self.qweight, self.scales)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class DecodeSDPAttention(SDPAttention):
    """SDPA whose one-query-per-row case is a fused reduction inside a compiled graph."""

    def forward(self, q, k, v, q_pos, k_pos, key_padding_mask=None, return_weights=False, **kwargs):
        causal = kwargs.get("mode", "causal") == "causal"  # the fused reduction applies the causal mask
        if return_weights or q.size(-2) != 1 or not causal or not torch.compiler.is_compiling():
            return super().forward(q, k, v, q_pos, k_pos, key_padding_mask, return_weights, **kwargs)
        return decode_attention(q, k, v, causal_mask(q_pos, k_pos, key_padding_mask))


def _int8_group(layers: list[nn.Module]) -> bool:
    """Whether these layers can share one int8_linear_cat call (packed int8, no bias, same input)."""
    return all(
        type(m) is Int8Linear and m._packed is not None and m.bias is None and m.in_features == layers[0].in_features
        for m in layers
    )


def _int8_cat(layers: list[Int8Linear], x: Tensor) -> list[Tensor] | None:
    """The layers' products of x from one int8_linear_cat call (None where the op does not apply)."""
    k = layers[0].in_features
    if not all(takes_own_kernel(m._packed, m.scales, torch.float32, x, k, kernels.MAX_M) for m in layers):
        return None
    n = [m.out_features for m in layers]
    y = torch.ops.gpt_kernels.int8_linear_cat(
        x.reshape(-1, k), [m._packed for m in layers], [m.scales for m in layers], n, k
    )
    return [part.reshape(*x.shape[:-1], part.shape[-1]).to(x.dtype) for part in y.split(n, dim=-1)]


class FusedInt8Attention(SelfAttention):
    """SelfAttention whose int8 q, k and v projections of a few rows are one kernel call."""

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        y = _int8_cat([self.wq, self.wk, self.wv], x)
        return super().project(x) if y is None else tuple(y)


class FusedInt8FeedForward(FeedForward):
    """FeedForward whose int8 w1 and w3 products of a few rows are one kernel call."""

    def forward(self, x: Tensor) -> Tensor:
        y = _int8_cat([self.w1, self.w3], x)
        if y is None:
            return super().forward(x)
        return self.w2(F.silu(y[0]) * y[1])


class RegionBlock(Block):
    """A Block compiled once and reused for every layer (inside one compiled graph)."""

    forward = torch.compiler.nested_compile_region(Block.forward)


# -- the transform ----------------------------------------------------------------------------


def _shallow(module: nn.Module, cls: type[nn.Module] | None = None) -> nn.Module:
    """A new module object with its own child table, holding the same Parameters and buffers."""
    new = copy.copy(module)
    for key, value in vars(module).items():  # parameter, buffer, child and hook tables
        if key.startswith("_") and isinstance(value, dict):
            new.__dict__[key] = type(value)(value)
    new._modules = {}
    if cls is not None:
        new.__class__ = cls
    return new


def _is_wide_fp32(m: nn.Linear) -> bool:
    return m.weight.dtype == torch.float32 and m.out_features >= 16 * m.in_features


def _replacement_class(m: nn.Module, on: frozenset[str]) -> type[nn.Module] | None:
    # exact types only: a subclass (a user's layer, a tensor-subclass weight) keeps its own forward
    if type(m) is nn.Linear and type(m.weight.data) is torch.Tensor:
        if "colmajor_head" in on and _is_wide_fp32(m):
            return ColmajorLinear
        return MatvecLinear if "matvec" in on else None
    # an int8 layer with gpt.kernels' op keeps it: 1.3-4x faster than this reduction (docs/bench_kernels.md)
    if type(m) is Int8Linear and "matvec" in on and getattr(m, "_packed", None) is None:
        return MatvecInt8Linear
    if type(m) is SDPAttention and "decode_attention" in on:
        return DecodeSDPAttention
    if type(m) is SelfAttention and "fuse_int8" in on and _int8_group([m.wq, m.wk, m.wv]):
        return FusedInt8Attention
    if type(m) is FeedForward and "fuse_int8" in on and _int8_group([m.w1, m.w3]):
        return FusedInt8FeedForward
    if type(m) is Block and "regional" in on:
        return RegionBlock
    return None


def _transform(module: nn.Module, on: frozenset[str]) -> nn.Module:
    cls = _replacement_class(module, on)
    new = _shallow(module, cls)
    if cls is ColmajorLinear:
        new.register_buffer("colmajor_weight", module.weight.detach().t().contiguous().t(), persistent=False)
    if cls in (MatvecLinear, ColmajorLinear):
        w = module.weight
        new.f32_op = w.dtype == torch.float32 and w.device.type == "cpu" and w.is_contiguous() and kernels.available()
    for name, child in module._modules.items():
        new._modules[name] = None if child is None else _transform(child, on)
    return new


def apply_tricks(model: nn.Module, tricks: Iterable[str] | str | None = DEFAULT_TRICKS) -> nn.Module:
    """A copy of `model`'s module tree with the named tricks' layers swapped in.

    The copy shares every Parameter and buffer with `model` (tied weights stay tied; nothing is
    copied but the colmajor_head snapshot); `model` itself is left exactly as it was.
    """
    return _transform(model, parse_tricks(tricks))
