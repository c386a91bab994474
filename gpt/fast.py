"""Decode-speed tricks, each switchable; PERF-NOTES.md has the prediction and the measurement.

Decoding one token multiplies a single activation row by every weight matrix: a
matrix-vector product whose speed is how fast the weights stream from memory. torch's CPU
matmul kernels are built for matrices, not for one row: on this kind of machine they reach
~15 GB/s in fp32, ~6 GB/s in bf16 and ~7 GB/s with int8 weights (`_weight_int8pack_mm`).

"matvec": the product is written as an elementwise multiply and a sum over the input dimension;
under torch.compile, inductor turns that into a fused, vectorised C++ reduction per matrix that
reads each weight once and converts bf16 / int8 to fp32 in registers, so the weights stream at
close to the machine's read speed. (int4 keeps torch's packed kernel: the same idea with nibble
unpacking measured slower; see PERF-NOTES.md.) In eager mode the expression would materialise
the whole (N, K) product, so the trick acts only while compiling and only for a single row.

"decode_attention": one query against the static KV cache is a few thousand multiply-adds per
head, but F.scaled_dot_product_attention's CPU kernel costs ~0.2 ms per call in set-up, which is
~10 % of a stories110M step. Written as multiply + sum, softmax, multiply + sum, inductor fuses it
with the cache update around it.

"colmajor_head": the vocabulary projection of a small model is a very wide, shallow matrix
(32000 x 288 at stories15M, 62 % of the weight bytes). Row by row, each output is a short dot
product that ends in a horizontal sum; stored column-major instead, the BLAS computes the product
as a stream of axpys over the whole weight, which reads it ~1.3x faster here. The trick re-lays
out fp32 weights with out_features >= 16 x in_features in place (same shape and values, strides
(1, N); a tied embedding shares the new layout) and sends them to F.linear. bf16 stays row-major:
the BLAS's bf16 path is slower than the reduction. Checkpoint writers save contiguous copies.

"lean_guards": before every call, dynamo checks guards on the module tree the step closes over;
for torch's built-in layers (Linear, Embedding, ...) that is hundreds of checks, ~0.4 ms per
token at stories15M. Skipping the guards on built-in modules cuts that to ~0.2 ms. The price:
the compiled step assumes those layers are not swapped or re-typed after it was compiled
(Generator compiles after apply_tricks, and a new Generator compiles a new step).

"matvec" and "decode_attention" act only in a compiled graph, for one query row (batch-1
decoding), so prefill, batches and training are untouched ("colmajor_head" changes a layout,
which every kernel reads correctly). Apply the tricks from outside the model (it knows nothing
about speed tricks):

    apply_tricks(model, tricks)                                   # swaps / flags layers
    torch.compile(step, fullgraph=True, **compile_options(tricks))  # lean_guards
    (Generator(compile=True) does both, with DEFAULT_TRICKS unless told otherwise)
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

TRICKS = ("matvec", "decode_attention", "lean_guards", "colmajor_head")
DEFAULT_TRICKS = TRICKS


def parse_tricks(spec: str | Iterable[str] | None) -> frozenset[str]:
    """'matvec' / 'none' / 'all' / an iterable of names -> a set of trick names (one-line error if unknown)."""
    if spec is None:
        return frozenset(DEFAULT_TRICKS)
    if isinstance(spec, str):
        spec = [] if spec in ("", "none") else list(TRICKS) if spec == "all" else spec.split(",")
    names = frozenset(s.strip() for s in spec if s.strip())
    unknown = sorted(names - set(TRICKS))
    if unknown:
        raise ValueError(
            f"unknown speed trick(s) {', '.join(unknown)} (--tricks); choose from {', '.join(TRICKS)}, all or none"
        )
    return names


def takes_matvec(layer: nn.Module, x: Tensor) -> bool:
    """True when `layer` should use the reduction: switched on, one input row, and being compiled.

    Both conditions are static for a compiled graph (shapes are specialised), so this is no
    Python branching on tensor values.
    """
    on = getattr(layer, "matvec", False) and not getattr(layer, "colmajor", False)
    return on and x.numel() == x.shape[-1] and torch.compiler.is_compiling()


def _row(x: Tensor) -> Tensor:
    return x.reshape(-1).float()


def matvec(x: Tensor, weight: Tensor) -> Tensor:
    """x @ weightᵀ for one row x (..., K) and a float weight (N, K), accumulated in fp32."""
    y = (weight.float() * _row(x)).sum(-1)
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def matvec_int8(x: Tensor, qweight: Tensor, scales: Tensor) -> Tensor:
    """One row times int8 weights (N, K) with a scale per output channel."""
    y = (qweight.float() * _row(x)).sum(-1) * scales.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], qweight.shape[0])


def takes_decode_attention(layer: nn.Module, q: Tensor) -> bool:
    """True for an attention layer with the trick on, one query per row, inside a compiled graph."""
    return getattr(layer, "decode_attention", False) and q.size(-2) == 1 and torch.compiler.is_compiling()


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


def compile_options(tricks: Iterable[str] | str | None = DEFAULT_TRICKS) -> dict:
    """Extra torch.compile options for the named tricks."""
    if "lean_guards" in parse_tricks(tricks):
        return {"options": {"guard_filter_fn": torch.compiler.skip_guard_on_inbuilt_nn_modules_unsafe}}
    return {}


class MatvecLinear(nn.Linear):
    """nn.Linear that decodes a single row with `matvec` inside a compiled graph, unless its
    weight is column-major ("colmajor_head"), which goes to the BLAS.

    apply_tricks swaps an nn.Linear's class in place to this one (same parameters, so tied
    weights stay tied and nothing is copied), and back. Keeping our own class (not nn.Linear)
    also keeps dynamo's guards on its weight's layout under lean_guards.
    """

    matvec = True
    colmajor = False

    def forward(self, x: Tensor) -> Tensor:
        if takes_matvec(self, x):
            y = matvec(x, self.weight)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        return super().forward(x)


def is_wide_fp32(layer: nn.Linear) -> bool:
    """The layers "colmajor_head" re-lays out: fp32 and much wider than deep (a vocabulary projection)."""
    return layer.weight.dtype == torch.float32 and layer.out_features >= 16 * layer.in_features


def set_colmajor(weight: Tensor, colmajor: bool) -> None:
    """Re-lay out a 2-D weight in place, keeping its shape and values: column-major or back."""
    if weight.is_contiguous() == colmajor:  # not yet in the wanted layout
        weight.data = weight.data.t().contiguous().t() if colmajor else weight.data.contiguous()


def apply_tricks(model: nn.Module, tricks: Iterable[str] | str | None = DEFAULT_TRICKS) -> nn.Module:
    """Switch the named tricks on (and the others off) in `model`, in place."""
    on = parse_tricks(tricks)
    for m in model.modules():
        if type(m) in (nn.Linear, MatvecLinear) and type(m.weight.data) is torch.Tensor:
            # (weights that are tensor subclasses, e.g. torchao's quantised ones, keep their own matmul)
            colmajor = "colmajor_head" in on and is_wide_fp32(m)
            set_colmajor(m.weight, colmajor)
            m.__class__ = MatvecLinear if on & {"matvec", "colmajor_head"} else nn.Linear
            m.matvec, m.colmajor = "matvec" in on, colmajor  # (nn.Linear never reads them)
        elif hasattr(m, "matvec"):  # the quantised layers of gpt.quant
            m.matvec = "matvec" in on
        if hasattr(m, "decode_attention"):  # attention variants that offer the reduction path
            m.decode_attention = "decode_attention" in on
    return model
