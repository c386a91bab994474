"""GGUF export for llama.cpp (running the files is scripts/llamacpp.py's, for the benchmark and tests).

A GGUF file is one header of key/value metadata (hyper-parameters, the vocabulary) followed by
the tensors under llama.cpp's names. Names go ours -> Hugging Face (gpt.hf) -> GGUF (the `gguf`
package's own table for the HF LLaMA layout), so there is no third name table to keep in sync.

One layout difference matters: our RoPE, like transformers', rotates the two halves of each head
(rotate_half), while llama.cpp's llama architecture rotates adjacent pairs (the original LLaMA
layout). The rows of wq and wk are therefore permuted on export, as llama.cpp's own HF converter
does; the parity tests against llama.cpp are what prove it.

What a plain LLaMA cannot compute is refused with the rules of the Hugging Face export
(gpt.hf.read_exportable): non-standard attention, non-rotary positions, quantised checkpoints,
char tokenizers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpt.config import ModelConfig
from gpt.errors import GGUFError  # noqa: F401  (re-exported: gpt.gguf_export.GGUFError)
from gpt.hf import ours_to_hf_name, read_exportable
from gpt.tokenizer import SentencePieceTokenizer

OUTTYPES = ("f32", "f16", "q8_0", "q4_0")


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise GGUFError("the gguf package is not installed; pip install gguf protobuf (or the llama extra)") from None
    return gguf


# -- tensors ---------------------------------------------------------------------------------


def interleave_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection from the half-split RoPE layout to the interleaved (adjacent pairs) one.

    Within each head, output channel i of the first half and i of the second half form rotation
    pair i; llama.cpp wants that pair at channels 2i and 2i+1.
    """
    out, d_in = w.shape
    head_dim = out // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, d_in).transpose(1, 2).reshape(out, d_in)


def gguf_tensors(state: dict[str, torch.Tensor], config: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """Our float tensors under llama.cpp names, as float32 arrays with q/k rows interleaved.

    One at a time, so that an f16 or q8_0 export holds one float32 copy at a time, not the whole
    model in float32. A tied head is not written: llama.cpp's llama architecture uses token_embd
    for the output when output.weight is absent (parity with a tied model is tested).
    """
    gguf = _gguf()
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.n_layers)
    for name, t in state.items():
        if name == "output.weight" and config.tie_embeddings:
            continue
        t = t.float()
        if name.endswith("attention.wq.weight"):
            t = interleave_rope_rows(t, config.n_heads)
        elif name.endswith("attention.wk.weight"):
            t = interleave_rope_rows(t, config.n_kv_heads)
        hf_name = ours_to_hf_name(name)
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight",))
        if gguf_name is None:
            raise GGUFError(f"tensor {name} has no llama.cpp counterpart; only plain LLaMA weights export")
        yield gguf_name, t.contiguous().numpy()


def _add_tensor(writer: Any, name: str, data: np.ndarray, outtype: str) -> None:
    """Norm gains (1-D) stay f32 in every outtype, as llama.cpp's converter keeps them."""
    gguf = _gguf()
    if data.ndim == 1 or outtype == "f32":
        writer.add_tensor(name, data.astype(np.float32))
    elif outtype == "f16":
        writer.add_tensor(name, data.astype(np.float16))
    else:
        qtype = gguf.GGMLQuantizationType.Q8_0 if outtype == "q8_0" else gguf.GGMLQuantizationType.Q4_0
        if data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] != 0:
            writer.add_tensor(name, data.astype(np.float16))  # rows too short for 32-value blocks
            return
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)


# -- metadata --------------------------------------------------------------------------------


def _add_hparams(writer: Any, config: ModelConfig, outtype: str) -> None:
    gguf = _gguf()
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    # head_dim may differ from dim / n_heads; llama.cpp reads it from the key/value lengths
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_base)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    }
    writer.add_file_type(file_type[outtype])
    if outtype in ("q8_0", "q4_0"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _token_type(piece: Any, gguf: Any) -> int:
    """GGUF token type of a sentencepiece piece (the two enums number the types alike).

    A one-character user-defined piece (our "\n") is written as a normal piece: llama.cpp splits
    user-defined pieces out of the text first and then adds the dummy-prefix space to the text
    after each of them, which sentencepiece does not (tokenization parity is tested). As a normal
    piece it is still always its own token, because sentencepiece never merges user-defined
    symbols into longer pieces.
    """
    if piece.type == piece.USER_DEFINED and len(piece.piece) == 1:
        return int(gguf.TokenType.NORMAL)
    return int(piece.type)


def _add_vocab(writer: Any, tok: SentencePieceTokenizer, vocab_size: int) -> None:
    """The sentencepiece pieces with their scores and types.

    A BPE model becomes llama.cpp's "llama" tokenizer (pair merges by score, as LLaMA's), a unigram
    model its "t5" one (Viterbi over piece scores; it has no byte fallback, so characters outside
    the vocabulary become <unk> there where sentencepiece spells them in bytes).

    sentencepiece's piece types (normal, unknown, control, user-defined, unused, byte) are numbered
    as GGUF's token types, so they are copied. Rows of the embedding beyond the tokenizer (a
    vocab_size padded for speed) get unused placeholder pieces, as llama.cpp's converter does.
    """
    from sentencepiece import sentencepiece_model_pb2

    gguf = _gguf()
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tok.sp.serialized_model_proto())
    pieces = [p.piece.encode("utf-8") for p in proto.pieces]
    scores = [p.score for p in proto.pieces]
    types = [_token_type(p, gguf) for p in proto.pieces]
    for i in range(len(pieces), vocab_size):
        pieces.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.UNUSED))
    unigram = proto.trainer_spec.model_type == proto.trainer_spec.UNIGRAM
    # llama.cpp's "llama" tokenizer merges pairs by score (BPE); a unigram model needs its Viterbi one
    writer.add_tokenizer_model("t5" if unigram else "llama")
    if unigram:
        writer.add_remove_extra_whitespaces(proto.normalizer_spec.remove_extra_whitespaces)
        writer.add_precompiled_charsmap(proto.normalizer_spec.precompiled_charsmap)
    writer.add_tokenizer_pre("default")
    writer.add_token_list(pieces)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(proto.normalizer_spec.add_dummy_prefix)
    if tok.bos_id is not None:
        writer.add_bos_token_id(tok.bos_id)
    if tok.eos_id is not None:
        writer.add_eos_token_id(tok.eos_id)
    if tok.sp.unk_id() >= 0:
        writer.add_unk_token_id(tok.sp.unk_id())
    writer.add_add_bos_token(tok.bos_id is not None)  # LLaMA prompts start with bos, as in our HF export
    writer.add_add_eos_token(False)


# -- export ----------------------------------------------------------------------------------


def export_gguf(checkpoint_dir: str | Path, out: str | Path, outtype: str = "f32") -> Path:
    """Write our checkpoint as a GGUF file (llama architecture) that llama.cpp loads; atomic."""
    checkpoint_dir, out = Path(checkpoint_dir), Path(out)
    if outtype not in OUTTYPES:
        raise GGUFError(f"--outtype {outtype!r} is not supported; choose one of {', '.join(OUTTYPES)}")
    if out.is_dir():
        raise GGUFError(f"--out {out} is a directory; pass a file name such as {out / 'model.gguf'}")
    gguf = _gguf()
    config, tok, state = read_exportable(checkpoint_dir, "llama.cpp")
    if tok.vocab_size > config.vocab_size:
        raise GGUFError(
            f"{checkpoint_dir}: the tokenizer has {tok.vocab_size} tokens but vocab_size is {config.vocab_size}"
        )

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    writer = gguf.GGUFWriter(str(tmp), "llama")
    try:
        writer.add_name(checkpoint_dir.resolve().name)
        _add_hparams(writer, config, outtype)
        _add_vocab(writer, tok, config.vocab_size)
        for name, data in gguf_tensors(state, config):
            _add_tensor(writer, name, data, outtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out
