"""The decode step compiled ahead of time: an AOTInductor package built once, loaded in a later
process without dynamo or inductor.

    step = load_or_build(net, decode_fn, example_inputs, settings)   # a few ms when cached
    nxt, pos = step(tok, pos)                                        # same tokens as torch.compile

Why: a warm `torch.compile` start still imports dynamo and inductor (~1.5-6 s on these CPUs) and
traces the step with dynamo before inductor's cache is hit, every process. AOTInductor writes the
compiled step as a shared library with its own C++ wrapper; loading it is a dlopen (~0.1 s), and
calling it skips dynamo's guards and the Python wrapper.

The package holds code, not weights (`package_constants_in_so=False`): at load time the running
model's own parameters and buffers are handed to it by name (`user_managed`: the library reads
and writes those tensors in place, so the KV cache that the eager prefill fills is the one the
step reads, and no second copy of the weights exists). A package therefore fits every checkpoint
of the same shapes, and its key says exactly what it was built for: every constant's name, shape
and dtype, the module classes, the config, the sampling settings baked into the graph, the batch
and cache length, the thread count (inductor fixes it in the code), torch, the CPU's flags, the
C++ kernels' build, and the source of this package and of any plug-in module. A
change of any of them is a cache miss and a rebuild, never a stale library.

Packages live in $XDG_CACHE_HOME/gpt/aot (default ~/.cache/gpt/aot), one directory per key with a
`key.json` that says what it was built for; they are written atomically (a crash leaves no half
package), and one that fails to load is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gpt import kernels
from gpt.compile_cache import cache_root, cpu_flags, enable_compile_caches, remember_vec_isa_probe
from gpt.errors import GenerationError, first_line

PACKAGE = "decode.pt2"
# gpt.fast tricks that act only on torch.compile (dynamo's guards, its region tracing): left out of
# a package, whose code is built once per machine and has no guards
NOT_IN_PACKAGES = ("regional", "lean_guards")


def package_tricks(tricks: Sequence[str]) -> list[str]:
    """The tricks a package is built with: those of `tricks` that act on the step's code."""
    return [t for t in tricks if t not in NOT_IN_PACKAGES]


_GPT_ROOT = Path(__file__).resolve().parent
_MODEL_NAME = "model"


class AOTError(GenerationError):
    """The decode step could not be exported, built or loaded ahead of time."""


def default_dir() -> Path:
    return cache_root() / "aot"


class _Step(nn.Module):
    """The step function as a module, so that export sees the net's weights and caches as its
    own parameters and buffers (their names are the package's constant names)."""

    def __init__(self, net: nn.Module, fn: Callable) -> None:
        super().__init__()
        self.net = net
        self.fn = fn

    def forward(self, *args: Tensor | None):
        return self.fn(*args)


def _constants(module: nn.Module) -> dict[str, Tensor]:
    found = dict(module.named_parameters(remove_duplicate=False))
    found.update(module.named_buffers(remove_duplicate=False))
    return found


def _sources_digest(module: nn.Module) -> str:
    """This package's Python source and that of every module class outside it (plug-in variants)."""
    files = set(_GPT_ROOT.rglob("*.py"))
    for m in module.modules():
        f = getattr(sys.modules.get(type(m).__module__), "__file__", None)
        if f:
            files.add(Path(f).resolve())
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(str(f.relative_to(_GPT_ROOT) if f.is_relative_to(_GPT_ROOT) else f.name).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def describe(step: nn.Module, inputs: Sequence[Tensor | None], settings: dict[str, Any]) -> dict[str, Any]:
    """Everything a package is specialised to (see the module docstring); its hash is the key."""
    net = step.net
    return {
        "format": 1,
        "settings": settings,
        "inputs": [None if t is None else [list(t.shape), str(t.dtype)] for t in inputs],
        "constants": sorted([n, list(t.shape), str(t.dtype), str(t.device)] for n, t in _constants(step).items()),
        "modules": sorted({f"{type(m).__module__}.{type(m).__qualname__}" for m in net.modules()}),
        "config": getattr(getattr(net, "config", None), "to_dict", dict)(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": hashlib.sha256(cpu_flags().encode()).hexdigest()[:16],
        "kernels": f"{kernels.build_key()}:{kernels.cpu_path()}",
        "source": _sources_digest(net),
    }


def _key(description: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()[:20]


@dataclass
class AOTStep:
    """A loaded package bound to the module whose tensors it uses; call it like the decode function."""

    loader: Any  # torch._C._aoti.AOTIModelPackageLoader
    step: nn.Module
    path: Path
    built: bool  # True when this process built the package, False when it was loaded from disk
    seconds: float  # time to build or load it

    def bind(self) -> None:
        """Point the library at the module's current tensors (again after setup_caches made new ones)."""
        have = _constants(self.step)
        want = self.loader.get_constant_fqns()
        missing = [n for n in want if n not in have]
        if missing:
            raise AOTError(f"{self.path}: the package needs tensors the model lacks ({', '.join(missing[:3])})")
        # the library keeps these pointers: self.step holds the tensors, so they outlive it
        self.loader.load_constants({n: have[n] for n in want}, False, True, True)

    def __call__(self, *args: Tensor | None) -> tuple[Tensor, ...]:
        """The step's outputs as a tuple (a None input is a constant of the package: left out)."""
        return tuple(self.loader.boxed_run([t for t in args if t is not None]))


def _load(path: Path) -> Any:
    return torch._C._aoti.AOTIModelPackageLoader(str(path), _MODEL_NAME, False, 1, -1)


def _build(step: nn.Module, inputs: Sequence[Tensor | None], path: Path) -> None:
    import torch._inductor

    enable_compile_caches()  # skips inductor's vector-ISA probe where `make install` recorded it
    with torch.no_grad():
        exported = torch.export.export(step, tuple(inputs), strict=False)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.pt2")  # AOTInductor wants the .pt2 suffix
        try:
            torch._inductor.aoti_compile_and_package(
                exported,
                package_path=str(tmp),
                inductor_configs={"aot_inductor.package_constants_in_so": False},
            )
            os.replace(tmp, path)
            remember_vec_isa_probe()
        finally:
            tmp.unlink(missing_ok=True)


def load_or_build(
    net: nn.Module,
    fn: Callable,
    inputs: Sequence[Tensor | None],
    settings: dict[str, Any],
    directory: Path | None = None,
) -> AOTStep:
    """The step `fn(*inputs)` over `net` (tensors, or None for an input it does not take) as an
    AOTInductor package: loaded from `directory` (default_dir()) when one was built for exactly
    this, else exported, compiled and written there first. Raises AOTError (one line) when either
    fails. `settings` are whatever `fn` bakes into the graph (sampling constants, tricks, ...)."""
    t0 = time.perf_counter()
    given = [id(t) for t in inputs if t is not None]
    if len(set(given)) != len(given):  # export would make them one input, and the step would mix them up
        raise AOTError("an example input is given twice; pass separate tensors, one per input")
    step = _Step(net, fn)
    description = describe(step, inputs, settings)
    where = (directory or default_dir()) / _key(description)
    path = where / PACKAGE
    loader, built = None, False
    if path.exists():
        try:
            loader = _load(path)
        except Exception as e:  # a package from a crashed or foreign build: build it again
            print(f"aot: {path} did not load ({_first_line(e)}); building it again", file=sys.stderr)
    if loader is None:
        try:
            where.mkdir(parents=True, exist_ok=True)
            tmp = where / f".key.{os.getpid()}.json"
            tmp.write_text(json.dumps(description, indent=1, sort_keys=True, default=str) + "\n")
            os.replace(tmp, where / "key.json")
        except OSError as e:
            raise AOTError(f"{where}: cannot write the package there ({_first_line(e)})") from None
        try:
            _build(step, inputs, path)
            loader = _load(path)
        except Exception as e:  # an op export cannot trace, no compiler, ...: the caller falls back
            raise AOTError(f"the decode step could not be compiled ahead of time ({_first_line(e)})") from None
        built = True
    out = AOTStep(loader, step, path, built, 0.0)
    out.bind()
    out.seconds = time.perf_counter() - t0
    return out


def _first_line(e: BaseException) -> str:
    text = first_line(e)
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


def warm_caches(directory: Path | None = None) -> float:
    """What every first build on this machine would pay, paid now (`make install` runs `python -m
    gpt.aot`): inductor's vector-ISA probe (its verdict recorded) and the precompiled C++ headers
    (kept in inductor's cache, keyed by the compiler flags, so any model's build reuses them),
    by building the package of a one-layer stand-in model. Returns the seconds taken."""
    import tempfile

    from gpt.compile_cache import probe_vec_isas
    from gpt.config import ModelConfig
    from gpt.model import Transformer

    t0 = time.perf_counter()
    probe_vec_isas()
    model = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, max_seq_len=16)).eval()
    model.setup_caches(1, 16)

    def step(tok: Tensor, input_pos: Tensor, kpm: Tensor | None, offset: Tensor | None):
        return model(tok, input_pos)[:, -1].argmax(-1)

    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        load_or_build(model, step, [torch.zeros(1, 1, dtype=torch.long), torch.tensor([0]), None, None], {}, Path(tmp))
    return time.perf_counter() - t0


if __name__ == "__main__":  # `python -m gpt.aot`, run by `make install`
    from gpt.compile_cache import use_inductor_cache_dir

    use_inductor_cache_dir()  # the directory generate.py uses
    try:
        seconds = warm_caches()
    except AOTError as e:  # never fail an install over a start-up speed-up: --compile falls back by itself
        print(f"gpt.aot: {e}; `generate.py --compile` will torch.compile the step instead")
    else:
        print(f"gpt.aot: the compiler's caches warmed for ahead-of-time packages in {seconds:.1f} s")
