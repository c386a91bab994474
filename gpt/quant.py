"""Weight-only int8 and int4 quantisation of the linear layers.

Decoding one token reads every weight once, so batch-1 decoding is bound by memory
bandwidth: fewer bytes per weight is more tokens per second. Activations stay in floating
point; only the stored weights shrink.

int8  per-output-channel symmetric: W ≈ q · s[n],  q in [-127, 127]  (1 byte + 4/K bytes per weight)
int4  per group of `group_size` input channels, asymmetric: W ≈ q · s + min,  q in [0, 15],
      packed two per byte (½ byte + 8/group_size bytes per weight)

What is quantised: every plain nn.Linear of the model (the attention and feed-forward
projections) and, unless `quantize_head=False`, the lm head (`output`). The token embedding
stays in floating point: decoding reads one row of it per token, so shrinking it would save
file size but no time. In a tied model a quantised head is its own (quantised) copy of the
embedding.

The checkpoint stores a device-independent layout (the buffers `qweight`, `scales`,
`scales_and_zeros`). On the CPU the layers use torch's packed kernels
(`aten._weight_int8pack_mm`, `aten._weight_int4pack_mm_for_cpu`), which want bfloat16
activations, so the layers cast their input to bf16 and their output back. Elsewhere, or when
a shape does not suit a kernel, they dequantise with plain tensor ops (the fallback).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpt import kernels
from gpt.errors import QuantError  # noqa: F401  (re-exported: gpt.quant.QuantError)

MODES = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)  # the group sizes torch's int4 CPU kernel accepts
WEIGHTS_FILES = {"int8": "model_int8.safetensors", "int4": "model_int4.safetensors"}
KERNEL_DTYPE = torch.bfloat16  # the activation dtype the packed CPU kernels are fast with
_INT8_K_MULTIPLE = 16  # _weight_int8pack_mm gives wrong results or crashes for other K (torch 2.13)
_INT4_N_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu requires N % 16 == 0


def _has_op(name: str) -> bool:
    return hasattr(torch.ops.aten, name)


# gpt.kernels' int8-activation C++ ops serve rows up to kernels.MAX_M / INT4_MAX_M (decoding, small batches);
# larger inputs keep torch's kernels, where the weights are reused across rows anyway.
_OWN_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def _own_kernels_for(t: Tensor) -> bool:
    """Whether a layer whose weights are `t` gets gpt.kernels' packed copy (CPU, ops built)."""
    return t.device.type == "cpu" and kernels.available()


def takes_own_kernel(
    packed: Tensor | None, scales: Tensor | None, scales_dtype: torch.dtype, x: Tensor, in_features: int, max_rows: int
) -> bool:
    """Whether a quantised layer's input x goes to its gpt.kernels op (also used by gpt.fast's fused calls)."""
    # the scales dtype check: a module-wide .to(dtype) casts the derived scales too, which the op refuses
    return (
        packed is not None
        and scales is not None
        and scales.dtype == scales_dtype
        and x.device.type == "cpu"
        and x.dtype in _OWN_KERNEL_DTYPES
        and x.numel() <= max_rows * in_features
    )


# -- int8 -----------------------------------------------------------------------------------


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """(N, K) float -> int8 (N, K) and fp32 scales (N,), symmetric per output channel."""
    w = w.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: Tensor, scales: Tensor) -> Tensor:
    return q.float() * scales.float()[:, None]


class _QuantLinear(nn.Module):
    """The int8 and int4 layers keep derived kernel buffers (never saved): rebuilt by `refresh`
    after quantising and after every state-dict load."""

    def refresh(self) -> None:
        raise NotImplementedError

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        # A checkpoint loaded by assignment hands over tensors inside the safetensors file's mapping,
        # which are only 8-byte aligned; torch's packed CPU kernels crash on those (a segfault in
        # _weight_int8pack_mm), so the stored buffers get memory of their own.
        for name, buf in self._buffers.items():
            if buf is not None and buf.data_ptr() % 64:
                self._buffers[name] = buf.clone()
        self.refresh()


class Int8Linear(_QuantLinear):
    """y = (x @ qᵀ) · s: int8 weights (N, K), one fp32 scale per output channel."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None
        # the kernel wants its scales in the activation dtype; derived, so never saved
        self.register_buffer("_kernel_scales", None, persistent=False)
        self.register_buffer("_packed", None, persistent=False)  # gpt.kernels' layout, for small M
        self.use_kernel = _has_op("_weight_int8pack_mm") and in_features % _INT8_K_MULTIPLE == 0
        self.refresh()

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.device)
        q, s = quantize_int8(linear.weight)
        m.qweight.copy_(q)
        m.scales.copy_(s)
        if linear.bias is not None:
            m.bias.data = linear.bias.detach().clone()
        m.refresh()
        return m

    def refresh(self) -> None:
        """Rebuild the derived kernel buffers from the stored ones (after a load)."""
        if self.use_kernel:
            self._kernel_scales = self.scales.to(KERNEL_DTYPE)
        self._packed = kernels.int8_pack(self.qweight) if _own_kernels_for(self.qweight) else None

    def forward(self, x: Tensor) -> Tensor:
        if takes_own_kernel(self._packed, self.scales, torch.float32, x, self.in_features, kernels.MAX_M):
            flat = x.reshape(-1, self.in_features)
            y = torch.ops.gpt_kernels.int8_linear(flat, self._packed, self.scales, self.out_features, self.in_features)
            y = y.reshape(*x.shape[:-1], self.out_features)
        elif self.use_kernel and x.device.type == "cpu":
            flat = x.reshape(-1, self.in_features).to(KERNEL_DTYPE)
            y = torch.ops.aten._weight_int8pack_mm(flat, self.qweight, self._kernel_scales)
            y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        else:
            y = F.linear(x, self.qweight.to(x.dtype)) * self.scales.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        kernel = "_weight_int8pack_mm" if self.use_kernel else "dequantize"
        if self._packed is not None:
            kernel = f"gpt_kernels.int8_linear ({kernels.cpu_path()}, M<={kernels.MAX_M}), else {kernel}"
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={kernel}"


# -- int4 -----------------------------------------------------------------------------------


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def pack_int4(q: Tensor) -> Tensor:
    """(N, K) integers in [0, 15], K even -> uint8 (N, K/2): column 2j in the low nibble, 2j+1 in the high."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """Inverse of pack_int4: uint8 (N, K/2) -> uint8 (N, K)."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.size(0), -1)


def quantize_int4(w: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """(N, K) float -> packed uint8 (N, Kp/2) and fp32 scales_and_zeros (Kp/group_size, N, 2).

    K is zero-padded up to Kp, a multiple of group_size (the padded columns meet zero
    activations, so their values never matter). Per group: scale = (max - min) / 15 and
    q = round((w - min) / scale), so min and max are exact. The zero point is stored the way
    torch's int4 kernels read it, W ≈ (q - 8) · scale + zero, i.e. zero = min + 8 · scale.
    """
    w = w.detach().float()
    n, k = w.shape
    kp = _round_up(k, group_size)
    w = F.pad(w, (0, kp - k))
    groups = w.reshape(n, kp // group_size, group_size)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((hi - lo) / 15.0).clamp(min=1e-12)
    q = torch.round((groups - lo[..., None]) / scale[..., None]).clamp(0, 15)
    zero = lo + 8.0 * scale
    scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()  # (Kp/g, N, 2)
    return pack_int4(q.reshape(n, kp)), scales_and_zeros


def dequantize_int4(packed: Tensor, scales_and_zeros: Tensor, group_size: int) -> Tensor:
    """(N, Kp) float32 from the stored int4 layout."""
    q = unpack_int4(packed).float()
    n, kp = q.shape
    scale, zero = scales_and_zeros.float().transpose(0, 1).unbind(-1)  # (N, Kp/g) each
    groups = (q.reshape(n, kp // group_size, group_size) - 8.0) * scale[..., None] + zero[..., None]
    return groups.reshape(n, kp)


class Int4Linear(_QuantLinear):
    """Groupwise int4 weights, two per byte, with a scale and zero point per group of input channels.

    Stored: `qweight` uint8 (N, Kp/2) and `scales_and_zeros` fp32 (Kp/g, N, 2), Kp = K rounded up to
    the group size. On the CPU the layer also keeps torch's own packed copy (derived, not saved),
    with N padded to a multiple of 16 as that kernel requires; outputs are sliced back to N.
    """

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool = False, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.padded_in = _round_up(in_features, group_size)
        self.register_buffer(
            "qweight", torch.zeros(out_features, self.padded_in // 2, dtype=torch.uint8, device=device)
        )
        self.register_buffer(
            "scales_and_zeros",
            torch.zeros(self.padded_in // group_size, out_features, 2, dtype=torch.float32, device=device),
        )
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None
        self.register_buffer("_kernel_weight", None, persistent=False)
        self.register_buffer("_kernel_sz", None, persistent=False)
        self.register_buffer("_packed", None, persistent=False)  # gpt.kernels' layout, for small M
        self.register_buffer("_packed_scales", None, persistent=False)
        self.use_kernel = _has_op("_weight_int4pack_mm_for_cpu") and group_size in INT4_GROUP_SIZES
        self.refresh()

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int) -> Int4Linear:
        m = cls(linear.in_features, linear.out_features, group_size, linear.bias is not None, linear.weight.device)
        q, sz = quantize_int4(linear.weight, group_size)
        m.qweight.copy_(q)
        m.scales_and_zeros.copy_(sz)
        if linear.bias is not None:
            m.bias.data = linear.bias.detach().clone()
        m.refresh()
        return m

    def refresh(self) -> None:
        """Repack the stored weights into the CPU kernels' layouts (after quantising or loading)."""
        self._packed = self._packed_scales = None
        if _own_kernels_for(self.qweight):
            self._packed, self._packed_scales = kernels.int4_pack(self.qweight, self.scales_and_zeros, self.group_size)
        if not self.use_kernel or self.qweight.device.type != "cpu":
            return
        n_pad = _round_up(self.out_features, _INT4_N_MULTIPLE) - self.out_features
        q = F.pad(unpack_int4(self.qweight).to(torch.int32), (0, 0, 0, n_pad))
        self._kernel_weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        self._kernel_sz = F.pad(self.scales_and_zeros, (0, 0, 0, n_pad)).to(KERNEL_DTYPE).contiguous()

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features)
        if takes_own_kernel(self._packed, self._packed_scales, torch.float16, x, self.in_features, kernels.INT4_MAX_M):
            y = torch.ops.gpt_kernels.int4_linear(
                flat, self._packed, self._packed_scales, self.out_features, self.in_features, self.group_size
            )
            y = y.reshape(*lead, self.out_features)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        if self.padded_in != self.in_features:
            flat = F.pad(flat, (0, self.padded_in - self.in_features))
        if self._kernel_weight is not None and x.device.type == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                flat.to(KERNEL_DTYPE), self._kernel_weight, self.group_size, self._kernel_sz
            )
            y = y[:, : self.out_features].to(x.dtype)
        else:
            w = dequantize_int4(self.qweight, self.scales_and_zeros, self.group_size).to(x.dtype)
            y = F.linear(flat, w)
        y = y.reshape(*lead, self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        kernel = "_weight_int4pack_mm_for_cpu" if self.use_kernel else "dequantize"
        if self._packed is not None:
            kernel = f"gpt_kernels.int4_linear ({kernels.cpu_path()}, M<={kernels.INT4_MAX_M}), else {kernel}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"group_size={self.group_size}, kernel={kernel}"
        )


QUANT_LAYERS = (Int8Linear, Int4Linear)


# -- model transforms -----------------------------------------------------------------------


def check_mode(mode: str, group_size: int | None) -> None:
    if mode not in MODES:
        raise QuantError(f"unknown quantization mode {mode!r}; use one of {', '.join(MODES)}")
    if mode == "int4" and group_size not in INT4_GROUP_SIZES:
        raise QuantError(
            f"group size {group_size} is not supported for int4; use one of {', '.join(map(str, INT4_GROUP_SIZES))}"
        )


def linear_names(model: nn.Module, quantize_head: bool = True) -> list[str]:
    """Names of the plain nn.Linear modules to quantise (subclasses may use .weight directly: left alone)."""
    names = [name for name, m in model.named_modules() if type(m) is nn.Linear]
    return [n for n in names if quantize_head or n != "output"]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_model(
    model: nn.Module, mode: str, group_size: int | None = 32, quantize_head: bool = True
) -> dict[str, Any]:
    """Replace the model's linear layers by quantised ones, in place.

    Returns the "quantization" block for config.json (mode, group size, the layers, the
    weights file), which `prepare_for_load` reads back.
    """
    group_size = group_size if mode == "int4" else None
    check_mode(mode, group_size)
    if any(isinstance(m, QUANT_LAYERS) for m in model.modules()):
        raise QuantError("the model is already quantized; quantize the unquantized checkpoint instead")
    names = linear_names(model, quantize_head)
    with torch.no_grad():
        for name in names:
            linear = model.get_submodule(name)
            q = Int8Linear.from_linear(linear) if mode == "int8" else Int4Linear.from_linear(linear, group_size)
            _set_module(model, name, q)
    return {
        "mode": mode,
        "group_size": group_size,
        "layers": names,
        "lm_head": "output" in names,
        "embedding": "float",
        "weights_file": WEIGHTS_FILES[mode],
    }


def prepare_for_load(model: nn.Module, quant_block: dict[str, Any]) -> nn.Module:
    """Swap in empty quantised layers named by a config.json "quantization" block, so the stored
    state dict loads into it with matching names and shapes."""
    mode, group_size = quant_block.get("mode"), quant_block.get("group_size")
    check_mode(mode, group_size)
    for name in quant_block.get("layers", []):
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise QuantError(f"quantized layer {name!r} is not in this model; config.json is inconsistent") from None
        if type(linear) is not nn.Linear:
            raise QuantError(f"quantized layer {name!r} is not a linear layer; config.json is inconsistent")
        args = (linear.in_features, linear.out_features)
        has_bias = linear.bias is not None
        q = Int8Linear(*args, bias=has_bias) if mode == "int8" else Int4Linear(*args, group_size, bias=has_bias)
        _set_module(model, name, q)
    return model


def cast_float_params(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the floating-point parameters and buffers to `dtype`, leaving quantised layers as stored
    (their scales stay fp32; the kernels get their own bf16 copies)."""
    for module in model.modules():
        if isinstance(module, QUANT_LAYERS):
            continue
        for p in module._parameters.values():
            if p is not None and p.is_floating_point():
                p.data = p.data.to(dtype)
        for name, b in module._buffers.items():
            if b is not None and b.is_floating_point():
                module._buffers[name] = b.to(dtype)
    return model
