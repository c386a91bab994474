"""Generate text from a checkpoint: prefill, then a (compiled) one-token decode step over a static KV cache.

    python generate.py --prompt "ROMEO:" --max-new-tokens 200
    python generate.py --checkpoint out/stories15M --prompt "Once upon a time" --compile --stream
    python generate.py --prompt "a" --prompt "bc" --temperature 0 --json     # a batch of two prompts
    python generate.py --draft-checkpoint out/small --speculate-k 4 --temperature 0 --prompt "ROMEO:"
    echo "ROMEO:" | python generate.py                                       # the prompt from stdin
    python generate.py --interactive --compile                               # read prompts, keep the step warm
    python generate.py --serve --compile --slots 4 --port 8000               # an OpenAI-compatible server

The text goes to stdout and the speed report to stderr (--json prints both as one object).
Quantized checkpoints (written by quantize.py) load with no extra flag, and so do checkpoints of a
plug-in attention variant (config.json records where it came from). --attention runs the checkpoint
with another variant: a registered name, or a plug-in new/place/my_attn.py:NAME (package.module:NAME),
e.g. when the recorded file has moved; its parameters must match the checkpoint's.

Tensor parallel (docs/distributed.md): under a launcher, every rank holds 1/N of each block and
only rank 0 prints; there is no flag, as in gpt-fast (WORLD_SIZE > 1 turns it on):
    torchrun --nproc_per_node 2 generate.py --compile --checkpoint out/stories15M --prompt "Once"
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
        --mixed_precision no --dynamo_backend no generate.py --checkpoint out/stories15M
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from gpt.attention import resolve_attention
from gpt.checkpoint import load_checkpoint
from gpt.cli import (
    DEFAULT_CHECKPOINT,
    Parser,
    add_checkpoint,
    add_device,
    add_dtype,
    main_guard,
    refuse_unless,
    resolve_device,
)
from gpt.compile_cache import use_inductor_cache_dir
from gpt.errors import CliError, GptError
from gpt.fast import DEFAULT_TRICKS, SERVE_TRICKS, TRICKS
from gpt.generation import Generator
from gpt.tp import TPInfo, broadcast_seed, init_from_env, launched_world_size, shard_model

DEFAULT_PROMPT = "\n"
DEFAULT_SPECULATE_K = 5


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="python generate.py", description=__doc__)
    add_checkpoint(ap)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append", help="prompt text; repeat the flag for a batch of prompts")
    src.add_argument("--prompt-file", help="read the prompt from this file")
    ap.add_argument("--max-new-tokens", type=int, default=200, help="tokens to add (default 200; 0 = fill the context)")
    ap.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    ap.add_argument("--top-k", type=int, default=200, help="sample among the k likeliest tokens (default 200; 0 = off)")
    ap.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with this mass")
    ap.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    ap.add_argument("--num-samples", type=int, default=1, help="samples per prompt (run as one batch)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decode step (fullgraph, captured once)")
    ap.add_argument(
        "--no-aot",
        action="store_true",
        help="with --compile: torch.compile the decode step in this process instead of loading (or building once) "
        "its ahead-of-time package from ~/.cache/gpt/aot (docs/generation.md)",
    )
    ap.add_argument("--compile-prefill", action="store_true", help="also compile the prefill (dynamic shapes)")
    ap.add_argument(
        "--tricks",
        default=None,
        help=f"with --compile: speed tricks of the compiled decode step, comma-separated from {', '.join(TRICKS)}; "
        f"'none' = plain torch ops (default: {','.join(DEFAULT_TRICKS)}; with --serve {','.join(SERVE_TRICKS)}; "
        "see PERF-NOTES.md)",
    )
    add_device(ap)
    add_dtype(ap)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--stream", action="store_true", help="print tokens as they are produced")
    ap.add_argument("--json", action="store_true", help="print texts, tokens and the report as one JSON object")
    ap.add_argument("--interactive", action="store_true", help="read prompts from stdin, one per line, until EOF")
    ap.add_argument(
        "--attention",
        metavar="SPEC",
        default=None,
        help="run the checkpoint with this attention variant: a registered name, or a plug-in "
        "path/to/file.py:NAME or package.module:NAME (e.g. when the file recorded in the checkpoint has moved); "
        "default: the checkpoint's",
    )
    ap.add_argument("--draft-checkpoint", default=None, help="a small model for speculative decoding")
    ap.add_argument(
        "--speculate-k",
        type=int,
        default=None,
        help=f"with --draft-checkpoint: draft tokens per speculative step (default {DEFAULT_SPECULATE_K})",
    )
    srv = ap.add_argument_group("serving (--serve; docs/serving.md)")
    srv.add_argument("--serve", action="store_true", help="run the OpenAI-compatible HTTP server instead")
    srv.add_argument("--host", default=None, help=f"with --serve: address to listen on (default {DEFAULT_HOST})")
    srv.add_argument("--port", type=int, default=None, help=f"with --serve: port (default {DEFAULT_PORT})")
    srv.add_argument("--slots", type=int, default=None, help="with --serve: requests decoded together (default 4)")
    srv.add_argument(
        "--max-queue", type=int, default=None, help="with --serve: requests waiting for a slot before 429 (default 64)"
    )
    srv.add_argument(
        "--cache-len",
        type=int,
        default=None,
        help="with --serve: KV cache slots per request = the longest prompt + max_tokens served "
        "(default: the model's context; smaller reads less per decode step)",
    )
    srv.add_argument(
        "--drain-s",
        type=float,
        default=None,
        help="with --serve: seconds in-flight requests may run on after Ctrl-C / SIGTERM (default 5)",
    )
    srv.add_argument(
        "--engine-thread",
        action="store_true",
        help="with --serve: run the model on a thread of the HTTP server's process instead of a process "
        "of its own (one process; the two then share Python's GIL; docs/serving.md)",
    )
    return ap


DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000
# flags of one generation run, which a server (whose requests carry their own settings) refuses
GENERATION_ONLY = ("--prompt", "--prompt-file", "--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed",
                   "--num-samples", "--stream", "--json", "--interactive", "--draft-checkpoint", "--speculate-k",
                   "--compile-prefill")  # fmt: skip


def check_serve_args(args: argparse.Namespace, argv: Sequence[str]) -> None:
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    if not args.serve:
        for flag in ("--host", "--port", "--slots", "--max-queue", "--cache-len", "--drain-s", "--engine-thread"):
            refuse_unless(flag not in given, flag, "--serve")
        return
    for flag in GENERATION_ONLY:
        if flag in given:
            why = " (speculative decoding is not served)" if flag in ("--draft-checkpoint", "--speculate-k") else ""
            raise CliError(
                f"{flag} sets one generation run; a server's requests carry their own settings{why}; drop it"
            )
    if args.port is not None and not 0 < args.port < 65536:
        raise CliError(f"--port={args.port} must be in 1..65535")
    if args.slots is not None and args.slots < 1:
        raise CliError(f"--slots={args.slots} must be >= 1")
    if args.max_queue is not None and args.max_queue < 0:
        raise CliError(f"--max-queue={args.max_queue} must be >= 0")
    if args.cache_len is not None and args.cache_len < 2:
        raise CliError(f"--cache-len={args.cache_len} must be >= 2 (a prompt token and a new one)")
    if args.drain_s is not None and not args.drain_s >= 0:
        raise CliError(f"--drain-s={args.drain_s} must be >= 0 seconds")


def serve(args: argparse.Namespace) -> int:
    """--serve: load the checkpoint (GET /health is 503 until it is ready) and serve. The model runs
    in a process of its own (gpt.serving.remote), or with --engine-thread on a thread of this one."""
    from gpt.serving.app import create_app
    from gpt.serving.app import serve as run_server
    from gpt.serving.engine import Engine, EngineConfig
    from gpt.serving.remote import EngineProcess, EngineSpec
    from gpt.tokenizer import load_tokenizer

    config = EngineConfig(
        slots=args.slots or 4,
        max_queue=64 if args.max_queue is None else args.max_queue,
        compile=args.compile,
        tricks=args.tricks,
        aot=not args.no_aot,
        cache_len=args.cache_len,
    )
    config.validate()
    device = resolve_device(args.device)
    overrides = {"attention": resolve_attention(args.attention)} if args.attention else None
    host, port = args.host or DEFAULT_HOST, args.port or DEFAULT_PORT

    def load() -> Engine | EngineProcess:
        if args.engine_thread:
            model, tokenizer = load_checkpoint(args.checkpoint, device=device, dtype=args.dtype, overrides=overrides)
            engine: Engine | EngineProcess = Engine(model, tokenizer, config)
            engine.start()
        else:
            threads = torch.get_num_threads() if args.threads else None
            spec = EngineSpec(str(args.checkpoint), config, str(device), args.dtype, overrides, threads)
            engine = EngineProcess(spec, load_tokenizer(args.checkpoint))
        engine.wait_ready()
        where = "on a thread of this process" if args.engine_thread else "in its own process"
        print(
            f"serving {args.checkpoint} on http://{host}:{port} ({config.slots} slots, "
            f"{f'compiled in {engine.compile_s:.1f} s' if config.compile else 'eager'}, the model {where})",
            file=sys.stderr,
            flush=True,
        )
        return engine

    drain_s = 5.0 if args.drain_s is None else args.drain_s
    run_server(create_app(load, model_name=Path(args.checkpoint).name, drain_s=drain_s), host, port, drain_s)
    return 0


def read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt is not None:
        prompts = args.prompt
    elif args.prompt_file is not None:
        path = Path(args.prompt_file)
        try:
            prompts = [path.read_text(encoding="utf-8")]
        except (OSError, UnicodeDecodeError) as e:
            raise CliError(f"--prompt-file {path}: cannot read it ({e.__class__.__name__}: {e})") from None
    elif not sys.stdin.isatty():
        prompts = [sys.stdin.read()]
    else:
        prompts = [DEFAULT_PROMPT]
    return [p for p in prompts for _ in range(args.num_samples)]


def check_args(args: argparse.Namespace) -> None:
    if args.num_samples < 1:
        raise CliError(f"--num-samples={args.num_samples} must be >= 1")
    if args.max_new_tokens < 0:
        raise CliError(f"--max-new-tokens={args.max_new_tokens} must be >= 1 (or 0 to fill the context)")
    if args.threads is not None and args.threads < 1:
        raise CliError(f"--threads={args.threads} must be >= 1")
    if args.interactive and (args.prompt or args.prompt_file):
        raise CliError("--interactive reads prompts from stdin; drop --prompt / --prompt-file")
    refuse_unless(args.tricks is None or args.compile, "--tricks", "--compile")
    refuse_unless(not args.compile_prefill or args.compile, "--compile-prefill", "--compile")
    refuse_unless(not args.no_aot or args.compile, "--no-aot", "--compile")
    refuse_unless(args.speculate_k is None or args.draft_checkpoint, "--speculate-k", "--draft-checkpoint")
    if args.stream and args.json:
        raise CliError("--stream prints text as it comes and --json prints one object at the end; choose one")
    if not Path(args.checkpoint).exists() and args.checkpoint == DEFAULT_CHECKPOINT:
        raise CliError(
            f"no checkpoint at {DEFAULT_CHECKPOINT}; create it with `python train_ddp.py` (or pass --checkpoint DIR)"
        )


def make_streamer(tokenizer, stream: bool):
    """Print the text of row 0 as it grows (decode the whole row each time: pieces may merge)."""
    if not stream:
        return None
    ids: list[int] = []
    printed = [""]

    def on_token(_step: int, toks: list[int]) -> None:
        ids.append(toks[0])
        text = tokenizer.decode(ids)
        if text.startswith(printed[0]):
            sys.stdout.write(text[len(printed[0]) :])
            sys.stdout.flush()
            printed[0] = text

    return on_token


def run(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    check_serve_args(args, argv)
    check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    # inductor's on-disk caches: a later run reuses the compiled code (see gpt.compile_cache)
    use_inductor_cache_dir()
    if launched_world_size() > 1:
        check_tp_args(args)
    if args.serve:
        return serve(args)
    device = resolve_device(args.device)
    overrides = {"attention": resolve_attention(args.attention)} if args.attention else None
    tp = None
    if launched_world_size() > 1:
        tp = init_from_env(device)
        if device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
    try:
        return generate_run(args, device, overrides, tp)
    finally:
        if tp is not None:
            torch.distributed.destroy_process_group()


def check_tp_args(args: argparse.Namespace) -> None:
    """Tensor parallelism runs one generation on every rank in lockstep; refuse what cannot."""
    for flag, on in (("--serve", args.serve), ("--interactive", args.interactive)):
        if on:
            raise CliError(f"{flag} runs in one process; launch it without torchrun / accelerate launch")


def load_model_for(args: argparse.Namespace, device: torch.device, overrides, tp: TPInfo | None):
    """The checkpoint on `device`; under tensor parallelism read on the CPU first, then this rank's
    shard moved over (the full weights never occupy the accelerator)."""
    if tp is None:
        return load_checkpoint(args.checkpoint, device=device, dtype=args.dtype, overrides=overrides)
    model, tokenizer = load_checkpoint(args.checkpoint, device="cpu", dtype=args.dtype, overrides=overrides)
    model = shard_model(model, tp).to(device)
    if device.type != "cpu":
        for m in model.modules():
            if hasattr(m, "refresh"):  # quantised layers rebuild their kernel buffers for the device
                m.refresh()
    return model, tokenizer


def generate_run(args: argparse.Namespace, device: torch.device, overrides, tp: TPInfo | None) -> int:
    main_rank = tp is None or tp.is_main
    model, tokenizer = load_model_for(args, device, overrides, tp)
    draft = None
    if args.draft_checkpoint:
        draft, _ = load_checkpoint(args.draft_checkpoint, device=device, dtype=args.dtype)
    gen = Generator(
        model,
        tokenizer,
        temperature=args.temperature,
        top_k=args.top_k or None,
        top_p=args.top_p,
        compile=args.compile,
        compile_prefill=args.compile_prefill,
        tricks=args.tricks,
        # a package is one process's step: tensor parallelism keeps torch.compile (its graph holds collectives)
        aot=not args.no_aot and tp is None,
        draft_model=draft,
        speculate_k=args.speculate_k or DEFAULT_SPECULATE_K,
        # interactive: one cache length for every prompt, so the compiled step is captured once
        cache_len=min(model.config.max_seq_len, draft.config.max_seq_len if draft else 1 << 30)
        if args.interactive
        else None,
    )
    max_new = args.max_new_tokens or None
    if args.interactive:
        return interactive(gen, args, max_new)
    prompts = read_prompts(args)
    if args.stream and len(prompts) > 1:
        raise CliError("--stream prints one sequence; use it with one prompt and --num-samples 1")
    stream = args.stream and main_rank
    if stream:
        sys.stdout.write(prompts[0])
    seed = broadcast_seed(args.seed, tp)  # every rank samples the same tokens from the same logits
    result = gen.generate(prompts, max_new, seed=seed, on_token=make_streamer(tokenizer, stream))
    if not main_rank:
        return 0
    if args.json:
        samples = [
            {"prompt": p, "text": t, "tokens": ids}
            for p, t, ids in zip(prompts, result.texts, result.tokens, strict=True)
        ]
        report = {**result.report.to_dict(), "tensor_parallel": tp.world_size if tp else 1}
        print(json.dumps({"samples": samples, "report": report}, ensure_ascii=False))
        return 0
    if args.stream:
        print()
    else:
        for i, (p, t) in enumerate(zip(prompts, result.texts, strict=True)):
            if i:
                print("-" * 40)
            print(p + t)
    sys.stdout.flush()  # the text before the report when both go to one terminal
    print(result.report.format(), file=sys.stderr)
    if tp is not None:
        print(f"tensor parallel: {tp.world_size} ranks ({tp.backend}); the bytes read are one rank's", file=sys.stderr)
    return 0


def interactive(gen: Generator, args: argparse.Namespace, max_new: int | None) -> int:
    while True:
        if sys.stdin.isatty():
            print("prompt> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        prompt = line.rstrip("\n")
        if not prompt:
            continue
        try:
            streamer = make_streamer(gen.tokenizer, args.stream)
            if args.stream:
                sys.stdout.write(prompt)
            result = gen.generate([prompt], max_new, seed=args.seed, on_token=streamer)
        except GptError as e:  # a bad prompt should not end the session
            print(f"error: {e}", file=sys.stderr)
            continue
        print("" if args.stream else prompt + result.texts[0], flush=True)
        r = result.report
        print(
            f"[{r.tokens_per_s:.1f} tokens/s, ttft {r.ttft_s * 1000:.0f} ms, compile {r.compile_s:.1f} s]",
            file=sys.stderr,
        )


def main(argv: Sequence[str] | None = None) -> int:
    return main_guard(run, argv)


if __name__ == "__main__":
    sys.exit(main())
