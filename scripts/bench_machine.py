"""What the benchmark tables say about the machine they ran on (shared by the bench_*.py scripts)."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
from collections.abc import Sequence
from pathlib import Path

import torch

# the CPU features the decode kernels (ours, torch's, llama.cpp's) branch on
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "amx")


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform reports."""
    for line in _cpuinfo():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_flags() -> dict[str, bool | None]:
    """Which of CPU_FLAGS the CPU advertises (amx: any amx_* flag); None where /proc/cpuinfo is unreadable."""
    flags = next((set(line.split(":", 1)[1].split()) for line in _cpuinfo() if line.startswith("flags")), None)
    if flags is None:
        return dict.fromkeys(CPU_FLAGS)
    return {f: any(x.startswith("amx_") for x in flags) if f == "amx" else f in flags for f in CPU_FLAGS}


def git_commit() -> str | None:
    """The short commit of the checkout the scripts run from, '+dirty' with local changes; None outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=root, capture_output=True, text=True)
    except OSError:
        return None
    if rev.returncode != 0:
        return None
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def machine_line(threads: int) -> str:
    """One line: CPU model, cores, the CPU_FLAGS, torch, threads, date."""
    flags = ", ".join(f"{f} {'?' if v is None else 'yes' if v else 'no'}" for f, v in cpu_flags().items())
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"Machine: {cpu_model()}, {os.cpu_count()} cores ({flags}), torch {torch.__version__}, "
        f"{threads} thread(s), {date}."
    )


def command_line(script: str, argv: Sequence[str]) -> str:
    """The command that reproduces a run, as a markdown code span."""
    commit = git_commit()
    at = f" (commit {commit})" if commit else ""
    return f"`python {shlex.join([script, *argv])}`{at}"
