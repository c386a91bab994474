"""C++ CPU kernels for the int8 and int4 quantised linear layers (int8-quantised activations), and
for fp32 linears at a few rows (the server's batched decode step).

    from gpt import kernels
    if kernels.available():
        packed = kernels.int8_pack(qweight)                        # once, after loading
        y = kernels.int8_linear(x, packed, scales, n, k)           # x (M, K) fp32 / bf16, M small
        y = kernels.f32_linear(x, weight)                          # fp32 x (M, K), weight (N, K)

The ops are registered in C++ (TORCH_LIBRARY, namespace `gpt_kernels`) with fake kernels
registered here, so a `torch.compile(fullgraph=True)` graph calls them without a graph break
and without a Python wrapper (a torch.library.custom_op wrapper costs 20-25 µs per call, the
C++ op ~5 µs). The code path is chosen at run time from the CPU's features (see kernels.cpp):
`cpu_path()` says which one runs; GPT_KERNELS_PATH=scalar|avx2 lowers it, GPT_KERNELS=0 turns
the kernels off (available() is then False and the layers use their fallback).

Build: a JIT build (torch.utils.cpp_extension) at first use, cached on disk in
$GPT_KERNELS_CACHE or ~/.cache/gpt/kernels/<hash of the source, the flags, torch and python>.
Why not a setuptools CppExtension at `pip install -e .`: that would make torch a build-time
dependency, which pip's build isolation installs a second time into a throw-away environment
(a multi-GB download, and possibly a different torch than the one the extension then runs
against); and a machine without a compiler could not install the package at all. The JIT build
compiles against the torch that is actually imported, and if it fails (no compiler, not x86)
the package still works: available() is False, one warning line says why, and the layers keep
torch's own kernels. `make install` warms the cache (`python -m gpt.kernels`), so the first
model load does not pay the ~45 s compile. Two processes building at once serialise on a file
lock (fcntl, released by the OS even if the holder dies) and the second one reuses the result.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import sysconfig
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

from gpt.errors import GptError, first_line

PATHS = ("scalar", "avx2", "avx512_vnni")  # index = the ops' `path` argument
# The layers use an op up to this many activation rows and torch's packed kernels beyond (measured
# in docs/bench_kernels.md, 1 thread): int8 is 1.6-1.8x faster than _weight_int8pack_mm at M=1 and
# still ahead at M=8; int4 is level with _weight_int4pack_mm_for_cpu at M=1 (0.8-1.15x by shape)
# but behind from M=2-3 on (its per-row cost is ~1.5-2x torch's), so the int4 layers use it for one row.
MAX_M = 16
INT4_MAX_M = 1
# fp32 weights: gpt.fast's decode layers send 2..F32_MAX_M rows to f32_linear (one row keeps its fused
# reduction; from ~16 rows torch's BLAS is level again: docs/bench_kernels.md)
F32_MAX_M = 16
_SOURCE = Path(__file__).with_name("kernels.cpp")
# -ffp-contract=off: the shared activation quantisation must round identically on every path
_CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"]
_LDFLAGS = ["-fopenmp"]  # at::parallel_for's OpenMP region; resolves to torch's own libgomp at load time

_lock = threading.Lock()
_state: dict[str, object] = {}  # "ok": bool, "error": str


def build_key() -> str:
    """A hash of what the built library depends on: the source, the flags, torch and python."""
    h = hashlib.sha256(_SOURCE.read_bytes())
    h.update(" ".join(_CFLAGS + _LDFLAGS).encode())
    h.update(f"{torch.__version__} {sys.version_info[:2]} {sysconfig.get_platform()}".encode())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    """Where the built extension lives (one subdirectory per source/torch/python hash)."""
    root = os.environ.get("GPT_KERNELS_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gpt" / "kernels"


def _build_and_load() -> None:
    import fcntl

    from torch.utils import cpp_extension

    key = build_key()
    name = f"gpt_kernels_{key}"
    build = cache_dir() / key
    build.mkdir(parents=True, exist_ok=True)
    lib = build / f"{name}.so"
    if not lib.exists():
        with open(build / "build.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building: wait, then reuse its .so
            if not lib.exists():
                _compile(cpp_extension, name, build)
                return  # load() has loaded the library
    torch.ops.load_library(str(lib))


def _compile(cpp_extension, name: str, build: Path) -> None:
    """Compile and load; on failure keep the compiler's output in build/build.log and say so in one line."""
    try:
        cpp_extension.load(
            name=name,
            sources=[str(_SOURCE)],
            extra_cflags=_CFLAGS,
            extra_ldflags=_LDFLAGS,
            build_directory=str(build),
            is_python_module=False,
            verbose=False,
        )
    except Exception as e:
        log = build / "build.log"
        log.write_text(f"{type(e).__name__}: {e}\n")
        raise RuntimeError(f"compiling {_SOURCE.name} failed, compiler output in {log}") from e


def _register_fakes() -> None:
    """Shapes for FakeTensor tracing, so torch.compile(fullgraph=True) can trace through the ops."""

    @torch.library.register_fake("gpt_kernels::int8_linear")
    def _(x, packed, scales, n, k, path=-1):
        return x.new_empty((x.shape[0], n))

    @torch.library.register_fake("gpt_kernels::int4_linear")
    def _(x, packed, scales, n, k, group_size, path=-1):
        return x.new_empty((x.shape[0], n))

    @torch.library.register_fake("gpt_kernels::f32_linear")
    def _(x, weight, path=-1):
        return x.new_empty((x.shape[0], weight.shape[0]))

    @torch.library.register_fake("gpt_kernels::int8_linear_cat")
    def _(x, packed, scales, n, k, path=-1):
        return x.new_empty((x.shape[0], sum(n)), dtype=torch.float32)

    @torch.library.register_fake("gpt_kernels::int8_pack")
    def _(qweight):
        n, k = qweight.shape
        return qweight.new_empty(((n + 3) // 4 * ((k + 31) // 32) * 128,))

    @torch.library.register_fake("gpt_kernels::int4_pack")
    def _(qweight, scales_and_zeros, group_size):
        n, kp = qweight.shape[0], qweight.shape[1] * 2
        ng, npair = (n + 3) // 4, (kp + 63) // 64
        ngrp = (npair * 64 + group_size - 1) // group_size
        return qweight.new_empty((ng * npair * 128,)), scales_and_zeros.new_empty((ng * ngrp * 8,), dtype=torch.float16)


def _reason_unsupported() -> str | None:
    if os.environ.get("GPT_KERNELS", "1").lower() in ("0", "off", "false", "no"):
        return "disabled by GPT_KERNELS=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"no vector path for {platform.machine()} (x86-64 only)"
    if not hasattr(os, "fork") or sys.platform == "win32":
        return "the JIT build supports Linux/macOS only"
    return None


def available() -> bool:
    """True when the ops are built and loaded (builds them on the first call; never raises)."""
    if "ok" in _state:
        return bool(_state["ok"])
    with _lock:
        if "ok" not in _state:
            reason = _reason_unsupported()
            if reason is None:
                try:
                    _build_and_load()
                    _register_fakes()
                except Exception as e:  # any failure means "use the fallback", never an error
                    reason = f"build failed ({(first_line(e) or type(e).__name__)[:200]})"
            _state["ok"] = reason is None
            _state["error"] = reason
            if reason is not None and not reason.startswith("disabled"):
                warnings.warn(f"gpt.kernels: C++ kernels unavailable, {reason}; using the fallback", stacklevel=2)
    return bool(_state["ok"])


def unavailable_reason() -> str | None:
    """Why available() is False (None when it is True)."""
    available()
    return _state.get("error")  # type: ignore[return-value]


def cpu_path() -> str:
    """The code path the ops run by default: "avx512_vnni" | "avx2" | "scalar" ("none" if unavailable)."""
    if not available():
        return "none"
    return PATHS[torch.ops.gpt_kernels.cpu_path()]


def supported_paths() -> list[str]:
    """Every code path this CPU can run (each can be forced with the `path` argument)."""
    if not available():
        return []
    return list(PATHS[: torch.ops.gpt_kernels.best_path() + 1])


class KernelError(GptError, RuntimeError):
    """A kernel op was called while the kernels are unavailable, or with a code path this CPU lacks."""


def _path_index(path: str | None) -> int:
    if not available():
        raise KernelError(f"gpt.kernels is unavailable ({unavailable_reason()}); check kernels.available() first")
    if path is None:
        return -1
    if path not in supported_paths():
        raise KernelError(f"code path {path!r} is not supported here; use one of {', '.join(supported_paths())}")
    return PATHS.index(path)


def int8_pack(qweight: Tensor) -> Tensor:
    """int8 (N, K) weights -> the kernels' flat packed layout (K padded to 32, N to 4)."""
    _path_index(None)
    return torch.ops.gpt_kernels.int8_pack(qweight)


def int8_linear(x: Tensor, packed: Tensor, scales: Tensor, n: int, k: int, path: str | None = None) -> Tensor:
    """(x @ qᵀ) · scales for x (M, K) fp32/bf16 -> (M, N) in x's dtype; `path` forces a code path."""
    return torch.ops.gpt_kernels.int8_linear(x, packed, scales, n, k, _path_index(path))


def int8_linear_cat(
    x: Tensor, packed: list[Tensor], scales: list[Tensor], n: list[int], k: int, path: str | None = None
) -> Tensor:
    """int8_linear for several weights that multiply the same x, in one call: fp32 (M, sum(n)),
    the products side by side (one activation quantisation, one parallel loop over all rows)."""
    index = _path_index(path)
    return torch.ops.gpt_kernels.int8_linear_cat(x, packed, scales, n, k, index)


def int4_pack(qweight: Tensor, scales_and_zeros: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """gpt.quant's stored int4 layout -> (packed nibbles, packed fp16 scales and zero points)."""
    _path_index(None)
    return torch.ops.gpt_kernels.int4_pack(qweight, scales_and_zeros, group_size)


def int4_linear(
    x: Tensor, packed: Tensor, scales: Tensor, n: int, k: int, group_size: int, path: str | None = None
) -> Tensor:
    """x @ dequantised(W)ᵀ for x (M, K) fp32/bf16 -> (M, N) in x's dtype; `path` forces a code path."""
    return torch.ops.gpt_kernels.int4_linear(x, packed, scales, n, k, group_size, _path_index(path))


def f32_linear(x: Tensor, weight: Tensor, path: str | None = None) -> Tensor:
    """x @ weightᵀ for fp32 x (M, K) and fp32 weight (N, K) in its own layout; `path` forces a code path."""
    index = _path_index(path)  # loads the ops on first use
    return torch.ops.gpt_kernels.f32_linear(x, weight, index)


def quantize_activation(x: Tensor) -> tuple[Tensor, Tensor]:
    """The ops' activation quantisation on its own: int8 (M, KB·32) and fp32 block scales (M, KB)."""
    _path_index(None)
    return torch.ops.gpt_kernels.quantize_activation(x)
