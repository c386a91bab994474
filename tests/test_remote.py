"""gpt.serving.remote: the engine in a process of its own answers as the engine in this one, keeps
its queue bound, and ends every request in flight (and says why) when its process dies."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from serving_fixtures import tiny_checkpoint

from gpt.checkpoint import load_checkpoint
from gpt.errors import GenerationError
from gpt.serving.engine import (
    Engine,
    EngineConfig,
    EngineStoppedError,
    Output,
    QueueFullError,
    SamplingParams,
    merge_outputs,
)
from gpt.serving.remote import EngineProcess, EngineSpec
from gpt.tokenizer import load_tokenizer

TIMEOUT = 60


class Collect:
    """A sink that gathers a request's Outputs and says when its last one came."""

    def __init__(self) -> None:
        self.parts: list[Output] = []
        self.done = threading.Event()

    def __call__(self, out: Output) -> None:
        self.parts.append(out)
        if out.finish_reason is not None:
            self.done.set()

    def result(self) -> Output:
        assert self.done.wait(TIMEOUT), "no last Output in time"
        return merge_outputs(self.parts)


def start(ckpt: Path, **config) -> EngineProcess:
    eng = EngineProcess(EngineSpec(str(ckpt), EngineConfig(**config)), load_tokenizer(ckpt))
    eng.wait_ready(120)
    return eng


REQUESTS = [
    ("Once upon a time", SamplingParams(max_tokens=12, temperature=0)),
    ("The fox", SamplingParams(max_tokens=10, temperature=0.9, top_k=20, seed=3)),
    ("Le café", SamplingParams(max_tokens=8, temperature=0, logprobs=2, stop=["the"])),
]


def test_engine_process_answers_as_the_engine_in_this_process():
    ckpt = tiny_checkpoint()
    model, tok = load_checkpoint(ckpt)
    local = Engine(model, tok, EngineConfig(slots=3))
    local.start()
    local.wait_ready(TIMEOUT)
    try:
        want = [local.generate(tok.encode(p, bos=True), params) for p, params in REQUESTS]
    finally:
        local.stop()
    eng = start(ckpt, slots=3)
    try:
        assert eng.cache_len == model.config.max_seq_len
        sinks = [Collect() for _ in REQUESTS]
        for (p, params), sink in zip(REQUESTS, sinks, strict=True):  # all three in flight at once
            eng.submit(tok.encode(p, bos=True), params, sink)
        got = [s.result() for s in sinks]
        assert [g.token_ids for g in got] == [w.token_ids for w in want]
        assert [g.text for g in got] == [w.text for w in want]
        assert [g.finish_reason for g in got] == [w.finish_reason for w in want]
        # alone here, together there: other batch rows, so equal to float rounding, not bit for bit
        assert [lp.token for lp in got[2].logprobs] == [lp.token for lp in want[2].logprobs] != []
        want_lp = [lp.logprob for lp in want[2].logprobs]
        assert [lp.logprob for lp in got[2].logprobs] == pytest.approx(want_lp, abs=1e-5)
        text = eng.metrics_text()
        assert "gpt_busy_slots 0" in text and 'gpt_requests_total{finish_reason="length"}' in text
        long = Collect()  # stopping with a request mid-decode: its last Output still crosses the pipe
        eng.submit(tok.encode("Once", bos=True), SamplingParams(max_tokens=400, temperature=0, ignore_eos=True), long)
        deadline = time.monotonic() + TIMEOUT
        while not long.parts:  # decoding has started
            assert time.monotonic() < deadline and not long.done.wait(0.01)
        eng.stop(0)
        assert long.result().finish_reason == "cancelled" and len(long.result().token_ids) < 400
    finally:
        eng.stop()


def test_queue_bound_is_kept_here_and_a_dead_engine_ends_every_request():
    ckpt = tiny_checkpoint()
    tok = load_tokenizer(ckpt)
    eng = start(ckpt, slots=1, max_queue=1)
    try:
        long = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
        running, waiting = Collect(), Collect()
        eng.submit(tok.encode("Once", bos=True), long, running)
        eng.submit(tok.encode("The", bos=True), long, waiting)
        with pytest.raises(QueueFullError, match="--max-queue"):
            eng.submit(tok.encode("A", bos=True), long, Collect())
        with pytest.raises(GenerationError, match="max_tokens=900 does not fit"):  # checked before it is sent
            eng.submit(tok.encode("A", bos=True), SamplingParams(max_tokens=900), Collect())
        eng._proc.kill()  # the engine process dies mid-request
        assert running.result().finish_reason == "error" and waiting.result().finish_reason == "error"
        assert "ended unexpectedly" in str(eng.error)
        with pytest.raises(EngineStoppedError):
            eng.submit(tok.encode("A", bos=True), SamplingParams(max_tokens=2), Collect())
    finally:
        eng.stop(0)


def test_a_checkpoint_the_engine_process_cannot_load_is_reported_not_hung(tmp_path):
    ckpt = tiny_checkpoint()
    bad = tmp_path / "ckpt"
    bad.mkdir()
    for f in ckpt.iterdir():  # the tokenizer is there; the weights are not
        if not f.name.endswith(".safetensors"):
            (bad / f.name).write_bytes(f.read_bytes())
    eng = EngineProcess(EngineSpec(str(bad), EngineConfig(slots=1)), load_tokenizer(bad))
    with pytest.raises(GenerationError, match="the engine failed to start") as e:
        eng.wait_ready(120)
    assert str(bad) in str(e.value) or "safetensors" in str(e.value)
    eng.stop(0)
