"""Hugging Face LLaMA interop: configs, tensor names, import (HF -> ours) and export (ours -> HF).

The two layouts hold the same numbers under different names. Our RoPE already uses the
half-split ("rotate_half") layout of transformers, so q and k rows are copied as they are;
the parity tests against transformers are what proves it.

    ours                                   Hugging Face LlamaForCausalLM
    tok_embeddings.weight                  model.embed_tokens.weight
    layers.N.attention.wq|wk|wv|wo.weight  model.layers.N.self_attn.q_proj|k_proj|v_proj|o_proj.weight
    layers.N.feed_forward.w1|w3|w2.weight  model.layers.N.mlp.gate_proj|up_proj|down_proj.weight
    layers.N.attention_norm.weight         model.layers.N.input_layernorm.weight
    layers.N.ffn_norm.weight               model.layers.N.post_attention_layernorm.weight
    norm.weight                            model.norm.weight
    output.weight                          lm_head.weight (absent when tied)

Every refusal is an HFError with a one-line message naming the field or tensor.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gpt.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    commit_directory,
    model_state_for_saving,
    read_config,
    read_weights,
    save_checkpoint,
    staging_dir,
)
from gpt.config import ConfigError, ModelConfig
from gpt.errors import HFError  # noqa: F401  (re-exported: gpt.hf.HFError)
from gpt.model import Transformer
from gpt.tokenizer import SP_FILE, SentencePieceTokenizer, TokenizerError, load_tokenizer

# Attention variants that compute exactly what LlamaAttention computes (causal softmax attention).
STANDARD_ATTENTION = ("sdpa", "math")

# transformers' LlamaConfig defaults: an HF config.json may omit any field left at its default.
HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,  # LLaMA checkpoints themselves usually say 1e-5
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
}

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


# -- tensor names ------------------------------------------------------------------------

_LAYER_NAMES = {  # ours (inside layers.N.) -> HF (inside model.layers.N.)
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
_TOP_NAMES["output.weight"] = "lm_head.weight"
_HF_LAYER_NAMES = {v: k for k, v in _LAYER_NAMES.items()}
_HF_TOP_NAMES = {v: k for k, v in _TOP_NAMES.items()}
_LAYER_RE = re.compile(r"^(model\.)?layers\.(\d+)\.(.+)$")


def ours_to_hf_name(name: str) -> str:
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    m = _LAYER_RE.match(name)
    if m and m.group(3) in _LAYER_NAMES:
        return f"model.layers.{m.group(2)}.{_LAYER_NAMES[m.group(3)]}"
    raise HFError(f"tensor {name} has no Hugging Face LLaMA counterpart; only plain LLaMA weights export")


def hf_to_ours_name(name: str) -> str | None:
    """Our name for an HF tensor; None for tensors that carry no weights (rotary inv_freq buffers)."""
    if name.endswith("rotary_emb.inv_freq"):  # older checkpoints saved the RoPE table; we recompute it
        return None
    if name in _HF_TOP_NAMES:
        return _HF_TOP_NAMES[name]
    m = _LAYER_RE.match(name)
    if m and m.group(1) and m.group(3) in _HF_LAYER_NAMES:
        return f"layers.{m.group(2)}.{_HF_LAYER_NAMES[m.group(3)]}"
    hint = " (biases are not supported)" if name.endswith(".bias") else ""
    raise HFError(f"tensor {name} is not part of a LLaMA model this toolkit can hold{hint}")


def to_hf_state_dict(state_dict: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our tensors under HF names. A tied head is stored once, as the embedding (HF omits lm_head)."""
    out = {}
    for name, t in state_dict.items():
        if name == "output.weight" and config.tie_embeddings:
            continue
        out[ours_to_hf_name(name)] = t
    return out


def _kept_name(name: str, config: ModelConfig) -> str | None:
    """Our name for an HF tensor we store; None for RoPE tables and for a tied head (stored as the embedding)."""
    ours = hf_to_ours_name(name)
    return None if ours == "output.weight" and config.tie_embeddings else ours


def from_hf_state_dict(state_dict: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """HF tensors under our names, in the layout our checkpoints store (tied head omitted)."""
    out = {}
    for name, t in state_dict.items():
        ours = _kept_name(name, config)
        if ours is not None:
            out[ours] = t
    return out


# -- configs -----------------------------------------------------------------------------


def check_llama_expressible(config: ModelConfig, target: str = "LlamaForCausalLM") -> None:
    """HFError unless a plain LLaMA (softmax attention, rotary positions) computes `config`'s function.

    Shared by the Hugging Face and GGUF exports; `target` names the consumer in the message.
    Dropout is not refused: it only acts in training, and the exported weights compute the same
    function at inference.
    """
    if config.arch != "decoder":
        raise HFError(f"arch={config.arch!r} cannot be exported: {target} only has decoder-only LLaMA models")
    if config.attention not in STANDARD_ATTENTION or config.attention_kwargs:
        raise HFError(
            f"attention={config.attention!r} (attention_kwargs={config.attention_kwargs}) cannot be exported: "
            f"{target} only computes standard softmax attention ({' or '.join(STANDARD_ATTENTION)})"
        )
    if config.pos_encoding != "rope":
        raise HFError(
            f"pos_encoding={config.pos_encoding!r} cannot be exported: {target} only has rotary "
            "positions (pos_encoding='rope')"
        )


def hf_config_dict(
    config: ModelConfig,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """A transformers LlamaConfig dict (config.json) for `config`; HFError if LLaMA cannot express it."""
    check_llama_expressible(config)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        # transformers >= 5 reads rope_parameters, 4.x reads the top-level rope_theta
        "rope_parameters": {"rope_theta": config.rope_base, "rope_type": "default"},
        "rope_theta": config.rope_base,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": None,
        "dtype": _DTYPE_NAMES[dtype],
        "torch_dtype": _DTYPE_NAMES[dtype],  # the 4.x name of the same field
    }


def _rope_settings(d: dict[str, Any], source: str) -> float:
    """The RoPE base; HFError for any RoPE variant other than the plain one."""
    params = d.get("rope_parameters")  # transformers >= 5
    field = "rope_parameters"
    if not params:
        params, field = d.get("rope_scaling"), "rope_scaling"  # transformers 4.x
    params = params or {}
    if not isinstance(params, dict):
        raise HFError(f"{source} field {field}={params!r} is not a JSON object")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in (None, "default"):
        raise HFError(
            f"{source} field {field}.rope_type={rope_type!r} is not supported: only plain RoPE "
            "(rope_type 'default') is implemented, no scaled variants (llama3, linear, dynamic, yarn, ...)"
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise HFError(f"{source} field {field}.partial_rotary_factor is not supported (RoPE covers all of head_dim)")
    return float(params.get("rope_theta", d.get("rope_theta", HF_DEFAULTS["rope_theta"])))


def from_hf_config(d: dict[str, Any], max_seq_len: int | None = None, source: str = "config.json") -> ModelConfig:
    """Our ModelConfig for a Hugging Face LLaMA config.json dict; HFError naming the field otherwise.

    max_seq_len caps max_position_embeddings (the RoPE tables and default cache are this long).
    """
    model_type = d.get("model_type", "llama")
    if model_type != "llama":
        raise HFError(f"{source} field model_type={model_type!r} is not supported; only 'llama' converts")
    archs = d.get("architectures") or ["LlamaForCausalLM"]
    if archs != ["LlamaForCausalLM"]:
        raise HFError(f"{source} field architectures={archs} is not supported; only LlamaForCausalLM converts")
    if d.get("hidden_act", "silu") != "silu":
        raise HFError(f"{source} field hidden_act={d['hidden_act']!r} is not supported; LLaMA's MLP uses silu")
    for field in ("attention_bias", "mlp_bias"):
        if d.get(field):
            raise HFError(f"{source} field {field}=true is not supported: this model has no bias terms")
    if d.get("quantization_config"):
        raise HFError(
            f"{source} field quantization_config: pre-quantised checkpoints are not supported; "
            "convert the float checkpoint and quantise it with quantize.py"
        )
    rope_base = _rope_settings(d, source)

    def get(key: str) -> Any:
        v = d.get(key)
        return HF_DEFAULTS[key] if v is None else v

    n_heads = int(get("num_attention_heads"))
    seq = int(get("max_position_embeddings"))
    if max_seq_len is not None and max_seq_len > seq:  # a cap above the model's context would do nothing
        raise HFError(
            f"--max-seq-len {max_seq_len} is above {source} field max_position_embeddings={seq}; "
            f"it only lowers the context: pass at most {seq} or leave it out"
        )
    try:
        return ModelConfig(
            vocab_size=int(get("vocab_size")),
            dim=int(get("hidden_size")),
            n_layers=int(get("num_hidden_layers")),
            n_heads=n_heads,
            n_kv_heads=int(d.get("num_key_value_heads") or n_heads),
            head_dim=d.get("head_dim"),  # None: hidden_size // num_attention_heads, as in transformers
            intermediate_size=int(get("intermediate_size")),
            norm_eps=float(get("rms_norm_eps")),
            rope_base=rope_base,
            max_seq_len=min(seq, max_seq_len) if max_seq_len else seq,
            tie_embeddings=bool(get("tie_word_embeddings")),
        )
    except ConfigError as e:
        raise HFError(f"{source} describes a model this toolkit cannot build: {e}") from None


# -- reading an HF directory, one shard at a time ----------------------------------------------


def hf_weight_files(hf_dir: str | Path) -> list[Path]:
    """The weight files of an HF directory: sharded (index JSON) or single, safetensors preferred."""
    hf_dir = Path(hf_dir)
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = hf_dir / index_name
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise HFError(f"{index} is not a valid shard index ({e}); re-download it") from None
            files = [hf_dir / name for name in sorted(set(weight_map.values()))]
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise HFError(f"{index} lists shard(s) {', '.join(missing[:3])} that are missing; download all shards")
            return files
        if (hf_dir / single).exists():
            return [hf_dir / single]
    raise HFError(
        f"{hf_dir} has no model.safetensors, pytorch_model.bin or shard index; pass the directory of a "
        "Hugging Face LLaMA checkpoint"
    )


def iter_hf_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every weight, one file at a time.

    Tensors come back memory-mapped (safetensors, and torch.load with mmap=True): their pages are
    read from disk when touched and belong to the page cache, which the kernel can drop.
    """
    for path in files:
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    for name in f.keys():
                        yield name, f.get_tensor(name)
            except Exception as e:  # safetensors raises its own error type for bad headers and short files
                raise HFError(f"{path} is truncated or corrupt ({str(e).splitlines()[0]}); re-download it") from None
        else:
            # legacy pickle format: weights_only refuses anything but tensors, mmap avoids a full read
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise HFError(f"{path} cannot be read as plain tensors ({str(e).splitlines()[0]})") from None
            yield from state.items()
            del state


def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    path = Path(hf_dir) / "config.json"
    if not Path(hf_dir).is_dir():
        raise HFError(f"{hf_dir} is not a directory; pass the directory of a Hugging Face LLaMA checkpoint")
    if not path.exists():
        raise HFError(f"{path} is missing; a Hugging Face checkpoint directory needs its config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise HFError(f"{path} is not valid JSON ({e}); re-download it") from None


def _check_converted(model: Transformer, state: dict[str, torch.Tensor], hf_dir: Path) -> None:
    """Every tensor config.json implies is present with its shape; errors use the HF names."""
    expected = model_state_for_saving(model)
    missing = [ours_to_hf_name(n) for n in expected if n not in state]
    if missing:
        raise HFError(
            f"{hf_dir} lacks tensor(s) {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} that its "
            "config.json implies; the weights are incomplete or belong to another model"
        )
    for name, t in state.items():
        if name not in expected:  # e.g. layers beyond num_hidden_layers
            raise HFError(f"{hf_dir} has tensor {ours_to_hf_name(name)} that its config.json does not describe")
        if tuple(t.shape) != tuple(expected[name].shape):
            raise HFError(
                f"{hf_dir}: tensor {ours_to_hf_name(name)} has shape {tuple(t.shape)} but config.json implies "
                f"{tuple(expected[name].shape)}"
            )


def _hf_tokenizer(hf_dir: Path, config: ModelConfig) -> tuple[SentencePieceTokenizer | None, str]:
    """The sentencepiece tokenizer.model of an HF directory, or None and the reason why not."""
    sp_path = hf_dir / SP_FILE
    if not sp_path.exists():
        return None, f"{hf_dir} has no sentencepiece {SP_FILE}"
    try:
        tokenizer = SentencePieceTokenizer(sp_path)
    except TokenizerError as e:  # e.g. Llama 3's tiktoken file under the same name
        return None, str(e)
    if tokenizer.vocab_size > config.vocab_size:
        raise HFError(f"{sp_path} has {tokenizer.vocab_size} tokens but config.json vocab_size is {config.vocab_size}")
    return tokenizer, ""


def convert_hf_checkpoint(
    hf_dir: str | Path,
    out: str | Path,
    dtype: torch.dtype | None = None,
    max_seq_len: int | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Convert a local HF LLaMA directory into our checkpoint directory `out` (written atomically).

    dtype None keeps the stored dtype. The sentencepiece tokenizer.model is copied when present.
    Memory: the converted tensors are the memory-mapped shard tensors themselves (or, with a
    dtype, one cast copy each, made as the shard is read), and the model they are saved through
    lives on the meta device, so the peak is about one checkpoint, never two.
    """
    hf_dir, out = Path(hf_dir), Path(out)
    raw = read_hf_config(hf_dir)
    config = from_hf_config(raw, max_seq_len, source=str(hf_dir / "config.json"))
    tokenizer, no_tokenizer_reason = _hf_tokenizer(hf_dir, config)
    files = hf_weight_files(hf_dir)
    state: dict[str, torch.Tensor] = {}
    for path in files:
        for name, t in iter_hf_tensors([path]):
            try:
                ours = _kept_name(name, config)
            except HFError as e:
                raise HFError(f"{path}: {e}") from None
            if ours is not None:
                state[ours] = t.to(dtype) if dtype is not None else t
        log(f"read {path.name} ({len(state)} tensors so far)")

    # A model on the meta device costs no memory; assign=True makes the converted tensors its
    # parameters (no copy), so save_checkpoint writes them straight out.
    with torch.device("meta"):
        model = Transformer(config)
    _check_converted(model, state, hf_dir)
    model.load_state_dict(state, strict=False, assign=True)

    save_checkpoint(out, model, tokenizer)
    if tokenizer is None:
        print(f"warning: {no_tokenizer_reason}; {out} has no tokenizer: add one before generating", file=sys.stderr)
    return out


# -- export ----------------------------------------------------------------------------------


def _hf_tokenizer_files(tok: SentencePieceTokenizer) -> dict[str, str]:
    """tokenizer_config.json and special_tokens_map.json for transformers' LlamaTokenizer."""
    sp = tok.sp
    special = {
        "bos_token": sp.id_to_piece(tok.bos_id) if tok.bos_id is not None else None,
        "eos_token": sp.id_to_piece(tok.eos_id) if tok.eos_id is not None else None,
        "unk_token": sp.id_to_piece(sp.unk_id()) if sp.unk_id() >= 0 else None,
    }
    special = {k: v for k, v in special.items() if v is not None}
    tok_config = {
        "tokenizer_class": "LlamaTokenizer",
        **special,
        "add_bos_token": tok.bos_id is not None,  # LLaMA prompts start with bos
        "add_eos_token": False,
        "legacy": False,  # legacy=True would add a space after every special token
        "model_max_length": None,
    }
    return {
        "tokenizer_config.json": json.dumps(tok_config, indent=2) + "\n",
        "special_tokens_map.json": json.dumps(special, indent=2) + "\n",
    }


def read_exportable(
    checkpoint_dir: Path, target: str
) -> tuple[ModelConfig, SentencePieceTokenizer, dict[str, torch.Tensor]]:
    """Config, sentencepiece tokenizer and float weights of a checkpoint a plain LLaMA can hold.

    HFError (one line, naming the checkpoint and `target`, the consumer) for quantised weights, a
    char tokenizer, or a configuration a LLaMA cannot compute.
    """
    config, raw = read_config(checkpoint_dir)
    if raw.get("quantization"):
        raise HFError(
            f"{checkpoint_dir} holds quantised weights (config.json has a quantization block); "
            "export the float checkpoint it was made from"
        )
    check_llama_expressible(config, target)
    try:
        tok = load_tokenizer(checkpoint_dir)
    except TokenizerError as e:
        raise HFError(str(e)) from None
    if not isinstance(tok, SentencePieceTokenizer):
        raise HFError(
            f"{checkpoint_dir} uses a char tokenizer, which {target} cannot load for LLaMA; "
            "train with a sentencepiece tokenizer (python scripts/prepare_data.py --tokenizer sp:N) to export"
        )
    return config, tok, read_weights(checkpoint_dir / WEIGHTS_FILE)


def export_hf(checkpoint_dir: str | Path, out: str | Path) -> Path:
    """Write our checkpoint as a directory that transformers.LlamaForCausalLM.from_pretrained loads."""
    checkpoint_dir, out = Path(checkpoint_dir), Path(out)
    if out.resolve() == checkpoint_dir.resolve():
        raise HFError(f"--out {out} is the checkpoint itself; export into a new directory")
    config, tok, state = read_exportable(checkpoint_dir, "transformers")
    dtypes = {t.dtype for t in state.values()}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    hf_state = {k: v.contiguous() for k, v in to_hf_state_dict(state, config).items()}
    hf_cfg = hf_config_dict(config, tok.bos_id, tok.eos_id, dtype)

    tmp = staging_dir(out)
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
        gen = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        save_file(hf_state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save(tmp)
        for name, text in _hf_tokenizer_files(tok).items():
            (tmp / name).write_text(text)
        commit_directory(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
