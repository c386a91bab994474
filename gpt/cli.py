"""Conventions shared by every command line (train_ddp.py, generate.py, quantize.py, scripts/).

- Errors are one line: a bad flag, a bad file or any library error (a GptError) prints
  `error: ...` naming the flag or file and what to do, and the command exits with 2.
- The same flags mean the same thing everywhere: --checkpoint (default DEFAULT_CHECKPOINT),
  --device auto|cpu|cuda|mps, --dtype fp32|bf16|fp16 ("as stored" unless a command says otherwise).
- A flag that does nothing in the combination given is refused in one line (CliError), not ignored.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

import torch

from gpt.errors import CliError, GptError

DEFAULT_RUN = "out/shakespeare-char"
DEFAULT_CHECKPOINT = f"{DEFAULT_RUN}/best"
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the usage block is one --help away."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise CliError(f"{message} (see {self.prog} --help)")


def add_checkpoint(ap: argparse.ArgumentParser, default: str | None = DEFAULT_CHECKPOINT, what: str = "") -> None:
    shown = f"default {default}" if default else "required"
    ap.add_argument(
        "--checkpoint", default=default, required=default is None, help=f"checkpoint directory{what} ({shown})"
    )


def add_device(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--device", default="auto", choices=DEVICES, help="auto = cuda, then mps, then cpu (default auto)")


def add_dtype(ap: argparse.ArgumentParser, default: str | None = None, help: str = "default: as stored") -> None:
    ap.add_argument("--dtype", default=default, choices=tuple(DTYPES), help=help)


def resolve_device(name: str) -> torch.device:
    """--device NAME -> a device that exists here (one-line error otherwise)."""
    mps = getattr(torch.backends, "mps", None)
    has_mps = bool(mps and mps.is_available())
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda: no CUDA device is available here; use --device cpu")
    if name == "mps" and not has_mps:
        raise CliError("--device mps: no Apple GPU is available here; use --device cpu")
    if name not in DEVICES:
        raise CliError(f"--device {name!r} is not one of {', '.join(DEVICES)}")
    return torch.device(name)


def resolve_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise CliError(f"--dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def refuse_unless(condition: bool, flag: str, needs: str) -> None:
    """A flag that does nothing without another one: refuse it instead of ignoring it."""
    if not condition:
        raise CliError(f"{flag} does nothing without {needs}; add {needs} or drop {flag}")


def _is_rank0() -> bool:
    # under a launcher every rank hits the same error; one line is enough
    return os.environ.get("RANK", "0") == "0"


def main_guard(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run a CLI's main; a GptError becomes `error: <one line>` on stderr and exit code 2."""
    try:
        return main(argv)
    except GptError as e:
        if _is_rank0():
            print(f"error: {e}", file=sys.stderr)
        return 2


def positive_int(text: str) -> int:
    """argparse type of a count flag: an integer >= 1 (argparse's error names the flag)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} must be >= 1")
    return n
