"""The OpenAI-compatible server as users run it: `python generate.py --serve` in a subprocess on
127.0.0.1 (a free port), on a tiny trained checkpoint, spoken to with the official openai client
and with plain HTTP. Every request has a timeout; every server is stopped by its own pid."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from serving_fixtures import tiny_checkpoint

import generate as cli
from gpt.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
SLOTS, QUEUE = 4, 4
TIMEOUT = 60  # seconds, per request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, ckpt: Path, *flags: str, ready_s: float = 120, new_session: bool = False) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(ckpt.parent / f"server-{self.port}.log", "w+")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "generate.py"), "--serve", "--checkpoint", str(ckpt), "--host", "127.0.0.1",
             "--port", str(self.port), *flags],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=new_session,
        )  # fmt: skip
        self.http = httpx.Client(base_url=self.url, timeout=TIMEOUT)
        deadline = time.monotonic() + ready_s
        self.saw_503 = False
        while True:
            assert self.proc.poll() is None, f"the server exited: {self.output()}"
            assert time.monotonic() < deadline, f"no healthy server within {ready_s} s: {self.output()}"
            try:
                r = self.http.get("/health", timeout=2)
                if r.status_code == 200:
                    break
                assert r.status_code == 503
                self.saw_503 = True
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", timeout=TIMEOUT, max_retries=0)

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-3000:]

    def metrics(self) -> dict[str, float]:
        text = self.http.get("/metrics").text
        return {m[0]: float(m[1]) for m in re.findall(r"^(\S+) (\S+)$", text, re.M) if not m[0].startswith("#")}

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.http.close()
        self.log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def ckpt() -> Path:
    return tiny_checkpoint()


@pytest.fixture(scope="module")
def server(ckpt):
    s = Server(ckpt, "--slots", str(SLOTS), "--max-queue", str(QUEUE))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def tok(ckpt):
    return load_tokenizer(ckpt)


def cli_tokens(ckpt: Path, prompt: str, n: int, *flags: str) -> list[int]:
    out = subprocess.run(
        [sys.executable, str(ROOT / "generate.py"), "--checkpoint", str(ckpt), "--prompt", prompt, "--temperature",
         "0", "--max-new-tokens", str(n), "--json", *flags],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["samples"][0]["tokens"]


def complete(server: Server, prompt: str, **kw):
    return server.client.completions.create(model="ckpt", prompt=prompt, **kw)


# -- the basics ----------------------------------------------------------------------------------


def test_health_models_and_metrics(server):
    assert server.http.get("/health").json() == {"status": "ok"}
    assert [m.id for m in server.client.models.list().data] == ["ckpt"]
    complete(server, "Once", max_tokens=3, temperature=0)
    r = server.http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    m = server.metrics()
    names = [
        "gpt_prompt_tokens_total",
        "gpt_generation_tokens_total",
        "gpt_queue_depth",
        "gpt_busy_slots",
        'gpt_requests_total{finish_reason="length"}',
        "gpt_time_to_first_token_seconds_count",
        "gpt_time_per_output_token_seconds_count",
        'gpt_time_to_first_token_seconds_bucket{le="+Inf"}',
    ]
    for name in names:
        assert name in m, name
    assert m["gpt_generation_tokens_total"] >= 3 and m["gpt_slots"] == SLOTS
    assert m["gpt_time_per_output_token_seconds_count"] >= 2
    # a 3-token request: one prefill (the first token), then two decode steps of one busy row each
    assert m["gpt_prefill_batches_total"] >= 1 and m["gpt_prefill_seconds_total"] > 0
    assert 2 <= m["gpt_decode_steps_total"] <= m["gpt_decode_rows_total"] <= SLOTS * m["gpt_decode_steps_total"]
    assert m["gpt_decode_seconds_total"] > 0


def test_greedy_completion_equals_generate_py(server, ckpt, tok):
    prompt = "Once upon a time"
    expect = cli_tokens(ckpt, prompt, 40)
    r = complete(server, prompt, max_tokens=40, temperature=0, extra_body={"return_token_ids": True})
    choice = r.choices[0]
    assert choice.model_extra["token_ids"] == expect
    ids = tok.encode(prompt, bos=True)
    assert choice.text == tok.decode(ids + expect)[len(tok.decode(ids)) :]
    assert choice.finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 40, len(ids) + 40)


def test_streaming_completion_equals_the_whole_one(server):
    whole = complete(server, "The fox", max_tokens=30, temperature=0.8, seed=5)
    chunks = list(
        complete(server, "The fox", max_tokens=30, temperature=0.8, seed=5, stream=True,
                 stream_options={"include_usage": True})
    )  # fmt: skip
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text and len(chunks) > 5
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30


def test_prompt_list_gives_one_choice_each(server):
    r = complete(server, ["Once", "The frog"], max_tokens=5, temperature=0)
    assert [c.index for c in r.choices] == [0, 1] and r.usage.completion_tokens == 10
    assert r.choices[1].text == complete(server, "The frog", max_tokens=5, temperature=0).choices[0].text


def test_chat_whole_and_streamed(server):
    messages = [{"role": "system", "content": "A story."}, {"role": "user", "content": "tell me a story"}]
    r = server.client.chat.completions.create(model="ckpt", messages=messages, max_tokens=40, temperature=0)
    text = r.choices[0].message.content
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant" and text
    assert r.choices[0].finish_reason in ("stop", "length") and "\nUser:" not in text
    stream = server.client.chat.completions.create(
        model="ckpt", messages=messages, max_tokens=40, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_chat_template_is_the_documented_plain_text(server, ckpt, tok):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "a story"}]  # fmt: skip
    r = server.client.chat.completions.create(model="ckpt", messages=messages, max_tokens=2, temperature=0)
    rendered = "S\n\nUser: hi\nAssistant: hello\nUser: a story\nAssistant:"
    assert r.usage.prompt_tokens == len(tok.encode(rendered, bos=True))


# -- stop strings, logprobs ------------------------------------------------------------------------


def test_stop_string_spanning_two_tokens_never_leaks(server):
    prompt = "Once upon a time"
    free = complete(server, prompt, max_tokens=40, temperature=0, logprobs=0)
    pieces = free.choices[0].logprobs.tokens
    text = free.choices[0].text
    k = next(i for i in range(3, len(pieces)) if len(pieces[i - 1]) >= 2 and len(pieces[i]) >= 2)
    stop = pieces[k - 1][-2:] + pieces[k][:2]  # the end of one token and the start of the next
    at = text.find(stop)
    assert at > 0
    r = complete(server, prompt, max_tokens=40, temperature=0, stop=[stop, "zzz"])
    assert r.choices[0].text == text[:at] and r.choices[0].finish_reason == "stop"
    # streamed: the text only grows, so if the whole equals text[:at] no chunk ever leaked any of the stop string
    chunks = [c.choices[0].text for c in complete(server, prompt, max_tokens=40, temperature=0, stop=stop, stream=True)]
    assert "".join(chunks) == text[:at]
    chat = server.client.chat.completions.create(
        model="ckpt", messages=[{"role": "user", "content": "go"}], max_tokens=30, temperature=0, stop=["e"],
        stream=True,
    )  # fmt: skip
    assert "e" not in "".join(c.choices[0].delta.content or "" for c in chat if c.choices)


def test_logprobs_completion_and_chat(server):
    r = complete(server, "The frog", max_tokens=6, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens).lstrip() == r.choices[0].text.lstrip()
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 2 and chosen == pytest.approx(max(top.values())) and chosen <= 0
    c = server.client.chat.completions.create(
        model="ckpt", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0, logprobs=True,
        top_logprobs=3,
    )  # fmt: skip
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens or c.choices[0].finish_reason == "stop"
    assert all(len(e.top_logprobs) == 3 and e.logprob == pytest.approx(e.top_logprobs[0].logprob) for e in content)


# -- concurrency ---------------------------------------------------------------------------------

CONCURRENT = [
    ("Once upon a time", dict(max_tokens=60, temperature=0)),
    ("The fox", dict(max_tokens=12, temperature=0.9, seed=1)),
    ("They walked", dict(max_tokens=35, temperature=1.0, top_p=0.9, seed=2)),
    ("At night", dict(max_tokens=7, temperature=0.7, seed=3, extra_body={"top_k": 5})),
    ("Le café", dict(max_tokens=45, temperature=0)),
    ("One day the owl said", dict(max_tokens=20, temperature=1.2, top_p=0.8, seed=4, extra_body={"top_k": 20})),
    ("日本", dict(max_tokens=3, temperature=0)),
    ("The frog said", dict(max_tokens=50, temperature=0.5, seed=6, stop=["river"])),
]


def test_eight_concurrent_requests_each_match_their_solo_result(server):
    solo = [complete(server, p, **kw).choices[0] for p, kw in CONCURRENT]
    got: dict[int, object] = {}

    def run(i: int) -> None:
        p, kw = CONCURRENT[i]
        got[i] = complete(server, p, **kw).choices[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(CONCURRENT))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert len(got) == len(CONCURRENT)
    for i, ref in enumerate(solo):
        assert (got[i].text, got[i].finish_reason) == (ref.text, ref.finish_reason), CONCURRENT[i]
    assert len({c.text for c in solo}) == len(solo)  # the settings did make different answers


def _wait_metric(server: Server, name: str, ok, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        if ok(m.get(name, 0)) or time.monotonic() > deadline:
            return m
        time.sleep(0.02)


def _open_stream(server: Server, prompt: str, n: int):
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True, "ignore_eos": True}
    cm = server.http.stream("POST", "/v1/completions", json=body)
    return cm, cm.__enter__()


def test_client_disconnect_frees_the_slot(server):
    before = server.metrics()['gpt_requests_total{finish_reason="cancelled"}']
    cm, r = _open_stream(server, "Once", 480)
    lines = r.iter_lines()
    assert next(lines).startswith("data: ")
    cm.__exit__(None, None, None)  # the client goes away mid-stream
    m = _wait_metric(server, 'gpt_requests_total{finish_reason="cancelled"}', lambda v: v > before)
    assert m['gpt_requests_total{finish_reason="cancelled"}'] == before + 1
    m = _wait_metric(server, "gpt_busy_slots", lambda v: v == 0)
    assert m["gpt_busy_slots"] == 0
    assert complete(server, "The", max_tokens=3, temperature=0).usage.completion_tokens == 3  # the next one is served


def test_full_queue_answers_429_at_once(server):
    streams = []
    try:
        for i in range(SLOTS):  # every slot decodes a long request...
            cm, r = _open_stream(server, f"Once {i}", 480)
            lines = r.iter_lines()  # kept: dropping the iterator would close the response
            next(lines)
            streams.append((cm, lines))
        for i in range(QUEUE):  # ...and the queue fills
            streams.append((_open_stream(server, f"The {i}", 480)[0], None))
        m = _wait_metric(server, "gpt_queue_depth", lambda v: v == QUEUE)
        assert m["gpt_queue_depth"] == QUEUE and m["gpt_busy_slots"] == SLOTS
        t0 = time.monotonic()
        r = server.http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 429 and time.monotonic() - t0 < 2
        err = r.json()["error"]
        assert err["type"] == "rate_limit_error" and err["code"] == "queue_full" and "--max-queue" in err["message"]
        with pytest.raises(openai.RateLimitError):
            complete(server, "x", max_tokens=2)
    finally:
        for cm, _ in streams:
            cm.__exit__(None, None, None)
    m = _wait_metric(server, "gpt_busy_slots", lambda v: v == 0)
    assert m["gpt_busy_slots"] == 0 and m["gpt_queue_depth"] == 0
    assert m['gpt_requests_rejected_total{reason="queue_full"}'] >= 2
    assert complete(server, "The", max_tokens=3).usage.completion_tokens == 3


# -- bad requests --------------------------------------------------------------------------------

BAD = [
    ("/v1/completions", {"prompt": "a " * 600, "max_tokens": 5}, "prompt", "the context is 512 tokens"),
    ("/v1/completions", {"prompt": "Once", "max_tokens": 600}, "max_tokens", "max_tokens=600 does not fit"),
    ("/v1/completions", {"prompt": "Once", "max_tokens": 0}, "max_tokens", "max_tokens=0 must be >= 1"),
    ("/v1/completions", {"prompt": "Once", "temperature": -0.5}, "temperature", "temperature=-0.5 must be >= 0"),
    ("/v1/completions", {"prompt": "Once", "top_p": 0}, "top_p", r"top_p=0.0 must be in \(0, 1\]"),
    ("/v1/completions", {"prompt": "Once", "top_p": 1.5}, "top_p", r"top_p=1.5 must be in \(0, 1\]"),
    ("/v1/completions", {"prompt": "Once", "max_tokens": "ten"}, "max_tokens", "valid integer"),
    ("/v1/completions", {"prompt": "Once", "temperature": "hot"}, "temperature", "valid number"),
    ("/v1/completions", {"prompt": 5}, "prompt", "valid string"),
    ("/v1/completions", {"prompt": "Once", "stream": "yes"}, "stream", "valid boolean"),
    ("/v1/completions", {"prompt": ""}, "prompt", "prompt is empty"),
    ("/v1/completions", {"prompt": []}, "prompt", "empty list"),
    ("/v1/completions", {}, "prompt", "Field required"),
    ("/v1/completions", {"prompt": "Once \ud800"}, "prompt", "U\\+D800, which the tokenizer cannot encode"),
    ("/v1/completions", {"prompt": "Once", "n": 2}, "n", "only n=1"),
    ("/v1/completions", {"prompt": "Once", "logprobs": 50}, "logprobs", "between 0 and 20"),
    ("/v1/completions", {"prompt": "Once", "stop": [""]}, "stop", "empty string"),
    ("/v1/chat/completions", {"messages": []}, "messages", "messages is empty"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role", "Input should"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_p": -1}, "top_p", "top_p=-1"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 2000}]}, "messages", "context"),
]


@pytest.mark.parametrize(("path", "body", "param", "match"), BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_requests_get_400_with_the_openai_error_body(server, path, body, param, match):
    r = server.http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert re.search(match, err["message"]) and "\n" not in err["message"] and "Traceback" not in r.text
    assert complete(server, "Once", max_tokens=2).usage.completion_tokens == 2  # and the server goes on


@pytest.mark.parametrize("raw", [b"{bad json", b"[1, 2]", b"\xff\xfe", b""])
def test_malformed_bodies_get_400(server, raw):
    r = server.http.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        complete(server, "Once", max_tokens=10_000)


# -- the CLI -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--slots", "2"], "--slots does nothing without --serve"),
        (["--port", "9"], "--port does nothing without --serve"),
        (["--cache-len", "64"], "--cache-len does nothing without --serve"),
        (["--serve", "--cache-len", "1"], "--cache-len=1 must be >= 2"),
        (["--serve", "--prompt", "x"], "--prompt sets one generation run"),
        (["--serve", "--draft-checkpoint", "d"], "speculative decoding is not served"),
        (["--serve", "--slots", "0"], "--slots=0 must be >= 1"),
        (["--serve", "--port", "70000"], "--port=70000 must be in 1..65535"),
        (["--drain-s", "9"], "--drain-s does nothing without --serve"),
        (["--engine-thread"], "--engine-thread does nothing without --serve"),
        (["--serve", "--drain-s", "-1"], "--drain-s=-1.0 must be >= 0 seconds"),
    ],
)
def test_serve_flags_are_checked_in_one_line(ckpt, capsys, argv, match):
    rc = cli.main(["--checkpoint", str(ckpt), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and re.search(match, err), err


# -- compiled, one slot, and shutdown ------------------------------------------------------------


@pytest.mark.slow
def test_compiled_one_slot_server_equals_generate_py_and_drains_on_sigterm(ckpt):
    """--compile --slots 1: /health is 503 while compiling; greedy equals generate.py; SIGTERM lets a
    streaming request finish, then the server exits 0."""
    s = Server(ckpt, "--slots", "1", "--compile", "--drain-s", "60", ready_s=400)
    try:
        assert s.saw_503
        for prompt in ("Once upon a time", "Le café"):
            r = complete(s, prompt, max_tokens=30, temperature=0, extra_body={"return_token_ids": True})
            assert r.choices[0].model_extra["token_ids"] == cli_tokens(ckpt, prompt, 30)
        seeded = [complete(s, "The fox", max_tokens=20, temperature=1.0, seed=9).choices[0].text for _ in range(2)]
        assert seeded[0] == seeded[1]
        cm, r = _open_stream(s, "Once", 20)  # --drain-s 60: a loaded machine still finishes it
        lines = r.iter_lines()
        first = next(lines)
        s.proc.send_signal(signal.SIGTERM)
        rest = [x for x in [first, *lines] if x]
        cm.__exit__(None, None, None)
        assert rest[-1] == "data: [DONE]"
        text = "".join(json.loads(x[6:])["choices"][0]["text"] for x in rest if x.startswith("data: {"))
        assert len(text) > 0
        assert s.proc.wait(90) == 0
    finally:
        s.stop()


# -- the engine's process ------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    """The pids whose parent is pid (Linux /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def test_engine_thread_server_answers_as_the_engine_process_one(server, ckpt):
    """--engine-thread (the model on a thread of the HTTP process) serves the same tokens."""
    s = Server(ckpt, "--slots", "2", "--engine-thread")
    try:
        for prompt in ("Once upon a time", "Le café"):
            kw = dict(max_tokens=20, temperature=0, extra_body={"return_token_ids": True})
            a, b = complete(s, prompt, **kw), complete(server, prompt, **kw)
            assert a.choices[0].model_extra["token_ids"] == b.choices[0].model_extra["token_ids"]
        assert s.metrics()["gpt_busy_slots"] == 0
        assert "the model on a thread of this process" in s.output()
    finally:
        assert s.stop() == 0


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the engine process in /proc")
def test_ctrl_c_in_the_terminal_drains_then_ends_both_processes(ckpt):
    """A terminal's Ctrl-C reaches every process of the group: the engine process ignores it, the
    server drains the request in flight, stops the engine process and exits 0."""
    s = Server(ckpt, "--slots", "2", "--drain-s", "60", new_session=True)
    try:
        engine = [c for c in children(s.proc.pid) if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
        assert len(engine) == 1, s.output()
        assert "the model in its own process" in s.output()
        cm, r = _open_stream(s, "Once", 40)
        lines = r.iter_lines()
        first = next(lines)
        os.killpg(s.proc.pid, signal.SIGINT)
        rest = [x for x in [first, *lines] if x]
        cm.__exit__(None, None, None)
        assert rest[-1] == "data: [DONE]"
        assert s.proc.wait(90) == 0
        deadline = time.monotonic() + 10
        while Path(f"/proc/{engine[0]}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not Path(f"/proc/{engine[0]}").exists(), "the engine process outlived the server"
    finally:
        s.stop()
