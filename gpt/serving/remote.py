"""The engine in a process of its own, behind the Engine's public side (what the HTTP app uses).

    engine = EngineProcess(EngineSpec("checkpoints/x", EngineConfig(slots=8, compile=True)), tokenizer)
    engine.wait_ready()
    req = engine.submit(prompt_ids, params, sink)   # sink is called on this process's reader thread
    engine.cancel(req); engine.metrics_text(); engine.stop(5.0)

Why a second process: Python runs one thread at a time per process. With the engine thread
beside the event loop, every decode step hands the GIL back and forth with the loop dozens of
times (each kernel call releases it, and the loop grabs it to format and write a chunk), and the
step waits each time the loop holds it. The model's process now runs only the engine thread
and a thread that reads this pipe; the HTTP process tokenizes, checks requests, formats chunks
and writes sockets. vLLM's API server and engine core are split the same way. On the 2-core
benchmark machine the two layouts measured within noise of each other (docs/serving.md); what
the split surely buys is isolation: a server whose model process dies still answers (503).

The pipe carries tuples, one per event:
    server -> engine   ("submit", id, prompt ids, SamplingParams, arrival)  ("cancel", id)
                       ("rejected", why)  ("metrics", key)  ("stop", drain seconds)
    engine -> server   ("ready", cache_len, compile_s)  ("failed", message)
                       ("outs", [(id, Output), ...])  ("reply", key, text)
Requests are checked (check_request) and the queue bound applied here, before anything is sent:
this side knows every request in flight, so a full queue is answered with 429 at once. The
engine process ignores Ctrl-C (the terminal sends it to both processes): the server drains it
with "stop", and an engine whose server has gone (end of the pipe) stops on its own.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from gpt.errors import GenerationError
from gpt.serving.engine import (
    EngineConfig,
    EngineStoppedError,
    Output,
    QueueFullError,
    Request,
    SamplingParams,
    Sink,
    check_request,
    safe_sink,
    wait_ready,
)
from gpt.tokenizer import Tokenizer


@dataclass
class EngineSpec:
    """What the engine process loads: gpt.checkpoint.load_checkpoint's arguments and the engine's."""

    checkpoint: str
    config: EngineConfig
    device: str = "cpu"
    dtype: str | None = None
    overrides: dict[str, Any] | None = None
    threads: int | None = None  # torch.set_num_threads in the engine process (None: torch's choice)


class EngineProcess:
    """Engine's public side (submit, cancel, metrics_text, stop, ...) over a pipe to a child process."""

    def __init__(self, spec: EngineSpec, tokenizer: Tokenizer) -> None:
        spec.config.validate()
        self.config, self.tokenizer, self.n = spec.config, tokenizer, spec.config.slots
        self.cache_len = 0
        self.compile_s = 0.0
        self.error: BaseException | None = None
        self.ready = threading.Event()
        self._lock = threading.Lock()  # guards the pipe's sending end and the tables below
        self._reqs: dict[int, Request] = {}  # in flight: submitted, last Output not yet received
        self._replies: dict[int, list] = {}  # metrics key -> [Event, text]
        self._ids = itertools.count(1)
        self._stopping = False
        ctx = mp.get_context("spawn")  # a fork of a process that has started threads is unsafe
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_engine_main, args=(child, spec), name="gpt-engine", daemon=True)
        self._proc.start()
        child.close()
        self._reader = threading.Thread(target=self._read, name="gpt-engine-reader", daemon=True)
        self._reader.start()

    # -- as Engine ---------------------------------------------------------------------------
    def wait_ready(self, timeout: float | None = None) -> None:
        wait_ready(self, timeout)

    def check(self, prompt_ids: Sequence[int], params: SamplingParams) -> SamplingParams:
        return check_request(prompt_ids, params, self.cache_len)

    def submit(
        self, prompt_ids: Sequence[int], params: SamplingParams, sink: Sink, arrival: float | None = None
    ) -> Request:
        """As Engine.submit; `sink` is called on this process's reader thread."""
        params = self.check(prompt_ids, params)
        with self._lock:
            if self._stopping or self.error is not None:
                raise EngineStoppedError("the server is shutting down; retry on another instance")
            waiting = len(self._reqs) - self.n
            if waiting >= self.config.max_queue:
                raise QueueFullError(
                    f"all {self.n} slots are busy and {waiting} requests wait (--max-queue); retry later"
                )
            req = Request(next(self._ids), list(prompt_ids), params, sink)
            if arrival is not None:
                req.arrival = arrival
            self._reqs[req.id] = req
            self._send(("submit", req.id, req.prompt_ids, params, req.arrival))
        return req

    def cancel(self, req: Request) -> None:
        req.cancel()
        with self._lock:
            if req.id in self._reqs:
                self._send(("cancel", req.id))

    def request_rejected(self, why: str) -> None:
        with self._lock:
            self._send(("rejected", why))

    def metrics_text(self, timeout: float = 5.0) -> str:
        """The engine process's /metrics text (blocks up to `timeout` s: call it off the event loop)."""
        slot: list = [threading.Event(), None]
        with self._lock:
            key = next(self._ids)
            self._replies[key] = slot
            self._send(("metrics", key))
        if not slot[0].wait(timeout):
            with self._lock:
                self._replies.pop(key, None)
            raise GenerationError(f"the engine process did not answer within {timeout} s")
        return slot[1]

    def stop(self, timeout: float = 5.0) -> None:
        """Let the engine serve what is in flight for up to `timeout` s, then end its process."""
        with self._lock:
            self._stopping = True
            self._send(("stop", timeout))
        self._proc.join(timeout + 30)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        self._reader.join(5)

    # -- this side of the pipe ---------------------------------------------------------------
    def _send(self, msg: tuple) -> None:
        try:
            self._conn.send(msg)
        except (OSError, ValueError):  # the engine process has gone; the reader reports it
            pass

    def _read(self) -> None:
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError):
                break
            kind = msg[0]
            if kind == "outs":
                with self._lock:  # once per round: a finished request leaves the table here
                    got = [(self._reqs.pop(rid, None) if out.finish_reason is not None else self._reqs.get(rid), out)
                           for rid, out in msg[1]]  # fmt: skip
                for req, out in got:
                    if req is not None:
                        safe_sink(req, out)
            elif kind == "reply":
                with self._lock:
                    slot = self._replies.pop(msg[1], None)
                if slot is not None:
                    slot[1] = msg[2]
                    slot[0].set()
            elif kind == "ready":
                self.cache_len, self.compile_s = msg[1], msg[2]
                self.ready.set()
            elif kind == "failed":
                self.error = GenerationError(msg[1])
                self.ready.set()
        self._ended()

    def _ended(self) -> None:
        """The engine process is gone: end every request still in flight."""
        self._proc.join(5)
        with self._lock:
            if self.error is None and not self._stopping:
                code = self._proc.exitcode
                self.error = GenerationError(f"the engine process ended unexpectedly (exit code {code})")
            left, self._reqs = list(self._reqs.values()), {}
            reason = "cancelled" if self._stopping else "error"
        self.ready.set()
        for req in left:
            safe_sink(req, Output("", [], [], reason, len(req.prompt_ids), 0))


# -- the engine process -----------------------------------------------------------------------
def _engine_main(conn: Connection, spec: EngineSpec) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server drains us with "stop"
    import torch

    from gpt.checkpoint import load_checkpoint
    from gpt.serving.engine import Engine

    if spec.threads:
        torch.set_num_threads(spec.threads)
    send_lock = threading.Lock()

    def send(msg: tuple) -> None:
        with send_lock:
            try:
                conn.send(msg)
            except (OSError, ValueError):  # the server has gone; recv below sees it and stops
                pass

    # a round's outputs (every busy slot's token of one decode step) cross the pipe as one message
    pending: list[tuple[int, Output]] = []

    def flush() -> None:  # the engine thread, after each round
        if pending:
            batch = pending[:]
            del pending[:]
            send(("outs", batch))

    try:
        model, tokenizer = load_checkpoint(spec.checkpoint, device=spec.device, dtype=spec.dtype,
                                           overrides=spec.overrides)  # fmt: skip
        engine = Engine(model, tokenizer, spec.config, after_round=flush)
        engine.start()
        engine.wait_ready()
    except Exception as e:  # reported as /health's detail; GptError messages name the file or flag
        send(("failed", (str(e).splitlines() or [type(e).__name__])[0]))
        return
    send(("ready", engine.cache_len, engine.compile_s))
    reqs: dict[int, Request] = {}

    def sink_for(rid: int) -> Sink:
        def sink(out: Output) -> None:  # the engine thread; sent by flush at the end of the round
            if out.finish_reason is not None:
                reqs.pop(rid, None)
            pending.append((rid, out))

        return sink

    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            msg = ("stop", 0.0)  # the server process has gone
        kind = msg[0]
        if kind == "submit":
            _, rid, ids, params, arrival = msg
            try:
                reqs[rid] = engine.submit(ids, params, sink_for(rid), arrival=arrival)
            except GenerationError as e:  # the server checked it; this is a stopping engine
                print(f"error: request {rid} not taken by the engine: {e}", file=sys.stderr, flush=True)
                send(("outs", [(rid, Output("", [], [], "error", len(ids), 0))]))
        elif kind == "cancel":
            req = reqs.pop(msg[1], None)
            if req is not None:
                engine.cancel(req)
        elif kind == "rejected":
            engine.request_rejected(msg[1])
        elif kind == "metrics":
            send(("reply", msg[1], engine.metrics_text()))
        elif kind == "stop":
            engine.stop(msg[1])
            return
