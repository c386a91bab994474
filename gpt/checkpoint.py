"""The checkpoint directory: config.json + model.safetensors + the tokenizer file.

Saving writes a complete directory under a temporary name and renames it into place,
so an interrupted save never replaces the last good checkpoint with a partial one.
Loading is strict and every failure is a one-line CheckpointError naming the file and
what to do. Weights are read with safetensors only: nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from safetensors.torch import save_file

from gpt import quant
from gpt.arch import model_class
from gpt.attention import attention_source, available, get_attention, resolve_attention
from gpt.config import ConfigError, ModelConfig
from gpt.errors import CheckpointError  # noqa: F401  (re-exported: gpt.checkpoint.CheckpointError)
from gpt.model import Transformer
from gpt.tokenizer import Tokenizer, TokenizerError, load_tokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1
# keys of config.json that are not ModelConfig fields
_EXTRA_KEYS = ("format_version", "quantization", "torch_dtype", "attention_source")

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise CheckpointError(f"unknown dtype {name!r}; use one of fp32, bf16, fp16")
    return DTYPES[name]


# -- atomic directory writes -------------------------------------------------------------


def _backup_name(directory: Path) -> Path:
    return directory.parent / f".{directory.name}.previous"


def recover_interrupted_save(directory: str | Path) -> None:
    """If a save died between its two renames, put the previous checkpoint back."""
    directory = Path(directory)
    backup = _backup_name(directory)
    if backup.exists() and not directory.exists():
        os.rename(backup, directory)


def _fsync_dir_tree(directory: Path) -> None:
    for f in directory.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def commit_directory(tmp: Path, directory: Path) -> None:
    """Replace `directory` by the complete `tmp` directory (two renames, no copy)."""
    _fsync_dir_tree(tmp)
    backup = _backup_name(directory)
    if backup.exists():
        shutil.rmtree(backup)
    if directory.exists():
        os.rename(directory, backup)
    os.rename(tmp, directory)
    if backup.exists():
        shutil.rmtree(backup)


def staging_dir(directory: Path) -> Path:
    """A fresh temporary directory beside `directory` (same filesystem, so rename is atomic)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted_save(directory)
    tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


# -- save ---------------------------------------------------------------------------------


def model_state_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Persistent tensors, contiguous, with a tied lm head stored once (as the embedding)."""
    sd = model.state_dict()
    if getattr(getattr(model, "config", None), "tie_embeddings", False):
        sd.pop("output.weight", None)
    return {k: v.detach().contiguous() for k, v in sd.items()}


def save_checkpoint(
    directory: str | Path,
    model: Transformer,
    tokenizer: Tokenizer | None = None,
    extra_config: dict[str, Any] | None = None,
    extra_files: dict[str, str | bytes] | None = None,
) -> Path:
    """Write config.json, model.safetensors and the tokenizer into `directory`, atomically."""
    directory = Path(directory)
    tmp = staging_dir(directory)
    try:
        cfg = {"format_version": FORMAT_VERSION, **model.config.to_dict(), **(extra_config or {})}
        source = attention_source(model.config.attention)
        if source is not None:  # a plug-in: record where to import it from again
            cfg["attention_source"] = source
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        weights_file = (extra_config or {}).get("quantization", {}).get("weights_file", WEIGHTS_FILE)
        save_file(model_state_for_saving(model), str(tmp / weights_file), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp)
        for name, content in (extra_files or {}).items():
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(tmp / name, mode) as f:
                f.write(content)
        commit_directory(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


# -- load ---------------------------------------------------------------------------------


def read_config(directory: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """ModelConfig and the raw config.json dict (which may hold a quantization block)."""
    directory = Path(directory)
    recover_interrupted_save(directory)
    if not directory.is_dir():
        raise CheckpointError(
            f"checkpoint directory {directory} does not exist; train one with `python train_ddp.py` "
            "or pass the right directory"
        )
    path = directory / CONFIG_FILE
    if not path.exists():
        raise CheckpointError(
            f"{path} is missing; a checkpoint directory needs config.json, {WEIGHTS_FILE} and a tokenizer"
        )
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); restore it from the run that wrote it") from None
    fields = {k: v for k, v in raw.items() if k not in _EXTRA_KEYS}
    if raw.get("attention_source") and raw.get("attention") not in available():
        try:
            name = resolve_attention(raw["attention_source"])
        except ConfigError as e:
            attr = raw["attention_source"].rpartition(":")[2]
            raise CheckpointError(f"{path}: {e} (if it moved: --attention NEW/PATH.py:{attr})") from None
        if name != raw.get("attention"):
            raise CheckpointError(
                f"{path}: attention_source {raw['attention_source']} registers {name!r}, "
                f"not {raw.get('attention')!r}; fix attention_source"
            )
    try:
        config = ModelConfig.from_dict(fields)
        get_attention(config.attention)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    return config, raw


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete, re-save it")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error type for bad headers and short files
        raise CheckpointError(
            f"{path} is truncated or corrupt ({str(e).splitlines()[0]}); re-save the checkpoint"
        ) from None


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Names and shapes of `state` must match the model exactly; errors name the tensor."""
    expected = model_state_for_saving(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise CheckpointError(
            f"{path} lacks tensor(s) {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} "
            "that config.json requires; the weights and config.json do not belong together"
        )
    if unexpected:
        raise CheckpointError(
            f"{path} has unexpected tensor(s) {', '.join(unexpected[:5])}"
            f"{' ...' if len(unexpected) > 5 else ''} that config.json does not describe"
        )
    for name, t in state.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{path}: tensor {name} has shape {tuple(t.shape)} but config.json implies "
                f"{tuple(expected[name].shape)}; the weights and config.json do not belong together"
            )


def load_model(
    directory: str | Path,
    device: torch.device | str = "cpu",
    dtype: str | torch.dtype | None = None,
    overrides: dict[str, Any] | None = None,
    max_seq_len: int | None = None,
) -> Transformer:
    """Build the model of a checkpoint directory and load its weights (strict).

    The weights keep their stored dtype unless `dtype` asks for another. The model is built with
    empty (meta) parameters and the loaded tensors are assigned in place of them, so loading
    costs one copy of the weights: no throw-away fp32 model, no init pass. `overrides` replace
    config fields that do not change the weights' names and shapes (e.g. another attention
    variant without parameters of its own); the strict check catches the ones that do.
    `max_seq_len` above the saved one extends the positional tables for evaluation past the
    training length (Transformer.extend_context; config.json is not touched, and learned
    positions refuse).
    """
    directory = Path(directory)
    config, raw = read_config(directory)
    if overrides:
        try:
            config = ModelConfig.from_dict({**config.to_dict(), **overrides})
        except (ConfigError, TypeError) as e:
            raise CheckpointError(f"{directory / CONFIG_FILE}: {e}") from None
    dtype = parse_dtype(dtype)
    quant_block = raw.get("quantization")
    # parameters on meta; runtime tables are computed
    with init_empty_weights(include_buffers=False), _no_weight_init():
        model = model_class(config)(config)  # the decoder, encoder or encoder-decoder config.json names
        if quant_block:
            try:
                model = quant.prepare_for_load(model, quant_block)
            except quant.QuantError as e:
                raise CheckpointError(f"{directory / CONFIG_FILE}: quantization block: {e}") from None
    path = directory / (quant_block or {}).get("weights_file", WEIGHTS_FILE)
    state = read_weights(path)
    check_state_dict(model, state, path)
    # strictness checked above; a tied head is not stored and is re-tied below
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_embeddings and isinstance(model.output, torch.nn.Linear):  # (a quantised head is its own copy)
        model.output.weight = model.tok_embeddings.weight
    if max_seq_len is not None:  # before the cast below, so the longer tables get the same dtype and device
        try:
            model.extend_context(max_seq_len)
        except ConfigError as e:
            raise CheckpointError(f"{directory}: {e}") from None
    stored = model.tok_embeddings.weight.dtype
    target = dtype or stored
    # every float tensor in one dtype (as a cast model would be); a no-op for what is already there
    model = quant.cast_float_params(model, target) if quant_block else model.to(dtype=target)
    return model.to(device).eval()


_INIT_FUNCTIONS = ("normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_",
                   "trunc_normal_", "ones_", "zeros_", "constant_")  # fmt: skip


@contextlib.contextmanager
def _no_weight_init() -> Iterator[None]:
    """Skip torch.nn.init while building a model whose weights are loaded next: on meta tensors the
    init functions do nothing useful but go through torch's reference ops, whose first call imports
    dynamo (~1 s of every start, compiled ahead of time or not). The functions are swapped for the
    duration, process-wide (as transformers' no_init_weights does): a model built on another thread
    meanwhile would skip its init too; gpt builds models on one thread at a time."""
    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS}
    try:
        for name in _INIT_FUNCTIONS:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def load_checkpoint(
    directory: str | Path,
    device: torch.device | str = "cpu",
    dtype: str | torch.dtype | None = None,
    overrides: dict[str, Any] | None = None,
    max_seq_len: int | None = None,
) -> tuple[Transformer, Tokenizer]:
    """The model (eval mode) and tokenizer of a checkpoint directory (see load_model)."""
    model = load_model(directory, device, dtype, overrides, max_seq_len)
    try:
        tokenizer = load_tokenizer(directory)
    except TokenizerError as e:
        raise CheckpointError(str(e)) from None
    if tokenizer.vocab_size > model.config.vocab_size:
        raise CheckpointError(
            f"{directory}: the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{model.config.vocab_size}; they do not belong together"
        )
    return model, tokenizer


# -- quantised checkpoints ----------------------------------------------------------------------


def weights_path(directory: str | Path) -> Path:
    """The weights file a checkpoint directory's config.json names."""
    _, raw = read_config(directory)
    return Path(directory) / (raw.get("quantization") or {}).get("weights_file", WEIGHTS_FILE)


def default_quantized_dir(checkpoint: str | Path, mode: str, group_size: int | None = None) -> Path:
    """out/run/best -> out/run/best-int8, or out/run/best-int4-g32 (group sizes do not collide)."""
    p = Path(checkpoint)
    suffix = f"{mode}-g{group_size}" if mode == "int4" else mode
    return p.with_name(f"{p.name}-{suffix}")


def quantize_checkpoint(
    checkpoint: str | Path,
    out: str | Path | None,
    mode: str,
    group_size: int | None = None,
    quantize_head: bool = True,
) -> tuple[Path, dict[str, Any]]:
    """Quantise a checkpoint directory into a new one (atomically); returns (out, quantization block)."""
    if mode == "int4" and group_size is None:
        group_size = 32
    quant.check_mode(mode, group_size if mode == "int4" else None)
    _, raw = read_config(checkpoint)
    if raw.get("quantization"):
        q = raw["quantization"]
        raise quant.QuantError(
            f"checkpoint {checkpoint} is already quantized ({q.get('mode')}); quantize the unquantized checkpoint"
        )
    out = Path(out) if out is not None else default_quantized_dir(checkpoint, mode, group_size)
    if out.resolve() == Path(checkpoint).resolve():
        raise quant.QuantError(f"--out {out} is the input checkpoint; write the quantized model to a new directory")
    model, tokenizer = load_checkpoint(checkpoint, dtype="fp32")
    block = quant.quantize_model(model, mode, group_size, quantize_head)
    save_checkpoint(out, model, tokenizer, extra_config={"quantization": block})
    return out, block
