"""Train a model on one device, or on many through accelerate (DDP).

python train_ddp.py                                   # the embedded default: shakespeare-char, char tokenizer
python train_ddp.py --preset tiny --max-steps 200 --out out/tiny
python train_ddp.py --config my_run.yaml --lr 1e-3    # flags override the config file
python train_ddp.py --resume                          # continue out/shakespeare-char exactly where it stopped
python train_ddp.py --preset tiny --attention my_attn.py:MyAttention   # your own variant, from a file

Two synchronised CPU ranks (gloo):
  ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
      --mixed_precision no --dynamo_backend no train_ddp.py ...
GPUs: accelerate launch --num_processes N train_ddp.py ...   (FSDP: --config_file scripts/accelerate/fsdp.yaml)
Fully sharded on either (torch's fully_shard, docs/distributed.md): the same launch lines with train_ddp.py --fsdp

Ctrl-C or SIGTERM stops between steps and saves a resumable state (exit 130); a second Ctrl-C aborts at once.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from gpt.cli import Parser, main_guard
from gpt.training import TrainConfig, add_train_arguments, config_from_args

PROG = "python train_ddp.py"


def build_parser() -> Parser:
    ap = Parser(
        prog=PROG,
        description=__doc__,
        epilog="Every setting can also come from --config (JSON or YAML, keys as the flag names); flags win. "
        "The model settings are the fields of gpt.config.ModelConfig (vocab_size comes from the tokenizer).",
    )
    add_train_arguments(ap)
    return ap


def parse_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """Defaults, then the --config file, then the flags."""
    return config_from_args(build_parser(), argv)[0]


def _is_rank0() -> bool:
    # every rank hits the same error; one line is enough
    return os.environ.get("RANK", "0") == "0"


def _main(argv: Sequence[str] | None) -> int:
    from gpt.training import train

    cfg = parse_config(argv)
    try:
        summary = train(cfg)
    except KeyboardInterrupt:
        # the second Ctrl-C: saves are atomic, so latest/ best/ state/ hold the last one that completed
        if _is_rank0():
            print(
                f"aborted by a second Ctrl-C; {cfg.out} keeps the last completed save (continue with: "
                f"{PROG} --resume, same flags)",
                file=sys.stderr,
            )
        return 130
    stopped = summary.get("stopped")
    if stopped != "finished":
        if _is_rank0():
            print(
                f"stopped by {stopped} at step {summary['step']}; resumable state saved in {cfg.out}/state, "
                f"continue with: {PROG} --resume (same flags)",
                file=sys.stderr,
            )
        return 130
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return main_guard(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
