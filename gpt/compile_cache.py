"""What a later `torch.compile` run can skip: inductor's on-disk caches, and its vector-ISA probe.

A warm start (the same model compiled before on this machine) still pays for two things that
do not depend on the model: dynamo tracing, and inductor asking "can this compiler build and
load code for each vector ISA this CPU has?" (it compiles a tiny program per ISA once, but
starts a fresh Python to dlopen each one in every process: ~0.3 s each, 1-2 s per start).
The answer depends only on the CPU, the compiler and torch, so the first run that gets "yes,
all of them" writes it down, and later runs tell inductor to skip the probe. Any change of CPU
flags, compiler or torch gives another key and probes again.

Both caches live under $TORCHINDUCTOR_CACHE_DIR (inductor's) and ~/.cache/gpt (ours).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

import torch


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gpt"


def use_inductor_cache_dir() -> str:
    """Point inductor's on-disk cache at ~/.cache/gpt/inductor (under $XDG_CACHE_HOME) unless
    TORCHINDUCTOR_CACHE_DIR is set; before torch._inductor is imported (it reads it once)."""
    return os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))


def cpu_flags() -> str:
    """The CPU's feature flags (Linux: /proc/cpuinfo; elsewhere the platform's processor string)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    return next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), platform.machine())


def isa_key() -> str | None:
    """CPU flags + compiler + torch, or None where inductor does not probe (not x86-64 Linux)."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    try:
        from torch._inductor.cpp_builder import get_compiler_version_info, get_cpp_compiler

        compiler = get_cpp_compiler()
        text = f"{torch.__version__}|{compiler}|{get_compiler_version_info(compiler)}|{cpu_flags()}"
    except Exception:  # no compiler, no /proc: let inductor probe as usual
        return None
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _verdict_path(key: str) -> Path:
    return cache_root() / "inductor-isa" / f"{key}.json"


def enable_compile_caches() -> None:
    """Use inductor's on-disk caches (FX graph + autograd caches), so a later run skips codegen and
    the C++ compile (the directory follows TORCHINDUCTOR_CACHE_DIR), and skip the vector-ISA probe
    where an earlier run on this CPU, compiler and torch found every ISA usable."""
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    if hasattr(inductor_config, "autotune_local_cache"):
        inductor_config.autotune_local_cache = True
    key = isa_key()
    if key is not None and inductor_config.cpp.vec_isa_ok is None and _verdict_path(key).exists():
        inductor_config.cpp.vec_isa_ok = True


def remember_vec_isa_probe() -> bool:
    """After a compile: record that every vector ISA of this CPU passed inductor's probe (the probe
    results are cached in-process, so this costs nothing). True when the verdict was written."""
    import torch._inductor.config as inductor_config
    from torch._inductor.cpu_vec_isa import valid_vec_isa_list

    key = isa_key()
    if key is None or inductor_config.cpp.vec_isa_ok is not None:
        return False
    isas = valid_vec_isa_list()
    if not isas or not all(bool(isa) for isa in isas):
        return False  # some ISA failed: keep probing, so inductor keeps choosing a working one
    path = _verdict_path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"isas": [str(i) for i in isas], "torch": torch.__version__}) + "\n")
        os.replace(tmp, path)
    except OSError:  # a read-only home: the probe simply runs again next time
        return False
    return True


def probe_vec_isas() -> list[str]:
    """Run inductor's vector-ISA probe now and record its verdict (what `make install` does, so the
    first compile skips it: ~8 s with an empty inductor cache on a 2-core machine). Returns the
    usable ISAs ([] off x86-64 Linux or without a compiler)."""
    if isa_key() is None:
        return []
    enable_compile_caches()
    try:
        from torch._inductor.cpu_vec_isa import valid_vec_isa_list

        isas = [str(isa) for isa in valid_vec_isa_list()]
    except Exception:  # no compiler: inductor will say so itself when asked to compile
        return []
    remember_vec_isa_probe()
    return isas
