"""The training loop, on accelerate: one process, or N DDP ranks under `accelerate launch`.

One step = grad_accum micro-batches per rank (DDP gradients synchronised only on the last,
through accelerate's no_sync), clipped, one AdamW update with the learning rate of a
warmup + cosine schedule. Batches are a pure function of (seed, rank, step, micro-batch), so
the data position is the step counter and a resumed run sees exactly the batches the
uninterrupted run would have seen.

The run directory (`out`):
  latest/ best/      checkpoints in the foundation format (gpt.checkpoint)
  state/             accelerate save_state (weights, optimizer, RNG per rank) + trainer.json (step, best val
                     loss, the step where the cosine ends: a resume with a longer --max-steps keeps it)
  metrics.jsonl      one row per eval;  loss.png  the curves so far
  run.json           what ran: world size, global batch, per-rank checks written at the end
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import time
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import DistributedType, broadcast_object_list
from safetensors.torch import load_file
from torch import Tensor

from gpt.arch import build_model
from gpt.attention import resolve_attention
from gpt.checkpoint import commit_directory, save_checkpoint
from gpt.config import PRESETS, ModelConfig, from_preset
from gpt.data import SHAKESPEARE, DataError, get_batch, load_split, prepare_dataset, read_meta
from gpt.encoder import SPECIALS, mlm_mask, special_ids
from gpt.errors import CliError, GptError, ParallelError, TrainError
from gpt.fsdp import SHARDED_DIR, full_state, load_sharded, save_sharded, shard_for_training
from gpt.pairs import is_pair_corpus, load_pairs, pair_batch, prepare_pairs
from gpt.tokenizer import TokenizerError, load_tokenizer

STATE_DIR = "state"
TRAINER_FILE = "trainer.json"
# ModelConfig fields a run does not choose: the vocabulary comes from the tokenizer
FROM_DATA = ("vocab_size",)
# every other ModelConfig field is a model override of the training config (a flag, a config-file key,
# part of the resume fingerprint): a field added to ModelConfig needs no edit here
MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.name not in FROM_DATA)
# settings that may change between a run and its resumption (they do not change the trajectory)
RESUMABLE_CHANGES = (
    "max_steps",
    "max_tokens",
    "eval_interval",
    "eval_iters",
    "save_interval",
    "log_interval",
    "out",
    "resume",
    "compile",
    "device",
    "threads",
    "peak_tflops",
    "progress",
)
DEVICES = ("auto", "cpu", "cuda", "mps")
MIXED_PRECISION = ("no", "bf16", "fp16")
# --help shows the settings in these groups, in this order
GROUPS = ("model", "data", "optimisation", "evaluation and records", "runtime")


def _setting(default: Any, help: str, group: str, **meta: Any) -> Any:
    return field(default=default, metadata={"help": help, "group": group, **meta})


def _model_override(f: dataclasses.Field) -> tuple[str, Any, Any]:
    """A ModelConfig field as a training setting: same name and type, None = the preset's value."""
    hint = typing.get_type_hints(ModelConfig)[f.name]
    text = f.metadata.get("help") or f"the model's {f.name} (ModelConfig.{f.name})"
    if "(default:" not in text:
        text += " (default: the preset's)"
    return f.name, hint | None, _setting(None, text, "model", model=True)


# generated from ModelConfig, so the help text, the type and the name of a model setting live there only
ModelOverrides = dataclasses.make_dataclass(
    "ModelOverrides",
    [_model_override(f) for f in dataclasses.fields(ModelConfig) if f.name in MODEL_FIELDS],
    namespace={"__module__": __name__, "__doc__": "Per-field overrides of the preset (None = the preset's)."},
)


@dataclass
class TrainConfig(ModelOverrides):
    """Everything a run is: a preset plus ModelConfig overrides (the inherited fields), data, optimisation,
    records and runtime. Field metadata holds each setting's help text; train_ddp.py makes one flag per field."""

    preset: str = _setting(
        "shakespeare-char", "model shape from gpt/config.py PRESETS; the flags below override its fields", "model"
    )
    # data
    data: str = _setting(SHAKESPEARE, "'shakespeare' (built in) or the path of a text file", "data")
    tokenizer: str = _setting("char", "char | sp:VOCAB (train a sentencepiece BPE) | path to a tokenizer", "data")
    data_dir: str | None = _setting(
        None, "where the tokenized data lives, prepared on demand (default: data/<corpus>-<tokenizer>)", "data"
    )
    # optimisation
    batch_size: int = _setting(8, "sequences per device per micro-batch", "optimisation")
    grad_accum: int = _setting(1, "micro-batches per optimizer step", "optimisation")
    block_size: int = _setting(256, "tokens per training sequence", "optimisation")
    lr: float = _setting(2e-3, "peak learning rate", "optimisation")
    min_lr: float = _setting(2e-4, "learning rate at the end of the cosine decay, and after it", "optimisation")
    warmup_steps: int = _setting(30, "linear warmup steps", "optimisation")
    decay_steps: int | None = _setting(
        None,
        "the step at which the cosine reaches --min-lr (default: --max-steps of the run's first session; a "
        "--resume keeps it, so a longer --max-steps continues at --min-lr)",
        "optimisation",
    )
    max_steps: int = _setting(700, "optimizer steps", "optimisation")
    max_tokens: int | None = _setting(
        None, "train this many tokens instead: the steps follow from it (default: none; excludes --max-steps)",
        "optimisation",
    )  # fmt: skip
    weight_decay: float = _setting(0.1, "AdamW weight decay (matrices only, not norms or biases)", "optimisation")
    beta1: float = _setting(0.9, "AdamW beta1", "optimisation")
    beta2: float = _setting(0.99, "AdamW beta2", "optimisation")
    grad_clip: float = _setting(1.0, "clip the gradient norm to this (0 = off)", "optimisation")
    # evaluation, records, checkpoints
    eval_interval: int = _setting(
        100, "evaluate, log a metrics row and save checkpoints every N steps", "evaluation and records"
    )
    eval_iters: int = _setting(10, "batches per split per rank in each evaluation", "evaluation and records")
    save_interval: int = _setting(
        0, "save the resumable state every N steps (0 = at every eval)", "evaluation and records"
    )
    log_interval: int = _setting(
        10, "update the progress bar's loss and tokens/s every N steps", "evaluation and records"
    )
    out: str = _setting(
        "out/shakespeare-char", "run directory: latest/ best/ state/ metrics.jsonl loss.png run.json",
        "evaluation and records",
    )  # fmt: skip
    resume: bool = _setting(
        False, "continue from <out>/state exactly (same settings and number of processes)", "evaluation and records"
    )
    # runtime
    mixed_precision: str = _setting(
        "no",
        "autocast the forward to bf16 or fp16 while the weights and optimizer stay fp32 (accelerate's mixed "
        "precision; not a storage dtype, hence not --dtype); fp16 needs a GPU",
        "runtime",
        choices=MIXED_PRECISION,
    )
    compile: bool = _setting(
        False, "torch.compile the model for training (a --resume may turn it on or off)", "runtime"
    )
    fsdp: bool = _setting(
        False, "shard weights, gradients and optimizer state over the ranks (torch's fully_shard per Block, then "
        "the model; gpt.fsdp): under accelerate launch, on CPU ranks (gloo) or GPUs", "runtime",
    )  # fmt: skip
    seed: int = _setting(1337, "random seed (weights, batches and dropout)", "runtime")
    device: str = _setting(
        "auto", "auto = a GPU when there is one, else the CPU (under accelerate launch, each rank's)", "runtime",
        choices=DEVICES,
    )  # fmt: skip
    threads: int | None = _setting(
        None, "torch threads per process on the CPU (default: cores / processes on this machine)", "runtime"
    )
    peak_tflops: float | None = _setting(
        None, "peak TFLOP/s for MFU (default: the matmul rate measured at start)", "runtime"
    )
    progress: bool = _setting(True, "show the progress bar (--no-progress to hide it)", "runtime")

    def validate(self) -> None:
        positive = ("batch_size", "grad_accum", "block_size", "max_steps", "eval_interval", "eval_iters")
        for name in positive:
            if int(getattr(self, name)) <= 0:
                raise TrainError(f"--{flag(name)}={getattr(self, name)} must be a positive integer")
        for name in ("warmup_steps", "save_interval", "log_interval", "seed"):
            if int(getattr(self, name)) < 0:
                raise TrainError(f"--{flag(name)}={getattr(self, name)} must be zero or positive")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise TrainError(f"need 0 <= --min-lr <= --lr and --lr > 0 (got --lr {self.lr}, --min-lr {self.min_lr})")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise TrainError("--weight-decay and --grad-clip must be zero or positive")
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise TrainError(f"--max-tokens={self.max_tokens} must be a positive integer")
        if self.decay_steps is not None and self.decay_steps <= self.warmup_steps:
            # the cosine would start after it ended: the run would warm up, then drop straight to min_lr
            raise TrainError(
                f"--decay-steps {self.decay_steps} must be greater than --warmup-steps {self.warmup_steps} "
                "(the cosine runs from the end of the warmup to --decay-steps)"
            )
        if self.mixed_precision not in MIXED_PRECISION:
            raise TrainError(f"--mixed-precision {self.mixed_precision!r} is not one of {', '.join(MIXED_PRECISION)}")
        if self.device not in DEVICES:
            raise TrainError(f"--device {self.device!r} is not one of {', '.join(DEVICES)}")
        if self.fsdp and self.mixed_precision == "fp16":
            raise TrainError("--fsdp does not scale fp16 losses; use --mixed-precision bf16 (or no)")

    def fingerprint(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run that wrote the state."""
        d = dataclasses.asdict(self)
        return {k: v for k, v in d.items() if k not in RESUMABLE_CHANGES}


def flag(name: str) -> str:
    return name.replace("_", "-")


def run_arch(cfg: TrainConfig) -> str:
    """The architecture a run trains: --arch, else the preset's (decoder)."""
    return cfg.arch or PRESETS.get(cfg.preset, {}).get("arch", "decoder")


def model_config(cfg: TrainConfig, vocab_size: int, attention: str | None = None) -> ModelConfig:
    """The preset with every model override of `cfg` that is set; `attention`: the resolved variant name.
    The encoder and the encoder-decoder append their special tokens to the tokenizer's vocabulary."""
    overrides = {name: getattr(cfg, name) for name in MODEL_FIELDS}
    if attention is not None:  # a plug-in spec (file.py:NAME) becomes the name it registered
        overrides["attention"] = attention
    if run_arch(cfg) != "decoder":
        vocab_size += len(SPECIALS)
    return from_preset(cfg.preset, vocab_size=vocab_size, **overrides)


# -- settings from a command line and a config file ----------------------------------------------


def setting_type(name: str) -> Any:
    """The value type of a TrainConfig field: int for `int | None`, dict for `dict[str, Any] | None`."""
    hint = typing.get_type_hints(TrainConfig)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    t = args[0] if len(args) == 1 and typing.get_origin(hint) in (typing.Union, types.UnionType) else hint
    return typing.get_origin(t) or t


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def parse_json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON ({e.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object")
    return value


_FROM_TEXT = {bool: parse_bool, dict: parse_json_object, int: int, float: float, str: str}
_KIND = {bool: "true or false", dict: "a mapping", int: "an integer", float: "a number", str: "text"}


class _Replaced(argparse.Action):
    """A flag that was renamed: a one-line pointer to its replacement instead of 'unrecognized'."""

    def __init__(self, *args: Any, replacement: str, **kwargs: Any) -> None:
        super().__init__(*args, nargs=0, **kwargs)
        self.replacement = replacement

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        raise CliError(f"{option_string} was replaced by {self.replacement}; see {parser.prog} --help")


def add_train_arguments(ap: argparse.ArgumentParser) -> None:
    """--config and one flag per TrainConfig field, grouped; a flag absent from argv is absent from the result
    (so config_from_args can tell what was given), and --help shows each default."""
    ap.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS, help="JSON or YAML file of settings")
    ap.add_argument(
        "--cpu", action=_Replaced, replacement="--device cpu", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    groups = {g: ap.add_argument_group(f"{g} settings") for g in GROUPS}
    ordered = sorted(
        dataclasses.fields(TrainConfig), key=lambda f: (GROUPS.index(f.metadata["group"]), f.name != "preset")
    )
    for f in ordered:
        t = setting_type(f.name)
        text = f.metadata["help"]
        if "(default:" not in text:
            text += f" (default: {f.default})"
        kw: dict[str, Any] = {"default": argparse.SUPPRESS, "help": text.replace("%", "%%")}
        if t is bool and f.default is False:
            kw["action"] = "store_true"
        elif t is bool and f.default is True:
            kw["action"] = argparse.BooleanOptionalAction
        elif "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        else:
            kw.update(type=_FROM_TEXT[t], metavar={bool: "BOOL", dict: "JSON"}.get(t))
        groups[f.metadata["group"]].add_argument(f"--{flag(f.name)}", **kw)


def _coerce(name: str, value: Any, where: str) -> Any:
    """A config-file value as the field's type (YAML reads 1e-3 as text); a one-line error otherwise."""
    t = setting_type(name)
    if value is None:
        if TrainConfig.__dataclass_fields__[name].default is None:
            return None
        raise TrainError(f"{where}: {name} cannot be empty; give {_KIND[t]} or drop the key")
    if isinstance(value, str) and t is not str:
        try:
            return _FROM_TEXT[t](value)
        except (ValueError, argparse.ArgumentTypeError):
            raise TrainError(f"{where}: {name}={value!r} is not {_KIND[t]}") from None
    if t is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, t) or (t is int and isinstance(value, bool)):
        raise TrainError(f"{where}: {name}={value!r} is not {_KIND[t]}")
    return value


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Settings from a JSON or YAML mapping (keys as the flag names, - or _), checked and typed."""
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
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    if "cpu" in values:
        raise TrainError(f"config file {p}: the setting cpu was replaced by device; write device: cpu instead")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise TrainError(f"config file {p}: unknown setting(s) {', '.join(unknown)}; see python train_ddp.py --help")
    return {k: _coerce(k, v, f"config file {p}") for k, v in values.items()}


def config_from_args(ap: argparse.ArgumentParser, argv: Sequence[str] | None) -> tuple[TrainConfig, frozenset[str]]:
    """Defaults, then the --config file, then the flags; also the names of the settings given (file or flag)."""
    flags = vars(ap.parse_args(argv))
    path = flags.pop("config", None)
    values = {**(read_config_file(path) if path else {}), **flags}
    given = frozenset(values)
    if "max_tokens" in given and "max_steps" in given and values["max_tokens"] is not None:
        raise CliError(
            "--max-tokens decides the number of steps, so --max-steps does nothing with it; give one of them"
            + (f" (check {path})" if path else "")
        )
    return TrainConfig(**values), given


# -- pieces of the loop ------------------------------------------------------------------------


def lr_at(step: int, cfg: TrainConfig, horizon: int) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at `decay_steps` (default: `horizon`, the last step
    of the run as first planned), then min_lr."""
    decay = cfg.decay_steps or horizon
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    if step >= decay:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(1, decay - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay only on matrices (linear and embedding weights), not on norms or biases."""
    params = [p for p in model.parameters() if p.requires_grad]  # a tied weight appears once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=False, foreach=True)


def load_full_state(model: torch.nn.Module, state: dict[str, Tensor], source: str, fix: str) -> None:
    """Load every weight of `model` from `state`, strictly. The one exception: of weights tied together
    (tie_embeddings: output.weight is tok_embeddings.weight) one name is enough, as safetensors and
    torch.distributed.checkpoint keep a shared tensor once."""
    names_of: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        names_of.setdefault(id(tensor), []).append(name)
    tied = {name: names for names in names_of.values() for name in names}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not any(other in state for other in tied.get(k, ()) if other != k)]
    if missing or unexpected:
        problems = [f"lacks {_few(missing)}"] if missing else []
        problems += [f"has unexpected {_few(unexpected)}"] if unexpected else []
        raise TrainError(f"{source} does not match the model: it {' and '.join(problems)}; {fix}")


def _few(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def gathered_model(config: ModelConfig, state: dict[str, Tensor]) -> torch.nn.Module:
    """A plain model holding the full weights gathered from FSDP shards (every one of them, or an error)."""
    model = build_model(config)
    load_full_state(
        model, state, "the gathered FSDP weights",
        "no checkpoint was written from them (a sharding or state-dict bug: please report it)",
    )  # fmt: skip
    return model


def _strip_compiled(key: str) -> str:
    return key.replace("_orig_mod.", "")  # the prefix torch.compile's wrapper adds to every key


def _canonical_weights(models: list, weights: list, output_dir: str) -> None:
    """accelerate save_state pre-hook: state keys without torch.compile's prefix (if accelerate compiled)."""
    for i, w in enumerate(weights):
        if any("_orig_mod." in k for k in w):
            # an OrderedDict, as accelerate drops the duplicate of a tied weight only from one
            weights[i] = collections.OrderedDict((_strip_compiled(k), v) for k, v in w.items())


def _load_weights(models: list, input_dir: str) -> None:
    """accelerate load_state pre-hook: load the weights ourselves, strictly and into the uncompiled module, so
    a state written with or without --compile (older states kept torch.compile's `_orig_mod.` prefix) loads
    either way; accelerate then loads the optimizer and the RNG states."""
    file = Path(input_dir) / "model.safetensors"
    if len(models) != 1 or not file.exists():
        return  # FSDP loads its shards itself (they are not in `models`)
    target = getattr(models[0], "_orig_mod", models[0])
    try:
        state = {_strip_compiled(k): v for k, v in load_file(str(file)).items()}
    except Exception as e:  # safetensors' own error type for a bad header or a short file
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise TrainError(
            f"--resume: {file} is truncated or corrupt ({first}); restore it or start a new --out"
        ) from None
    load_full_state(target, state, f"--resume: {file}", "resume with the settings it was written with")
    models.clear()


STREAMS = {"train": 0, "eval-train": 1, "eval-val": 2}


def batch_generator(seed: int, rank: int, step: int, micro: int, stream: str = "train") -> torch.Generator:
    """A generator for one micro-batch: independent of everything but its coordinates."""
    state = np.random.SeedSequence([seed, STREAMS[stream], rank, step, micro]).generate_state(2, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


def default_data_dir(cfg: TrainConfig) -> Path:
    corpus = SHAKESPEARE if cfg.data == SHAKESPEARE else Path(cfg.data).stem
    tok = cfg.tokenizer.replace(":", "") if ("/" not in cfg.tokenizer and "." not in cfg.tokenizer) else "tok"
    return Path("data") / f"{corpus}-{tok}"


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 1024) -> float:
    """The dense matmul rate this process gets right now: the denominator of MFU."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def plot_losses(rows: list[dict[str, Any]], path: Path) -> None:
    """Train and val loss against step, written atomically (a reader never sees half a PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(steps, [r["train_loss"] for r in rows], marker="o", label="train")
    ax.plot(steps, [r["val_loss"] for r in rows], marker="o", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop checks it between steps. A second Ctrl-C aborts at once."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __enter__(self) -> StopFlag:
        for s in (signal.SIGINT, signal.SIGTERM):
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)


# -- the trainer ---------------------------------------------------------------------------------


class Trainer:
    """Builds everything from a TrainConfig and runs the loop; `run()` returns a summary dict."""

    def __init__(self, cfg: TrainConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        # a plug-in spec (file.py:NAME, package.module:NAME) is imported and registered before anything else
        self.attention = resolve_attention(cfg.attention) if cfg.attention else None
        self.out = Path(cfg.out)
        self.accelerator = self._make_accelerator()
        acc = self.accelerator
        self.world, self.rank = acc.num_processes, acc.process_index
        self.is_main = acc.is_main_process
        self._set_threads()

        self.arch = run_arch(cfg)
        self.data_dir = self._prepare_data()
        load = load_pairs if self.arch == "seq2seq" else load_split
        self.train_data = load(self.data_dir, "train")
        self.val_data = load(self.data_dir, "val")
        self.tokenizer = load_tokenizer(self.data_dir)
        self.model_config = self._model_config()
        if cfg.block_size > self.model_config.max_seq_len:
            raise TrainError(
                f"--block-size {cfg.block_size} exceeds the model's max_seq_len {self.model_config.max_seq_len}; "
                "lower --block-size or raise --max-seq-len"
            )
        for name, data in (("train", self.train_data), ("val", self.val_data)):
            if self.arch != "seq2seq" and len(data) <= cfg.block_size:
                raise TrainError(
                    f"{self.data_dir}/{name}.bin has {len(data)} tokens, fewer than --block-size+1; "
                    "use more text or a smaller --block-size"
                )

        self.tokens_per_step = cfg.batch_size * cfg.grad_accum * self.world * cfg.block_size
        self.total_steps = cfg.max_steps
        if cfg.max_tokens is not None:
            self.total_steps = math.ceil(cfg.max_tokens / self.tokens_per_step)
        # where the cosine ends; a resumed run keeps the one its first session recorded (load_state)
        self.decay_horizon = cfg.decay_steps or self.total_steps

        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.raw_model = build_model(self.model_config).to(acc.device)
        self.flops_per_token = self.raw_model.flops_per_token(cfg.block_size)
        if cfg.fsdp:
            # sharded from outside; accelerate must not wrap it in DDP, so neither it nor its optimizer is
            # prepared (the optimizer is built on the shards), and save_state/load_state add the shards
            try:
                shard_for_training(self.raw_model, acc.device)
            except ParallelError as e:
                raise TrainError(str(e)) from None
            self.prepared, self.optimizer = self.raw_model, make_optimizer(self.raw_model, cfg)
        else:
            optimizer = make_optimizer(self.raw_model, cfg)
            # accelerate saves and loads the prepared (DDP/FSDP-wrapped) module, never the compiled one, so the
            # state's keys are the same with and without --compile and a run may toggle it between sessions
            self.prepared, self.optimizer = acc.prepare(self.raw_model, optimizer)
        self.model = torch.compile(self.prepared) if cfg.compile else self.prepared
        acc.register_save_state_pre_hook(_canonical_weights)
        acc.register_load_state_pre_hook(_load_weights)

        self.step = 0
        self.best_val = float("inf")
        self.elapsed = 0.0  # training seconds over all sessions of this run
        self.rows: list[dict[str, Any]] = []
        self.first_batch: list[int] = []
        self.resume_note = ""  # what the learning rate does in a resumed session (load_state)

    # -- setup ----------------------------------------------------------------------------
    def _make_accelerator(self):
        from accelerate import Accelerator

        cfg = self.cfg
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise TrainError("--device cuda: no CUDA device is available here; use --device cpu (or auto)")
        mps = getattr(torch.backends, "mps", None)
        if cfg.device == "mps" and not (mps and mps.is_available()):
            raise TrainError("--device mps: no Apple GPU is available here; use --device cpu (or auto)")
        # accelerate picks cuda, else mps, else the CPU unless told cpu=True
        on_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
        fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")
        if fsdp and on_cpu:
            raise TrainError(
                "accelerate's FSDP does not run on the CPU (FSDP1 fails and FSDP2 silently becomes DDP); "
                "launch without the FSDP config and pass --fsdp (torch's fully_shard), or use GPUs"
            )
        if fsdp and cfg.fsdp:
            raise TrainError("--fsdp shards the model itself; launch it without accelerate's FSDP config")
        if cfg.mixed_precision == "fp16" and on_cpu:
            raise TrainError("--mixed-precision fp16 needs a GPU; use bf16 (or no) on the CPU")
        # cpu=True when there is no GPU: then `accelerate launch --multi_gpu` starts synchronised
        # gloo ranks instead of independent processes
        acc = Accelerator(cpu=on_cpu, mixed_precision=cfg.mixed_precision)
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched != acc.num_processes:
            raise TrainError(
                f"the launcher started {launched} processes but accelerate joined {acc.num_processes}; "
                "on the CPU launch with ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu ..."
            )
        return acc

    def _set_threads(self) -> None:
        self._threads_before = torch.get_num_threads()  # restored by close(): a library call leaves no trace
        if self.accelerator.device.type != "cpu":
            if self.cfg.threads and self.is_main:
                print(f"warning: --threads sets CPU threads; it does nothing on {self.accelerator.device}", flush=True)
            return
        # ranks on one machine share its cores; oversubscribing them is much slower than 1 thread each
        local = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(self.cfg.threads or max(1, cores // max(1, local)))

    def _prepare_data(self) -> Path:
        cfg = self.cfg
        data_dir = Path(cfg.data_dir) if cfg.data_dir else default_data_dir(cfg)
        if cfg.data != SHAKESPEARE and not Path(cfg.data).exists():
            raise TrainError(f"data file {cfg.data} does not exist; pass --data shakespeare or the path of a text file")
        pairs = self.arch == "seq2seq"
        if pairs and cfg.data_dir is None and not is_pair_corpus(cfg.data):
            raise TrainError(
                f"--arch seq2seq trains on a parallel corpus, not {cfg.data}: pass --data DIR holding train.jsonl "
                "and val.jsonl (python scripts/prepare_modernisation.py writes data/modernisation)"
            )
        if not (data_dir / "meta.json").exists():
            error = None
            if self.is_main:
                print(f"preparing {cfg.data} with the {cfg.tokenizer} tokenizer into {data_dir}", flush=True)
                try:
                    prepare_pairs(cfg.data, data_dir, cfg.tokenizer) if pairs else prepare_dataset(
                        cfg.data, data_dir, cfg.tokenizer
                    )
                except (DataError, TokenizerError) as e:
                    error = str(e)
            # the other ranks wait here, and fail with rank 0 rather than hang at a later barrier
            error = broadcast_object_list([error])[0]
            if error:
                raise TrainError(error)
        meta = read_meta(data_dir)
        if pairs != (meta.get("kind") == "pairs"):
            want = "a parallel corpus" if pairs else "a text corpus"
            raise TrainError(f"{data_dir} was not prepared from {want} (--arch {self.arch}); pass another --data-dir")
        if cfg.data_dir is None and meta.get("tokenizer") not in (None, cfg.tokenizer):
            raise TrainError(
                f"{data_dir} was prepared with tokenizer {meta['tokenizer']!r}, not {cfg.tokenizer!r}; "
                "delete it or pass --data-dir"
            )
        return data_dir

    def _model_config(self) -> ModelConfig:
        return model_config(self.cfg, self.tokenizer.vocab_size, self.attention)

    # -- batches and evaluation --------------------------------------------------------------
    def batch(self, step: int, micro: int) -> dict[str, Tensor]:
        g = batch_generator(self.cfg.seed, self.rank, step, micro)
        return self.make_batch(self.train_data, g)

    def make_batch(self, data, g: torch.Generator) -> dict[str, Tensor]:
        """The model's keyword arguments for one micro-batch (targets included), drawn from g alone:
        next-token blocks (decoder), BERT-masked blocks (encoder) or padded pairs (seq2seq)."""
        cfg, device = self.cfg, self.accelerator.device
        if self.arch == "seq2seq":
            return pair_batch(data, cfg.batch_size, cfg.block_size, special_ids(self.model_config), g, device)
        x, y = get_batch(data, cfg.batch_size, cfg.block_size, g, device)
        if self.arch == "encoder":
            x, y = mlm_mask(x, self.model_config, g, n_real=self.tokenizer.vocab_size)
        return {"idx": x, "targets": y}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss over eval_iters fixed batches per rank and split, averaged over ranks."""
        self.model.eval()
        out = {}
        for split, data in (("train", self.train_data), ("val", self.val_data)):
            losses = torch.zeros(self.cfg.eval_iters, device=self.accelerator.device)
            for i in range(self.cfg.eval_iters):
                # the same batches at every eval, so the curve is not eval-sampling noise
                g = batch_generator(self.cfg.seed, self.rank, 0, i, stream=f"eval-{split}")
                with self.accelerator.autocast():
                    _, loss = self.model(**self.make_batch(data, g))
                losses[i] = loss.float()
            out[split] = self.accelerator.reduce(losses.mean(), reduction="mean").item()
        self.model.train()
        return out

    # -- saving -------------------------------------------------------------------------------
    def save_checkpoint(self, name: str) -> None:
        model = self.raw_model
        if self.cfg.fsdp:
            state = full_state(self.raw_model)  # a collective: every rank
            if self.is_main:
                model = gathered_model(self.model_config, state)
        elif self.accelerator.distributed_type == DistributedType.FSDP:
            # sharded parameters: gather the full weights (a collective, so every rank) into a plain copy
            state = self.accelerator.get_state_dict(self.prepared)
            if self.is_main:
                model = gathered_model(self.model_config, state)
        if self.is_main:
            save_checkpoint(self.out / name, model, self.tokenizer)

    def save_state(self) -> None:
        """accelerate save_state into a staging dir on every rank, then one atomic rename."""
        acc = self.accelerator
        final, tmp = self.out / STATE_DIR, self.out / f".{STATE_DIR}.tmp"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)
        if self.cfg.fsdp:  # accelerate saved the RNG states; the shards are ours
            save_sharded(self.raw_model, self.optimizer, tmp / SHARDED_DIR)
        acc.wait_for_everyone()
        if self.is_main:
            trainer = {
                "step": self.step,
                "best_val": self.best_val,
                "elapsed": self.elapsed,
                "world_size": self.world,
                "decay_horizon": self.decay_horizon,
                "config": self.cfg.fingerprint(),
            }
            write_json(tmp / TRAINER_FILE, trainer)
            commit_directory(tmp, final)
        acc.wait_for_everyone()

    def load_state(self) -> None:
        path = self.out / STATE_DIR
        meta_path = path / TRAINER_FILE
        if not meta_path.exists():
            raise TrainError(f"--resume: {meta_path} does not exist; there is no resumable state in {self.out}")
        meta = json.loads(meta_path.read_text())
        if meta["world_size"] != self.world:
            raise TrainError(
                f"--resume: {path} was written by {meta['world_size']} process(es), this run has {self.world}; "
                "resume with the same number of processes"
            )
        mine, saved = self.cfg.fingerprint(), dict(meta["config"])
        saved.pop("cpu", None)  # states written before --device (which may change on resume) replaced --cpu
        for key in sorted(set(mine) | set(saved)):
            if mine.get(key) != saved.get(key):
                raise TrainError(
                    f"--resume: {path} was written with {flag(key)}={saved.get(key)!r} but this run has "
                    f"{flag(key)}={mine.get(key)!r}; use the same settings or a new --out"
                )
        rng = path / f"random_states_{self.rank}.pkl"
        if not rng.exists():
            # accelerate would go on without it, and dropout would then not replay the interrupted run
            raise TrainError(f"--resume: {rng} is missing, so the run cannot continue exactly; use a new --out")
        try:
            self.accelerator.load_state(str(path))
            if self.cfg.fsdp:
                load_sharded(self.raw_model, self.optimizer, path / SHARDED_DIR)
        except GptError:
            raise
        except Exception as e:  # a truncated or foreign file in state/: safetensors, torch.load and pickle errors
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise TrainError(
                f"--resume: {path} cannot be read ({type(e).__name__}: {first}); restore it or start a new --out"
            ) from None
        self.step, self.best_val, self.elapsed = meta["step"], meta["best_val"], meta["elapsed"]
        self.decay_horizon = meta.get("decay_horizon") or self.decay_horizon
        self.resume_note = self._schedule_note("decay_horizon" in meta)
        # rows after the saved step belong to a future the resumed run replays
        self.rows = [r for r in read_metrics(self.out / "metrics.jsonl") if r["step"] <= self.step]

    def _schedule_note(self, recorded: bool) -> str:
        """One line on what the learning rate does in the resumed session."""
        cfg, end = self.cfg, self.decay_horizon
        head = f"resuming at step {self.step} of {self.total_steps}: "
        if not recorded:
            return head + f"the state records no decay horizon (an older run), so the cosine now ends at step {end}"
        if self.total_steps <= end:
            return (
                head + f"the learning rate follows the run's schedule, cosine to --min-lr {cfg.min_lr:g} at step {end}"
            )
        return head + (
            f"the learning rate keeps the run's schedule (cosine to --min-lr {cfg.min_lr:g} at step {end}) and "
            f"stays at {cfg.min_lr:g} from step {max(end, self.step)}; for a longer decay start a new run with "
            "--decay-steps"
        )

    def log_eval(self, losses: dict[str, float], lr: float, tok_s: float, mfu: float) -> None:
        row = {
            "step": self.step,
            "train_loss": losses["train"],
            "val_loss": losses["val"],
            "lr": lr,
            "tokens": self.step * self.tokens_per_step,
            "tokens_per_s": tok_s,
            "mfu": mfu,
            "elapsed_s": round(self.elapsed, 3),
        }
        self.rows.append(row)
        if self.is_main:
            path = self.out / "metrics.jsonl"
            tmp = path.with_name(".metrics.jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
            os.replace(tmp, path)
            plot_losses(self.rows, self.out / "loss.png")

    def summary_checks(self) -> dict[str, Any]:
        """Per-rank fingerprints of the first batch and of the final weights (gathered to every rank)."""
        acc = self.accelerator
        with torch.no_grad():
            # under FSDP each rank checks its own shard
            local = [p.to_local() if hasattr(p, "to_local") else p for p in self.raw_model.parameters()]
            flat = torch.cat([p.detach().double().flatten().cpu() for p in local])
            mine = torch.stack([flat.sum(), flat.abs().sum(), (flat * flat).sum()])
        first = torch.tensor(self.first_batch or [0], dtype=torch.float64, device=acc.device)
        params = acc.gather(mine.to(acc.device)[None]).cpu().tolist()
        batches = acc.gather(first[None]).cpu().tolist()
        return {"rank_param_checksums": params, "rank_first_batch_tokens": batches}

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg, acc = self.cfg, self.accelerator
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        if cfg.resume:
            self.load_state()
        run_info = {
            "world_size": self.world,
            "device": str(acc.device),
            "threads_per_rank": torch.get_num_threads(),
            "params": self.raw_model.num_params(),
            "tokens_per_step": self.tokens_per_step,
            "total_steps": self.total_steps,
            "config": dataclasses.asdict(cfg),
            "model": self.model_config.to_dict(),
        }
        if self.is_main:
            write_json(self.out / "run.json", run_info)
            print(
                f"{self.raw_model.num_params() / 1e6:.2f}M parameters, {self.world} process(es) on {acc.device} "
                f"with {torch.get_num_threads()} thread(s) each; global batch {cfg.batch_size} x {cfg.grad_accum} "
                f"accum x {self.world} ranks x {cfg.block_size} tokens = {self.tokens_per_step:,} tokens/step; "
                f"{self.total_steps} steps" + (f", resuming at step {self.step}" if cfg.resume else ""),
                flush=True,
            )
            if cfg.resume:
                print(self.resume_note, flush=True)
        peak = cfg.peak_tflops or measure_matmul_tflops(
            acc.device, torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float32
        )
        status = self._loop(peak)
        run_info.update(self.summary_checks())
        run_info.update(status)
        if self.is_main:
            write_json(self.out / "run.json", run_info)
        acc.wait_for_everyone()
        return run_info

    def _loop(self, peak_tflops: float) -> dict[str, Any]:
        from tqdm import tqdm

        cfg, acc = self.cfg, self.accelerator
        self.model.train()
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (self.is_main and cfg.progress))
        save_every = cfg.save_interval or cfg.eval_interval
        window_t, window_tokens = time.perf_counter(), 0
        tok_s = 0.0
        status: dict[str, Any] = {"stopped": "finished"}
        with StopFlag() as stop:
            while self.step < self.total_steps:
                t0 = time.perf_counter()
                lr = lr_at(self.step, cfg, self.decay_horizon)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                loss_sum = torch.zeros((), device=acc.device)
                for micro in range(cfg.grad_accum):
                    batch = self.batch(self.step, micro)
                    if not self.first_batch:
                        first = next(iter(batch.values()))
                        self.first_batch = (first[0, :8].tolist() + [-1] * 8)[:8]
                    # gradients are all-reduced only on the last micro-batch
                    sync = micro == cfg.grad_accum - 1
                    with self._grad_sync(sync):
                        with acc.autocast():
                            _, loss = self.model(**batch)
                        acc.backward(loss / cfg.grad_accum)
                    loss_sum += loss.detach().float()
                if cfg.grad_clip > 0:
                    acc.clip_grad_norm_(self.prepared.parameters(), cfg.grad_clip)
                # one all-reduce carries the loss (for the mean) and the stop request (any rank)
                flags = torch.stack(
                    [loss_sum / cfg.grad_accum, torch.tensor(float(stop.signal is not None), device=acc.device)]
                )
                flags = acc.reduce(flags, reduction="sum")
                loss_mean = flags[0].item() / self.world
                if not math.isfinite(loss_mean):
                    self.optimizer.zero_grad(set_to_none=True)
                    bar.close()
                    raise TrainError(
                        f"loss is {loss_mean} at step {self.step}; stopped without updating the weights, the last "
                        f"good checkpoint is {self.out / 'latest'} (lower --lr or raise --warmup-steps)"
                    )
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                dt = time.perf_counter() - t0
                self.elapsed += dt
                window_tokens += self.tokens_per_step
                bar.update(1)
                if self.step % max(1, cfg.log_interval) == 0 or self.step == self.total_steps:
                    now = time.perf_counter()
                    tok_s = window_tokens / max(now - window_t, 1e-9)
                    window_t, window_tokens = now, 0
                    bar.set_postfix(loss=f"{loss_mean:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
                last = self.step == self.total_steps
                if self.step % cfg.eval_interval == 0 or last:
                    mfu = tok_s * self.flops_per_token / self.world / (peak_tflops * 1e12)
                    losses = self.evaluate()
                    self.log_eval(losses, lr, tok_s, mfu)
                    if self.is_main:
                        bar.write(
                            f"step {self.step}: train {losses['train']:.4f}, val {losses['val']:.4f}, "
                            f"{tok_s:,.0f} tok/s, MFU {100 * mfu:.1f}%, {self.elapsed:.0f}s"
                        )
                    if losses["val"] < self.best_val:
                        self.best_val = losses["val"]
                        self.save_checkpoint("best")
                    self.save_checkpoint("latest")
                    window_t = time.perf_counter()  # eval time is not training throughput
                if self.step % save_every == 0 or last:
                    self.save_state()
                if flags[1].item() > 0:
                    bar.close()
                    self.save_checkpoint("latest")
                    self.save_state()
                    status = {"stopped": stop.signal or "signal on another rank", "step": self.step}
                    return status
        bar.close()
        status["step"] = self.step
        status["best_val"] = self.best_val
        return status

    def _grad_sync(self, sync: bool):
        """Skip the gradient all-reduce / reduce-scatter on all but the last micro-batch."""
        if self.cfg.fsdp:
            self.prepared.set_requires_gradient_sync(sync)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if sync else self.accelerator.no_sync(self.prepared)

    def close(self) -> None:
        """A barrier, then tear down the process group (a gloo group can abort at exit otherwise)."""
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        torch.set_num_threads(self._threads_before)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train from a config; returns what ran (see run.json)."""
    try:
        trainer = Trainer(cfg)
    except BaseException:
        # a setup error after the process group started: leave it cleanly (every rank fails alike)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        raise
    try:
        return trainer.run()
    finally:
        trainer.close()


__all__ = [
    "MODEL_FIELDS",
    "TrainConfig",
    "TrainError",
    "Trainer",
    "add_train_arguments",
    "config_from_args",
    "lr_at",
    "make_optimizer",
    "model_config",
    "read_config_file",
    "train",
]
