"""Run by tests/test_tp.py under torchrun: greedy decoding of each checkpoint, one process (the
reference, on the full model) and tensor parallel (the same model sharded over every rank),
eager and compiled, with the fp32 logits of every step. Rank 0 writes the results as JSON.

    torchrun --nproc_per_node 2 tests/tp_worker.py OUT.json PROMPT_TOKENS NEW_TOKENS CKPT[:eager] [CKPT...]

(":eager": that checkpoint's compiled run is skipped.)
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from gpt.checkpoint import load_checkpoint
from gpt.fast import apply_tricks, compile_options
from gpt.quant import Int4Linear, Int8Linear
from gpt.tp import init_from_env, shard_model, sharded_bytes


def fp32_arithmetic(model: torch.nn.Module) -> torch.nn.Module:
    """int8 / int4 layers on their dequantise path (fp32 activations): the CPU kernels round the
    activations (bf16 / int8), per shard under tensor parallelism, which no 1e-5 test survives."""
    for m in model.modules():
        if isinstance(m, Int8Linear):
            m.use_kernel, m._packed = False, None
        elif isinstance(m, Int4Linear):
            m._packed, m._kernel_weight = None, None
    return model


@torch.no_grad()  # as Generator: decoding never records a graph for the backward
def greedy(model, prompt: list[int], new_tokens: int, compiled: bool) -> tuple[list[int], torch.Tensor, int]:
    """Tokens, the (steps, vocab) logits each step picked from, and the graphs compiled."""
    net = apply_tricks(model, "all") if compiled else model
    cache_len = 64
    net.setup_caches(1, cache_len, dtype=torch.float32)

    def step(tok, pos):
        return net(tok, pos)[:, -1].float()

    decode = step
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    if compiled:
        torch._dynamo.reset()
        torch._dynamo.config.error_on_recompile = True
        decode = torch.compile(step, fullgraph=True, dynamic=False, **compile_options("all"))
    logits = [step(torch.tensor([prompt]), torch.arange(len(prompt)))]  # eager prefill, as Generator's default
    toks = [int(logits[-1].argmax())]
    for i in range(new_tokens - 1):
        logits.append(decode(torch.tensor([[toks[-1]]]), torch.tensor([len(prompt) + i])))
        toks.append(int(logits[-1].argmax()))
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - before
    torch._dynamo.config.error_on_recompile = False
    return toks, torch.cat(logits), graphs


def main() -> None:
    out, n_prompt, n_new, *checkpoints = sys.argv[1:]
    torch.set_num_threads(1)
    tp = init_from_env()
    results = {}
    g = torch.Generator().manual_seed(0)
    for spec in checkpoints:
        ckpt, _, only = spec.partition(":")
        model, tok = load_checkpoint(ckpt)
        prompt = torch.randint(0, tok.vocab_size, (int(n_prompt),), generator=g).tolist()
        fp32_arithmetic(model)
        ref_tokens, ref_logits, _ = greedy(model, prompt, int(n_new), compiled=False)
        full_bytes = sharded_bytes(model)
        shard_model(model, tp)
        fp32_arithmetic(model)
        row = {"reference": ref_tokens, "full_bytes": full_bytes, "rank_bytes": sharded_bytes(model)}
        for mode in ("eager",) if only == "eager" else ("eager", "compiled"):
            toks, logits, graphs = greedy(model, prompt, int(n_new), compiled=mode == "compiled")
            row[mode] = {"tokens": toks, "max_abs_diff": float((logits - ref_logits).abs().max()), "graphs": graphs}
        row["kv_heads_per_rank"] = model.layers[0].attention.mix.kv_cache.k_cache.size(1)
        gathered = [None] * tp.world_size
        dist.all_gather_object(gathered, row)
        results[ckpt] = gathered
    if tp.is_main:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
