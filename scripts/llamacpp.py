"""Running a GGUF file with llama-cpp-python: the llama.cpp rows of scripts/bench_generate.py and
the parity tests of tests/test_gguf.py (not part of the library: gpt.gguf_export only writes GGUF).

Every function raises ImportError without llama-cpp-python (make install-llama).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np


def open_llama(gguf_path: str | Path, extra_buffers: bool = False, **kwargs: Any) -> Any:
    """A llama_cpp.Llama on `gguf_path`; kwargs go to its constructor.

    extra_buffers=False loads the weights without llama.cpp's extra CPU buffer types (the AMX and
    repacked layouts). Here llama-cpp-python 0.3.36 was built with AMX because /proc/cpuinfo
    advertises it, and its AMX matmul then segfaults on any q8_0 batch of more than one token
    (a prompt). Llama() has no switch for this, so its default model parameters are replaced
    for the duration of the constructor only. Raises ImportError without llama-cpp-python.
    """
    import llama_cpp
    import llama_cpp.llama_cpp as lib

    defaults = lib.llama_model_default_params

    def params() -> Any:
        p = defaults()
        p.use_extra_bufts = extra_buffers
        return p

    lib.llama_model_default_params = params
    try:
        return llama_cpp.Llama(model_path=str(gguf_path), **{"verbose": False, **kwargs})
    finally:
        lib.llama_model_default_params = defaults


def llama_cpp_decode_speed(
    gguf_path: str | Path,
    prompt_tokens: list[int],
    n_new: int = 200,
    n_threads: int = 2,
    extra_buffers: bool = True,
) -> dict[str, float]:
    """llama.cpp's batch-1 greedy decoding speed on a GGUF file, through llama-cpp-python.

    Measures what our decode loop measures: one prefill of the prompt, then n_new single-token
    forwards, each followed by an argmax over the last logits (numpy on llama.cpp's own logits
    buffer: no copy, no sampler chain). A first, untimed, shorter run pages the weights in and
    starts the thread pool. The KV cache has llama.cpp's default type (f16). Returns prompt_s
    (prefill seconds), decode_s, tokens_per_s (n_new / decode_s) and n_new.

    extra_buffers=True keeps llama.cpp's repacked/AMX weight layouts, which decoded q8_0 1.3-1.7x
    faster here; because the AMX kernel crashes on batches (see open_llama), the prompt is then
    fed one token at a time, so prompt_s is a token-by-token prefill. extra_buffers=False prefills
    in one batch with the plain layouts.
    """
    n_ctx = len(prompt_tokens) + n_new + 1
    batch = 1 if extra_buffers else max(len(prompt_tokens), 1)
    llm = open_llama(
        gguf_path,
        extra_buffers,
        n_ctx=n_ctx,
        n_batch=batch,
        n_ubatch=batch,
        n_threads=n_threads,
        n_threads_batch=n_threads,
        logits_all=False,
    )
    n_vocab = llm.n_vocab()

    def next_token() -> int:
        return int(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,)).argmax())

    def run(n: int) -> tuple[float, float]:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt_tokens)
        tok = next_token()
        t1 = time.perf_counter()
        for _ in range(n):
            llm.eval([tok])
            tok = next_token()
        return t1 - t0, time.perf_counter() - t1

    try:
        run(min(n_new, 16))
        prompt_s, decode_s = run(n_new)
    finally:
        llm.close()
    return {"prompt_s": prompt_s, "decode_s": decode_s, "tokens_per_s": n_new / decode_s, "n_new": float(n_new)}
