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
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpt.checkpoint import CheckpointError  # noqa: E402
from gpt.config import ConfigError  # noqa: E402
from gpt.data import DataError  # noqa: E402
from gpt.tokenizer import TokenizerError  # noqa: E402
from gpt.training import TrainConfig, TrainError, flag  # noqa: E402

HELP = {
    "preset": "model shape from gpt/config.py PRESETS",
    "dim": "model width (default: the preset's)",
    "n_layers": "number of blocks (default: the preset's)",
    "n_heads": "query heads (default: the preset's)",
    "n_kv_heads": "key/value heads: n_heads = MHA, 1 = MQA (default: the preset's)",
    "head_dim": "per-head width (default: dim / n_heads)",
    "intermediate_size": "SwiGLU width (default: LLaMA's rule)",
    "max_seq_len": "the model's context length (default: the preset's)",
    "dropout": "dropout probability (default: the preset's)",
    "tie_embeddings": "share the embedding and output matrices (true/false) (default: the preset's)",
    "pos_encoding": "rope | sinusoidal | learned | none (default: the preset's)",
    "rope_base": "RoPE theta (default: the preset's)",
    "norm_eps": "RMSNorm epsilon (default: the preset's)",
    "attention": "attention variant: a registered name (gpt.attention.available()), or a plug-in "
    "path/to/file.py:NAME or package.module:NAME (default: the preset's)",
    "attention_kwargs": "JSON object of keyword arguments for the attention variant (default: the preset's)",
    "data": "'shakespeare' (built in) or the path of a text file",
    "tokenizer": "char | sp:VOCAB (train a sentencepiece BPE) | path to a tokenizer",
    "data_dir": "where the tokenized data lives, prepared on demand (default: data/<corpus>-<tokenizer>)",
    "batch_size": "sequences per device per micro-batch",
    "grad_accum": "micro-batches per optimizer step",
    "block_size": "tokens per training sequence",
    "lr": "peak learning rate",
    "min_lr": "learning rate at the end of the cosine decay",
    "warmup_steps": "linear warmup steps",
    "decay_steps": "length of the cosine decay (default: --max-steps)",
    "max_steps": "optimizer steps",
    "max_tokens": "train this many tokens instead (default: none; overrides --max-steps)",
    "weight_decay": "AdamW weight decay (matrices only, not norms or biases)",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "grad_clip": "clip the gradient norm to this (0 = off)",
    "eval_interval": "evaluate, log a metrics row and save checkpoints every N steps",
    "eval_iters": "batches per split per rank in each evaluation",
    "save_interval": "save the resumable state every N steps (0 = at every eval)",
    "log_interval": "update the progress bar's loss and tokens/s every N steps",
    "out": "run directory: latest/ best/ state/ metrics.jsonl loss.png run.json",
    "resume": "continue from <out>/state exactly (same settings and number of processes)",
    "mixed_precision": "no | bf16 | fp16 (through accelerate; fp16 needs a GPU)",
    "compile": "torch.compile the model for training",
    "seed": "random seed (weights and batches)",
    "cpu": "train on the CPU even when a GPU is present",
    "threads": "torch threads per process (default: cores / processes on this machine)",
    "peak_tflops": "peak TFLOP/s for MFU (default: the matmul rate measured at start)",
    "progress": "show the progress bar (--no-progress to hide it)",
}


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        # one line, not the usage block: the usage is one --help away
        self.exit(2, f"error: {message} (see python train_ddp.py --help)\n")


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON ({e.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object")
    return value


def _field_type(f: dataclasses.Field) -> Any:
    """The concrete type of a TrainConfig field (from `int | None` etc.)."""
    hints = typing.get_type_hints(TrainConfig)
    t = hints[f.name]
    args = [a for a in typing.get_args(t) if a is not type(None)]
    return args[0] if args else t


def build_parser() -> Parser:
    ap = Parser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every setting can also come from --config (JSON or YAML, keys as the flag names); flags win.",
    )
    ap.add_argument("--config", metavar="FILE", help="JSON or YAML file of settings (default: none)")
    for f in dataclasses.fields(TrainConfig):
        t = _field_type(f)
        help_text = HELP[f.name] if "(default:" in HELP[f.name] else f"{HELP[f.name]} (default: %(default)s)"
        name = f"--{flag(f.name)}"
        if t is bool and f.default is False:
            ap.add_argument(name, action="store_true", default=False, help=help_text)
        elif t is bool and f.name == "progress":
            ap.add_argument(name, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        elif t is bool:
            ap.add_argument(name, type=_bool, default=f.default, metavar="BOOL", help=help_text)
        elif typing.get_origin(t) is dict or t is dict:
            ap.add_argument(name, type=_json_object, default=f.default, metavar="JSON", help=help_text)
        else:
            ap.add_argument(name, type=t, default=f.default, help=help_text)
    return ap


def read_config_file(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise TrainError(f"config file {p} does not exist")
    text = p.read_text()
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml  # accelerate depends on PyYAML

            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TrainError(f"config file {p} cannot be parsed ({first})") from None
    if not isinstance(values, dict):
        raise TrainError(f"config file {p} must hold a mapping of setting: value")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise TrainError(f"config file {p}: unknown setting(s) {', '.join(unknown)}; see python train_ddp.py --help")
    return values


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Config file values become the parser's defaults, so explicit flags override them."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    ap = build_parser()
    if known.config:
        ap.set_defaults(**read_config_file(known.config))
    args = vars(ap.parse_args(argv))
    args.pop("config")
    return TrainConfig(**args)


def _is_rank0() -> bool:
    # every rank hits the same error; one line is enough
    return os.environ.get("RANK", "0") == "0"


def main(argv: list[str] | None = None) -> int:
    from gpt.training import train

    try:
        cfg = parse_config(argv)
        summary = train(cfg)
    except (TrainError, ConfigError, DataError, TokenizerError, CheckpointError) as e:
        if _is_rank0():
            print(f"error: {e}", file=sys.stderr)
        return 2
    stopped = summary.get("stopped")
    if stopped != "finished":
        if _is_rank0():
            print(
                f"stopped by {stopped} at step {summary['step']}; resumable state saved in {cfg.out}/state, "
                f"continue with: python train_ddp.py --resume (same flags)",
                file=sys.stderr,
            )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
