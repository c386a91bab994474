"""The serving engine: continuous batching over one static KV cache (no HTTP in here).

    engine = Engine(model, tokenizer, EngineConfig(slots=4, compile=True))
    engine.start(); engine.wait_ready()
    req = engine.submit(prompt_ids, SamplingParams(max_tokens=50, temperature=0), sink=outputs.append)
    ...
    engine.stop()

N slots share a KV cache of shape (N, Hkv, S, D). One thread runs the model:

    loop: free the slots of cancelled requests
          admit waiting requests into free slots: prefill them (straight into their rows of
              the shared cache; equal-length neighbours as one batch), sample first tokens
          one decode step over all N slots, (N, 1) tokens at a position per row
          each busy slot takes its token; a finished one frees its slot at once

The decode step is one graph of fixed shape: idle rows decode a dummy token at position 0
of their own row (which the next prefill of that row overwrites) and their output is thrown
away, so requests coming and going never change a shape. Sampling settings are (N,) tensors
(gpt.serving.sampling), so they never change the graph either. Two graphs exist: argmax only
(every busy slot greedy, no logprobs) and the general one; each is captured once.

Prefill runs eager on a second shallow copy of the model whose decode state (KV cache rows,
or a state-keeping variant's own buffers) are views of rows i..i+k of the shared state: one
request is computed exactly as generate.py computes it, and a variant like `linear`, whose
state a chunk at position 0 resets, starts each admitted request from a clean row. Requests
admitted together into consecutive slots with prompts of one length are prefilled as one
batch (no padding). Eager prefill has no shapes to compile, so prompt lengths need no
bucketing.

Speculative decoding is not served (it stays single-request in gpt.generation).
"""

from __future__ import annotations

import collections
import itertools
import random
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gpt import aot
from gpt.compile_cache import enable_compile_caches, remember_vec_isa_probe
from gpt.errors import GenerationError
from gpt.fast import SERVE_TRICKS, apply_tricks, compile_options, parse_tricks
from gpt.generation import float_dtype
from gpt.serving.metrics import ServingMetrics
from gpt.serving.sampling import MAX_TOP_LOGPROBS, greedy_rows, sample_rows
from gpt.serving.text import IncrementalDetokenizer, StopText
from gpt.tokenizer import Tokenizer


class RequestError(GenerationError):
    """A request that cannot be served as asked; `param` names the request field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class QueueFullError(GenerationError):
    """Every slot is busy and the waiting queue is full."""


class EngineStoppedError(GenerationError):
    """The engine is shutting down (or failed to start) and takes no new requests."""


@dataclass
class EngineConfig:
    slots: int = 4  # requests decoded together
    max_queue: int = 64  # requests that may wait for a slot; beyond it submit raises QueueFullError
    cache_len: int | None = None  # slots per row of the KV cache; None = the model's context
    compile: bool = False  # torch.compile the decode step (fullgraph, captured once per graph)
    tricks: str | None = None  # gpt.fast speed tricks of the compiled step (None = gpt.fast.SERVE_TRICKS)
    aot: bool = False  # with compile, on the CPU: the two step graphs as AOTInductor packages (gpt.aot)
    aot_dir: str | None = None  # where packages are kept (None = ~/.cache/gpt/aot)

    def validate(self) -> None:
        if self.slots < 1:
            raise GenerationError(f"slots={self.slots} must be >= 1 (--slots)")
        if self.max_queue < 0:
            raise GenerationError(f"max_queue={self.max_queue} must be >= 0 (--max-queue)")


@dataclass
class SamplingParams:
    max_tokens: int | None = 16  # None = until the context is full
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None  # same seed, same request -> same tokens
    stop: Sequence[str] = ()
    logprobs: int | None = None  # None = off; n = the chosen token's logprob and n alternatives
    ignore_eos: bool = False


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # (token, logprob), likeliest first


@dataclass
class Output:
    """What a request's sink receives: the new text and tokens since the last Output."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error" on the last Output
    prompt_tokens: int = 0
    completion_tokens: int = 0


Sink = Callable[[Output], None]


@dataclass
class Request:
    id: int
    prompt_ids: list[int]
    params: SamplingParams
    sink: Sink
    arrival: float = field(default_factory=time.perf_counter)
    cancelled: bool = False

    def cancel(self) -> None:
        """Ask the engine to drop the request; its slot is freed before the next decode step."""
        self.cancelled = True


class _Sequence:
    """A request in a slot: host-side bookkeeping of its tokens and text."""

    def __init__(self, req: Request, tokenizer: Tokenizer, key: int) -> None:
        self.req = req
        self.key = key
        self.generated: list[int] = []
        self.detok = IncrementalDetokenizer(tokenizer, req.prompt_ids)
        self.stop = StopText(req.params.stop)
        # (logprob entry, token, start, end of its text) not yet released to the client
        self.pending: list[tuple[TokenLogprob | None, int, int, int]] = []
        self.last_time = 0.0

    @property
    def pos(self) -> int:
        """Cache slot the newest token is written to when it is fed back."""
        return len(self.req.prompt_ids) + len(self.generated) - 1


class Engine:
    """Continuous batching over N slots; see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        config: EngineConfig | None = None,
        metrics: ServingMetrics | None = None,
        after_round: Callable[[], None] | None = None,
    ) -> None:
        """`after_round` is called on the engine thread after each round of prefills and a decode
        step, once the round's outputs have gone to their sinks (gpt.serving.remote sends them
        across its pipe as one message there)."""
        self.config = config = config or EngineConfig()
        config.validate()
        for m in model.modules():
            if getattr(m, "replaces_kv_cache", False) and not hasattr(m, "setup_cache"):
                raise GenerationError(f"attention {model.config.attention!r} keeps no decode state to serve from")
        self.model, self.tokenizer = model, tokenizer
        self.metrics = metrics or ServingMetrics()
        self.after_round = after_round
        ctx = model.config.max_seq_len
        self.cache_len = min(config.cache_len or ctx, ctx)
        self.n = config.slots
        self.device = model.tok_embeddings.weight.device
        self.eos = getattr(tokenizer, "eos_id", None)
        self.tricks = sorted(parse_tricks(config.tricks, SERVE_TRICKS)) if config.compile else []
        self.aot = config.aot and config.compile and self.device.type == "cpu"
        if self.aot:
            self.tricks = aot.package_tricks(self.tricks)
        self.aot_report = ""  # "built" / "loaded" when the steps are packages
        self._cond = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._slots: list[_Sequence | None] = [None] * self.n
        self._ids = itertools.count(1)
        self._stopping = False
        self._deadline = 0.0
        self._settings_dirty = True
        self._thread: threading.Thread | None = None
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.compile_s = 0.0
        self.steps = {"greedy": 0, "sample": 0}  # decode steps run, per graph

    # -- the public, thread-safe side -----------------------------------------------------
    def check(self, prompt_ids: Sequence[int], params: SamplingParams) -> SamplingParams:
        """Raise RequestError (naming the field) unless the request can be served; fill max_tokens."""
        return check_request(prompt_ids, params, self.cache_len)

    def submit(
        self, prompt_ids: Sequence[int], params: SamplingParams, sink: Sink, arrival: float | None = None
    ) -> Request:
        """Queue a request (checked first); outputs go to sink, called from the engine thread.
        `arrival` (time.perf_counter) is when the client's request came in, for the TTFT metric."""
        params = self.check(prompt_ids, params)
        with self._cond:
            if self._stopping or self.error is not None:
                raise EngineStoppedError("the server is shutting down; retry on another instance")
            free = sum(s is None for s in self._slots)
            if len(self._waiting) >= free + self.config.max_queue:
                raise QueueFullError(
                    f"all {self.n} slots are busy and {len(self._waiting)} requests wait (--max-queue); retry later"
                )
            req = Request(next(self._ids), list(prompt_ids), params, sink)
            if arrival is not None:
                req.arrival = arrival
            self._waiting.append(req)
            self._cond.notify()
        return req

    def cancel(self, req: Request) -> None:
        req.cancel()
        with self._cond:
            self._cond.notify()

    def request_rejected(self, why: str) -> None:
        """Count a request the server turned away before it reached the engine."""
        self.metrics.request_rejected(why)

    def metrics_text(self) -> str:
        """GET /metrics: the Prometheus text of the counters, queue depth and busy slots."""
        return self.metrics.render(self.queue_depth, self.busy_slots, self.n)

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def busy_slots(self) -> int:
        return sum(s is not None for s in self._slots)

    def start(self) -> None:
        """Set up the caches (and compile) on the engine thread, then serve; ready is set after."""
        self._thread = threading.Thread(target=self._run, name="gpt-engine", daemon=True)
        self._thread.start()

    def wait_ready(self, timeout: float | None = None) -> None:
        wait_ready(self, timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Serve what is in flight for up to `timeout` seconds, cancel the rest, end the thread."""
        with self._cond:
            self._stopping = True
            self._deadline = time.perf_counter() + timeout
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout + 30)

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams, timeout: float = 300) -> Output:
        """Submit and wait (for scripts and tests): the whole completion as one Output."""
        done = threading.Event()
        parts: list[Output] = []

        def sink(out: Output) -> None:
            parts.append(out)
            if out.finish_reason is not None:
                done.set()

        self.submit(prompt_ids, params, sink)
        if not done.wait(timeout):
            raise GenerationError(f"no answer within {timeout} s")
        return merge_outputs(parts)

    # -- the engine thread ----------------------------------------------------------------
    def _run(self) -> None:
        try:
            with torch.no_grad():
                self._setup()
        except BaseException as e:  # reported through wait_ready / health
            self.error = e
            self.ready.set()
            return
        self.ready.set()
        with torch.no_grad():
            while True:
                try:
                    if not self._iterate():
                        return
                except Exception as e:  # a failed step ends the requests in flight, not the server
                    msg = (str(e).splitlines() or [""])[0]
                    print(f"error: the engine step failed ({type(e).__name__}: {msg})", file=sys.stderr, flush=True)
                    for i, s in enumerate(self._slots):
                        if s is not None:
                            self._free(i, "error")
                finally:  # also after the last round, which cancels what was left
                    if self.after_round is not None:
                        self.after_round()

    def _iterate(self) -> bool:
        """One scheduler round; False when the engine should end."""
        with self._cond:
            while not self._stopping and not self._waiting and self.busy_slots == 0:
                self._cond.wait()
            hard_stop = self._stopping and time.perf_counter() >= self._deadline
            if self._stopping and (hard_stop or (not self._waiting and self.busy_slots == 0)):
                for req in self._waiting:
                    self._finish_unstarted(req)
                self._waiting.clear()
                for i, s in enumerate(self._slots):
                    if s is not None:
                        self._free(i, "cancelled")
                return False
            for i, s in enumerate(self._slots):
                if s is not None and s.req.cancelled:
                    self._free(i, "cancelled")
            admit = []
            while self._waiting and None in self._slots:
                req = self._waiting.popleft()
                if req.cancelled:
                    self._finish_unstarted(req)
                    continue
                i = self._slots.index(None)
                seq = _Sequence(req, self.tokenizer, self._key(req.params.seed))
                self._slots[i] = seq
                admit.append(i)
        for rows in self._prefill_groups(admit):
            t0 = time.perf_counter()
            self._prefill(rows)
            self.metrics.prefill(time.perf_counter() - t0)
        busy = self.busy_slots
        if busy:
            t0 = time.perf_counter()
            self._decode()
            self.metrics.decode_step(busy, time.perf_counter() - t0)
        return True

    def _key(self, seed: int | None) -> int:
        return (seed if seed is not None else random.getrandbits(31)) & 0x7FFFFFFF

    def _setup(self) -> None:
        model = self.model
        self.decode_net = apply_tricks(model, self.tricks) if self.config.compile else apply_tricks(model, "none")
        self.prefill_net = apply_tricks(model, "none")  # a shallow copy with its own (batch-1) state
        dtype, dev = float_dtype(model), self.device
        self.decode_net.setup_caches(self.n, self.cache_len, dtype=dtype, device=dev)
        self.prefill_net.setup_caches(1, self.cache_len, dtype=dtype, device=dev)
        self._state = _shared_state(self.prefill_net, self.decode_net, self.n)
        net = self.decode_net

        def greedy_step(tok: Tensor, pos: Tensor) -> tuple[Tensor]:
            return (greedy_rows(net(tok, pos)[:, -1]),)

        def sample_step(tok, pos, temperature, top_k, top_p, keys):
            return sample_rows(net(tok, pos)[:, -1], temperature, top_k, top_p, keys, pos[:, 0] + 1)

        self._greedy_step, self._sample_step = greedy_step, sample_step
        if self.config.compile:
            t0 = time.perf_counter()
            if not (self.aot and self._load_packages(greedy_step, sample_step)):
                enable_compile_caches()
                opts = dict(fullgraph=True, dynamic=False, **compile_options(self.tricks))
                self._greedy_step = torch.compile(greedy_step, **opts)
                self._sample_step = torch.compile(sample_step, **opts)
            for _ in range(2):  # twice: a recapture on the second call is paid here, not by a request
                self._run_step("greedy", [0] * self.n, [0] * self.n)
                self._run_step("sample", [0] * self.n, [0] * self.n)
            self.compile_s = time.perf_counter() - t0
            remember_vec_isa_probe()
            self.steps = {"greedy": 0, "sample": 0}

    def _load_packages(self, greedy_step: Callable, sample_step: Callable) -> bool:
        """The two steps as AOTInductor packages (loaded, or built once); False, after one line on
        stderr, where they cannot be built (the caller then torch.compiles them)."""
        dev, n = self.device, self.n
        tok, pos = (torch.zeros(n, 1, dtype=torch.long, device=dev) for _ in range(2))
        settings = [torch.zeros(n, device=dev), torch.zeros(n, dtype=torch.long, device=dev),
                    torch.ones(n, device=dev), torch.zeros(n, dtype=torch.long, device=dev)]  # fmt: skip
        where = Path(self.config.aot_dir) if self.config.aot_dir else None
        try:
            steps = [
                aot.load_or_build(self.decode_net, fn, inputs, {"step": name, "tricks": self.tricks}, where)
                for name, fn, inputs in (
                    ("serve-greedy", greedy_step, [tok, pos]),
                    ("serve-sample", sample_step, [tok, pos, *settings]),
                )
            ]
        except aot.AOTError as e:
            print(f"aot: {e}; compiling the engine's steps with torch.compile instead", file=sys.stderr)
            self.aot = False
            return False
        self._greedy_step, self._sample_step = steps
        self.aot_report = "built" if any(s.built for s in steps) else "loaded"
        return True

    def _settings(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if self._settings_dirty:
            seqs = self._slots
            dev = self.device
            self._temp = torch.tensor([s.req.params.temperature if s else 0.0 for s in seqs], device=dev)
            self._top_k = torch.tensor([s.req.params.top_k if s else 0 for s in seqs], device=dev)
            self._top_p = torch.tensor([s.req.params.top_p if s else 1.0 for s in seqs], device=dev)
            self._keys = torch.tensor([s.key if s else 0 for s in seqs], device=dev)
            self._settings_dirty = False
        return self._temp, self._top_k, self._top_p, self._keys

    def _run_step(self, mode: str, tokens: list[int], positions: list[int]):
        tok = torch.tensor(tokens, device=self.device).view(self.n, 1)
        pos = torch.tensor(positions, device=self.device).view(self.n, 1)
        self.steps[mode] += 1
        if mode == "greedy":
            return self._greedy_step(tok, pos)[0].tolist(), None
        out = self._sample_step(tok, pos, *self._settings())
        return out[0].tolist(), [t.tolist() for t in out[1:]]

    def _prefill_groups(self, admit: list[int]) -> list[list[int]]:
        """The admitted slots as runs of consecutive slots whose prompts have the same length.

        Each run is one batched prefill straight into rows i..i+k of the shared state (a view, no
        copy): the same computation per row as a batch-1 prefill, with no padding (padding would
        corrupt a state-keeping variant's state or a ring buffer), but one (k*T, dim) matrix
        product per weight instead of k. Requests of a wave (same lengths, freed at the same step)
        are admitted together; at stories15M one 8-row prefill of 32-token prompts took 157 ms against
        46-57 ms for each batch-1 one, i.e. about 40 % of the time of eight (docs/serving.md)."""
        runs: list[list[int]] = []
        for i in sorted(admit):
            n = len(self._slots[i].req.prompt_ids)  # type: ignore[union-attr]
            last = runs[-1] if runs else None
            if last and last[-1] == i - 1 and len(self._slots[last[0]].req.prompt_ids) == n:  # type: ignore[union-attr]
                last.append(i)
            else:
                runs.append([i])
        return runs

    def _prefill(self, rows: list[int]) -> None:
        """Prefill the consecutive slots `rows` (prompts of one length) and take their first tokens."""
        i, k = rows[0], len(rows)
        seqs = [self._slots[j] for j in rows]
        assert all(s is not None for s in seqs)
        for module, name, shared in self._state:
            module._buffers[name] = shared[i : i + k]  # the prefill writes rows i..i+k-1 of the shared state
        n = len(seqs[0].req.prompt_ids)
        idx = torch.tensor([s.req.prompt_ids for s in seqs], device=self.device)
        logits = self.prefill_net(idx, torch.arange(n, device=self.device), last_only=True)[:, -1]
        self.metrics.tokens(prompt=n * k)
        self._settings_dirty = True
        greedy = [r for r, s in enumerate(seqs) if _greedy(s.req.params)]
        if greedy:  # as the greedy decode graph: no sort of the vocabulary
            for r, tok in zip(greedy, greedy_rows(logits[greedy]).tolist(), strict=True):
                self._advance(rows[r], tok, None)
        other = [r for r in range(k) if r not in greedy]
        if not other:
            return
        temp, top_k, top_p, keys = self._settings()  # rebuilt: the admitted slots are in them now
        sel = torch.tensor([rows[r] for r in other], device=self.device)
        pos = torch.full((len(other),), n, device=self.device)
        tok, lp, top_v, top_i = sample_rows(logits[other], temp[sel], top_k[sel], top_p[sel], keys[sel], pos)
        for j, r in enumerate(other):
            self._advance(rows[r], int(tok[j]), (float(lp[j]), top_v[j].tolist(), top_i[j].tolist()))

    def _decode(self) -> None:
        seqs = self._slots
        busy = [s for s in seqs if s is not None]
        greedy = all(_greedy(s.req.params) for s in busy)
        tokens = [s.generated[-1] if s else 0 for s in seqs]
        positions = [s.pos if s else 0 for s in seqs]
        nxt, extra = self._run_step("greedy" if greedy else "sample", tokens, positions)
        for i, s in enumerate(seqs):
            if s is None:
                continue
            if s.req.cancelled:
                self._free(i, "cancelled")
                continue
            lp = None if extra is None else (extra[0][i], extra[1][i], extra[2][i])
            self._advance(i, nxt[i], lp)

    def _advance(self, i: int, token: int, lp: tuple[float, list[float], list[int]] | None) -> None:
        """Slot i produced `token`: update its text, release what is safe, finish it if it is done."""
        seq = self._slots[i]
        assert seq is not None
        p = seq.req.params
        now = time.perf_counter()
        if not seq.generated:
            self.metrics.first_token(now - seq.req.arrival)
        else:
            self.metrics.next_token(now - seq.last_time)
        seq.last_time = now
        seq.generated.append(token)
        self.metrics.tokens(generated=1)
        n_top = p.logprobs or 0
        entry = None  # a request that asked for none gets none, even from the general graph's step
        if lp and p.logprobs is not None:
            entry = TokenLogprob(token, lp[0], list(zip(lp[2][:n_top], lp[1][:n_top], strict=True)))
        start = len(seq.stop.text)
        finish = None
        if token == self.eos and not p.ignore_eos:
            text = seq.stop.add(seq.detok.flush())
            finish = "stop"
        else:
            text = seq.stop.add(seq.detok.push(token))
            if seq.stop.cut is not None:
                finish = "stop"
            elif len(seq.generated) >= p.max_tokens:
                text += seq.stop.add(seq.detok.flush())
                finish = "stop" if seq.stop.cut is not None else "length"
        seq.pending.append((entry, token, start, len(seq.stop.text)))
        if finish is not None:
            text += seq.stop.finish()
            cut = seq.stop.cut
            released = [e for e in seq.pending if cut is None or e[2] < cut]
            seq.pending = []
        else:
            k = 0
            while k < len(seq.pending) and seq.pending[k][3] <= seq.stop.sent:
                k += 1
            released, seq.pending = seq.pending[:k], seq.pending[k:]
        if text or released or finish:
            safe_sink(
                seq.req,
                Output(
                    text=text,
                    token_ids=[e[1] for e in released],
                    logprobs=[e[0] for e in released if e[0] is not None],
                    finish_reason=finish,
                    prompt_tokens=len(seq.req.prompt_ids),
                    completion_tokens=len(seq.generated),
                ),
            )
        if finish is not None:
            self.metrics.request_finished(finish)
            self._slots[i] = None
            self._settings_dirty = True

    def _free(self, i: int, reason: str) -> None:
        seq = self._slots[i]
        assert seq is not None
        self._slots[i] = None
        self._settings_dirty = True
        self.metrics.request_finished(reason)
        safe_sink(seq.req, Output("", [], [], reason, len(seq.req.prompt_ids), len(seq.generated)))

    def _finish_unstarted(self, req: Request) -> None:
        self.metrics.request_finished("cancelled")
        safe_sink(req, Output("", [], [], "cancelled", len(req.prompt_ids), 0))


def check_request(prompt_ids: Sequence[int], params: SamplingParams, cache_len: int) -> SamplingParams:
    """Raise RequestError (naming the field) unless a request fits a cache of cache_len tokens per
    slot and its settings are valid; fill in max_tokens when it is None."""
    n = len(prompt_ids)
    if n == 0:
        raise RequestError("prompt is empty; send some text to continue", "prompt")
    room = cache_len - n
    if room < 1:
        raise RequestError(f"prompt is {n} tokens but the context is {cache_len} tokens; shorten the prompt", "prompt")
    if params.max_tokens is None:
        params.max_tokens = room
    elif params.max_tokens < 1:
        raise RequestError(f"max_tokens={params.max_tokens} must be >= 1", "max_tokens")
    elif params.max_tokens > room:
        raise RequestError(
            f"max_tokens={params.max_tokens} does not fit: the prompt is {n} tokens and the context is "
            f"{cache_len}; use at most {room}",
            "max_tokens",
        )
    t = params.temperature
    if not (t >= 0 and t == t and t != float("inf")):
        raise RequestError(f"temperature={t} must be >= 0 (0 means greedy)", "temperature")
    if not 0 < params.top_p <= 1:
        raise RequestError(f"top_p={params.top_p} must be in (0, 1]", "top_p")
    if params.top_k < 0:
        raise RequestError(f"top_k={params.top_k} must be >= 0 (0 = off)", "top_k")
    if params.logprobs is not None and not 0 <= params.logprobs <= MAX_TOP_LOGPROBS:
        raise RequestError(f"logprobs={params.logprobs} must be between 0 and {MAX_TOP_LOGPROBS}", "logprobs")
    return params


def wait_ready(engine: Any, timeout: float | None) -> None:
    """Block until the engine (or gpt.serving.remote's EngineProcess) is ready; raise if it failed."""
    if not engine.ready.wait(timeout):
        raise GenerationError(f"the engine was not ready within {timeout} s")
    if engine.error is not None:
        raise GenerationError(f"the engine failed to start: {engine.error}")


def safe_sink(req: Request, out: Output) -> None:
    """Hand `out` to the request's sink; a sink that raises is ignored."""
    try:
        req.sink(out)
    except Exception:  # a sink of a client that has gone must not stop the engine
        pass


def _greedy(p: SamplingParams) -> bool:
    """A request the argmax serves: greedy and without logprobs (no sort of the vocabulary)."""
    return p.temperature == 0 and p.logprobs is None


def _shared_state(prefill_net: nn.Module, decode_net: nn.Module, n: int) -> list[tuple[nn.Module, str, Tensor]]:
    """(prefill module, buffer name, shared (n, ...) tensor) for each piece of decode state.

    Decode state is what setup_caches allocated: a buffer the two copies do not share, with a
    leading batch dimension of 1 in the prefill copy and n in the decode copy."""
    decode_modules = dict(decode_net.named_modules())
    out = []
    for name, pm in prefill_net.named_modules():
        dm = decode_modules.get(name)
        if dm is None:
            continue
        for bname, pb in pm._buffers.items():
            db = dm._buffers.get(bname)
            if pb is None or db is None or pb is db or pb.dim() == 0 or db.dim() == 0:
                continue
            if pb.shape[0] == 1 and db.shape[0] == n and pb.shape[1:] == db.shape[1:]:
                out.append((pm, bname, db))
    if not out:
        raise GenerationError("the model's attention allocated no per-row decode state in setup_caches; cannot serve")
    return out


def merge_outputs(parts: Sequence[Output]) -> Output:
    """The Outputs of one request as one."""
    last = parts[-1]
    return Output(
        text="".join(o.text for o in parts),
        token_ids=[t for o in parts for t in o.token_ids],
        logprobs=[lp for o in parts for lp in o.logprobs],
        finish_reason=last.finish_reason,
        prompt_tokens=last.prompt_tokens,
        completion_tokens=last.completion_tokens,
    )
