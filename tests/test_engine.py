"""gpt.serving: per-row positions in the model, the continuous-batching engine, text streaming."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from serving_fixtures import tiny_checkpoint

from gpt.attention import causal_mask
from gpt.checkpoint import load_checkpoint
from gpt.config import from_preset
from gpt.errors import GenerationError
from gpt.fast import SERVE_TRICKS
from gpt.generation import Generator
from gpt.kv_cache import KVCache
from gpt.model import Block, Transformer
from gpt.serving.engine import Engine, EngineConfig, QueueFullError, SamplingParams, merge_outputs
from gpt.serving.sampling import sample_rows, uniform_noise
from gpt.serving.text import IncrementalDetokenizer, StopText

# the built-in variants of the conformance suite (tests/test_attention_check.py)
VARIANTS = {
    "sdpa": {},
    "math": {},
    "linear": {},
    "alibi": {},
    "sliding_window": {"window": 4},
    "sinks": {},
    "softcap": {},
    "sigmoid": {},
    "differential": {},
}


@pytest.fixture(scope="module")
def trained():
    model, tok = load_checkpoint(tiny_checkpoint())
    return model, tok


@pytest.fixture(scope="module")
def engine(trained):
    model, tok = trained
    eng = Engine(model, tok, EngineConfig(slots=3))
    eng.start()
    eng.wait_ready(60)
    yield eng
    eng.stop()


def ids_of(tok, text):
    return tok.encode(text, bos=True)


# -- per-row positions in the model ------------------------------------------------------------


def test_causal_mask_per_row_equals_the_shared_form():
    k_pos = torch.arange(6)
    kpm = torch.ones(2, 6, dtype=torch.bool)
    kpm[1, :2] = False
    q = torch.tensor([3, 4])
    shared = causal_mask(q, k_pos, kpm)  # (2, 1, 2, 6)
    per_row = causal_mask(q.expand(2, 2), k_pos, kpm)
    assert per_row.shape == (2, 1, 2, 6) and torch.equal(shared, per_row)
    rows = causal_mask(torch.tensor([[1], [4]]), k_pos)  # rows at different positions
    assert rows[:, 0, 0].tolist() == [[k <= 1 for k in range(6)], [k <= 4 for k in range(6)]]


def test_kv_cache_writes_each_row_at_its_own_slots():
    cache = KVCache(2, 1, 5, 2)
    k = torch.arange(8.0).view(2, 1, 2, 2)
    cache.update(torch.tensor([[0, 1], [3, 4]]), k, -k)
    assert torch.equal(cache.k_cache[0, 0, :2], k[0, 0]) and torch.equal(cache.k_cache[1, 0, 3:], k[1, 0])
    assert cache.k_cache[0, 0, 2:].abs().sum() == 0 and cache.k_cache[1, 0, :3].abs().sum() == 0
    assert torch.equal(cache.v_cache[1, 0, 3:], -k[1, 0])


@pytest.mark.parametrize("attention", list(VARIANTS))
def test_rows_at_different_positions_decode_as_each_sequence_alone(attention):
    """Two sequences decoded together with a position per row, row 1 starting 4 steps after row 0
    (idle before, at position 0, as an engine's free slot), equal their full forwards."""
    pos_enc = "none" if attention == "alibi" else "rope"
    model = Transformer(
        from_preset("tiny", attention=attention, attention_kwargs=VARIANTS[attention], pos_encoding=pos_enc)
    ).eval()
    seqs = [torch.randint(0, 96, (n,)) for n in (12, 8)]
    lag = 4
    with torch.no_grad():
        full = [model(s[None])[0] for s in seqs]
        model.setup_caches(2, 32)
        # a (B, T) chunk: both rows' first 2 tokens
        out = model(torch.stack([seqs[0][:2], torch.zeros(2, dtype=torch.long)]), torch.tensor([[0, 1], [0, 0]]))
        got = [[out[0, 0], out[0, 1]], []]
        for t in range(2, 12):
            r1 = t - lag  # row 1's position, or idle at 0
            tok = torch.stack([seqs[0][t], seqs[1][r1] if r1 >= 0 else torch.tensor(0)]).view(2, 1)
            lg = model(tok, torch.tensor([[t], [max(r1, 0)]]))
            got[0].append(lg[0, 0])
            if r1 >= 0:
                got[1].append(lg[1, 0])
    for r in range(2):
        torch.testing.assert_close(torch.stack(got[r]), full[r], atol=2e-5, rtol=1e-4)


def test_linear_attention_resets_a_row_that_restarts_at_position_zero():
    model = Transformer(from_preset("tiny", attention="linear")).eval()
    a, b = torch.randint(0, 96, (2, 6))
    with torch.no_grad():
        model.setup_caches(2, 16)
        model(torch.stack([a, a]), torch.arange(6).expand(2, 6))  # both rows hold a's state
        # row 0 starts b afresh at position 0 while row 1 continues a at position 6
        out = model(torch.stack([b, a])[:, :1], torch.tensor([[0], [6]]))
        fresh = model.__class__(model.config).eval()
        fresh.load_state_dict(model.state_dict())
        fresh.setup_caches(1, 16)
        alone = fresh(b[None, :1], torch.arange(1))
    torch.testing.assert_close(out[0], alone[0])


# -- sampling ---------------------------------------------------------------------------------


def test_noise_is_a_function_of_key_and_counter_only():
    u = uniform_noise(torch.tensor([7, 7, 8]), torch.tensor([3, 4, 3]), 1000)
    assert ((u > 0) & (u < 1)).all()
    again = uniform_noise(torch.tensor([8]), torch.tensor([3]), 1000)
    assert torch.equal(u[2], again[0]) and not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    assert abs(u.mean().item() - 0.5) < 0.02


def test_per_row_sampling_follows_each_rows_settings():
    torch.manual_seed(0)
    logits = torch.randn(50) * 2
    n = 3000
    rows = logits.expand(n, 50)
    keys, counters = torch.arange(n), torch.zeros(n, dtype=torch.long)
    top5 = set(torch.topk(logits, 5).indices.tolist())

    def draw(temp, k, p):
        t = torch.full((n,), temp)
        return sample_rows(rows, t, torch.full((n,), k), torch.full((n,), p), keys, counters)[0]

    assert set(draw(1.0, 5, 1.0).tolist()) == top5
    assert set(draw(0.0, 0, 1.0).tolist()) == {int(logits.argmax())}
    freq = torch.bincount(draw(0.7, 0, 1.0), minlength=50).float() / n
    assert (freq - torch.softmax(logits / 0.7, -1)).abs().sum() / 2 < 0.05  # total variation
    probs = torch.softmax(logits, -1)
    order = probs.argsort(descending=True)
    nucleus = set(order[: int((probs[order].cumsum(0) < 0.6).sum()) + 1].tolist())
    assert set(draw(1.0, 0, 0.6).tolist()) == nucleus
    # one batch, mixed settings: each row as if alone
    mixed = sample_rows(
        logits.expand(3, 50), torch.tensor([0.0, 1.0, 1.0]), torch.tensor([0, 5, 0]), torch.tensor([1.0, 1.0, 0.6]),
        keys[:3], counters[:3],
    )[0]  # fmt: skip
    assert mixed[0] == logits.argmax() and int(mixed[1]) in top5 and int(mixed[2]) in nucleus


# -- text -------------------------------------------------------------------------------------


def test_incremental_detokenizer_never_emits_half_a_character(trained):
    _, tok = trained
    text = " a fox 🦊 and é日本 ok"
    ids = tok.encode(text)
    byte_pieces = [i for i in ids if tok.sp.id_to_piece(i).startswith("<0x")]
    assert len(byte_pieces) >= 4  # the emoji is not in the vocabulary: four byte tokens
    prompt = tok.encode("Once", bos=True)
    d = IncrementalDetokenizer(tok, prompt)
    pieces = [d.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + d.flush() == tok.decode(prompt + ids)[len(tok.decode(prompt)) :]


def test_stop_text_holds_back_what_could_start_a_stop_string():
    s = StopText(["STOP", "\n\n"])
    assert s.add("abc S") == "abc "  # "S" might start STOP
    assert s.add("T") == ""
    assert s.add("x") == "STx"  # it did not
    assert s.add("yyST") == "yy"
    assert s.add("OP and more") == "" and s.cut == 9
    assert s.finish() == "" and s.text[: s.cut] == "abc STxyy"
    t = StopText([])
    assert t.add("a\n") == "a\n" and t.cut is None


# -- the engine -------------------------------------------------------------------------------


def test_one_request_greedy_equals_the_cli_generator(trained, engine):
    model, tok = trained
    gen = Generator(model, tok, temperature=0)
    for prompt in ("Once upon a time", "The frog", "Le café", "日本"):
        out = engine.generate(ids_of(tok, prompt), SamplingParams(max_tokens=40, temperature=0))
        ref = gen.generate([prompt], 40)
        assert out.token_ids == ref.tokens[0]
        assert out.finish_reason == "length" and out.completion_tokens == 40
        assert out.text == tok.decode(ids_of(tok, prompt) + ref.tokens[0])[len(tok.decode(ids_of(tok, prompt))) :]


REQUESTS = [
    ("Once upon a time", SamplingParams(max_tokens=30, temperature=0)),
    ("The fox", SamplingParams(max_tokens=12, temperature=0.9, seed=1)),
    ("They walked", SamplingParams(max_tokens=25, temperature=1.0, top_k=5, seed=2)),
    ("At night", SamplingParams(max_tokens=7, temperature=0.7, top_p=0.8, seed=3)),
    ("Le café", SamplingParams(max_tokens=40, temperature=0)),
    ("One day the owl said", SamplingParams(max_tokens=18, temperature=1.2, top_k=20, top_p=0.9, seed=4)),
    ("日本", SamplingParams(max_tokens=3, temperature=0)),
]


def _copy(p: SamplingParams) -> SamplingParams:
    return SamplingParams(**vars(p))


def test_concurrent_requests_each_return_what_they_return_alone(trained, engine):
    """7 requests of different lengths and settings over 3 slots: slots free and refill mid-run."""
    _, tok = trained
    solo = [engine.generate(ids_of(tok, p), _copy(sp)) for p, sp in REQUESTS]
    results: dict[int, list] = {i: [] for i in range(len(REQUESTS))}
    done = threading.Semaphore(0)

    def sink_for(i):
        def sink(out):
            results[i].append(out)
            if out.finish_reason:
                done.release()

        return sink

    for i, (p, sp) in enumerate(REQUESTS):
        engine.submit(ids_of(tok, p), _copy(sp), sink_for(i))
    for _ in REQUESTS:
        assert done.acquire(timeout=120)
    for i, ref in enumerate(solo):
        got = merge_outputs(results[i])
        assert (got.token_ids, got.text, got.finish_reason) == (ref.token_ids, ref.text, ref.finish_reason), i
    assert engine.busy_slots == 0 and engine.queue_depth == 0


def record_prefills(eng: Engine) -> list[list[int]]:
    """The slot rows of each prefill the engine runs from now on."""
    batches: list[list[int]] = []
    prefill = eng._prefill

    def spy(rows):
        batches.append(list(rows))
        prefill(rows)

    eng._prefill = spy
    return batches


def test_equal_length_prompts_admitted_together_prefill_as_one_batch(trained, engine):
    """4 prompts of one token length (greedy, seeded, with logprobs) admitted at once: one 4-row
    prefill, and each request's tokens, text and logprobs are what it gets alone."""
    _, tok = trained
    words = ["The frog", "A king", "The cat", "My dog"]
    prompts = [ids_of(tok, w) for w in words]
    n = min(len(p) for p in prompts)
    prompts = [p[:n] for p in prompts]
    assert len({tuple(p) for p in prompts}) == 4
    params = [
        SamplingParams(max_tokens=6, temperature=0),
        SamplingParams(max_tokens=9, temperature=0.9, seed=3),
        SamplingParams(max_tokens=5, temperature=0, logprobs=2),
        SamplingParams(max_tokens=7, temperature=0),
    ]
    solo = [engine.generate(p, _copy(sp)) for p, sp in zip(prompts, params, strict=True)]
    model, _ = trained
    eng = Engine(model, tok, EngineConfig(slots=4))
    eng.start()
    eng.wait_ready(60)
    try:
        batches = record_prefills(eng)
        parts = {i: [] for i in range(4)}
        done = threading.Semaphore(0)
        with eng._cond:  # the engine thread takes the requests only once all four are queued
            for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
                eng.submit(p, _copy(sp), lambda o, i=i: (parts[i].append(o), o.finish_reason and done.release()))
        for _ in prompts:
            assert done.acquire(timeout=60)
        assert batches == [[0, 1, 2, 3]]
        for i, ref in enumerate(solo):
            got = merge_outputs(parts[i])
            assert (got.token_ids, got.text, got.finish_reason) == (ref.token_ids, ref.text, ref.finish_reason), i
            assert [[t for t, _ in e.top] for e in got.logprobs] == [[t for t, _ in e.top] for e in ref.logprobs]

            def values(entries):
                return [lp for e in entries for lp in [e.logprob] + [v for _, v in e.top]]

            assert values(got.logprobs) == pytest.approx(values(ref.logprobs), abs=1e-4)
    finally:
        eng.stop()


def test_seeded_sampling_is_reproducible_and_the_seed_matters(trained, engine):
    _, tok = trained
    ids = ids_of(tok, "Once")
    a = engine.generate(ids, SamplingParams(max_tokens=30, temperature=1.5, seed=11))
    b = engine.generate(ids, SamplingParams(max_tokens=30, temperature=1.5, seed=11))
    c = engine.generate(ids, SamplingParams(max_tokens=30, temperature=1.5, seed=12))
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids


def test_stop_string_spanning_two_tokens_never_leaks(trained, engine):
    _, tok = trained
    ids = ids_of(tok, "Once upon a time")
    free = engine.generate(ids, SamplingParams(max_tokens=30, temperature=0))
    # a stop string made of the end of one token's text and the start of the next one's
    pieces = []
    d = IncrementalDetokenizer(tok, ids)
    for t in free.token_ids:
        pieces.append(d.push(t))
    k = next(i for i in range(2, len(pieces)) if len(pieces[i - 1]) >= 2 and len(pieces[i]) >= 2)
    stop = pieces[k - 1][-2:] + pieces[k][:2]
    at = "".join(pieces).find(stop)
    parts = []
    done = threading.Event()
    engine.submit(ids, SamplingParams(max_tokens=30, temperature=0, stop=[stop]),
                  lambda o: (parts.append(o), o.finish_reason and done.set()))  # fmt: skip
    assert done.wait(60)
    out = merge_outputs(parts)
    assert out.finish_reason == "stop" and out.text == "".join(pieces)[:at]
    streamed = ""
    for p in parts:
        streamed += p.text
        assert stop[:2] not in streamed[at - 1 :] if len(streamed) > at else True
    assert streamed == out.text and stop not in streamed
    # the tokens returned are those whose text starts before the stop string
    assert out.token_ids == free.token_ids[: len(out.token_ids)] and len(out.token_ids) <= k + 1


def test_logprobs_are_the_models_own(trained, engine):
    model, tok = trained
    ids = ids_of(tok, "The fox")
    out = engine.generate(ids, SamplingParams(max_tokens=5, temperature=0, logprobs=3))
    assert len(out.logprobs) == 5 and all(len(e.top) == 3 for e in out.logprobs)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids + out.token_ids]))[0].float(), -1)
    for j, e in enumerate(out.logprobs):
        row = logp[len(ids) - 1 + j]
        assert e.token == out.token_ids[j] == int(row.argmax())
        assert e.logprob == pytest.approx(float(row.max()), abs=1e-4)
        assert [t for t, _ in e.top] == row.topk(3).indices.tolist()


def test_cancel_frees_the_slot_and_the_next_request_is_admitted(trained):
    model, tok = trained
    eng = Engine(model, tok, EngineConfig(slots=1, max_queue=1))
    eng.start()
    eng.wait_ready(60)
    try:
        parts = []

        def slow_sink(o):  # runs on the engine thread: makes each decode step take >= 20 ms
            parts.append(o)
            time.sleep(0.02)

        long = eng.submit(ids_of(tok, "Once"), SamplingParams(max_tokens=None, temperature=0), slow_sink)
        t0 = time.perf_counter()
        while not parts and time.perf_counter() - t0 < 30:
            time.sleep(0.005)
        after = []
        done = threading.Event()
        eng.submit(ids_of(tok, "The"), SamplingParams(max_tokens=4, temperature=0),
                   lambda o: (after.append(o), o.finish_reason and done.set()))  # fmt: skip
        with pytest.raises(QueueFullError, match="all 1 slots are busy and 1 requests wait"):
            eng.submit(ids_of(tok, "A"), SamplingParams(max_tokens=4), lambda o: None)
        time.sleep(0.1)
        assert not done.is_set() and eng.queue_depth == 1  # it waits while the long request decodes
        eng.cancel(long)
        assert done.wait(30)  # admitted once the cancelled request freed the slot
        assert merge_outputs(after).completion_tokens == 4
        assert parts[-1].finish_reason == "cancelled" and parts[-1].completion_tokens < 500
    finally:
        eng.stop()


@pytest.mark.parametrize(
    ("prompt_len", "params", "match"),
    [
        (0, SamplingParams(), "prompt is empty"),
        (512, SamplingParams(), "prompt is 512 tokens but the context is 512 tokens; shorten the prompt"),
        (10, SamplingParams(max_tokens=600), "max_tokens=600 does not fit: .* use at most 502"),
        (10, SamplingParams(max_tokens=0), "max_tokens=0 must be >= 1"),
        (10, SamplingParams(temperature=-1), "temperature=-1 must be >= 0"),
        (10, SamplingParams(top_p=0), r"top_p=0 must be in \(0, 1\]"),
        (10, SamplingParams(top_p=1.5), r"top_p=1.5 must be in \(0, 1\]"),
        (10, SamplingParams(top_k=-2), "top_k=-2 must be >= 0"),
        (10, SamplingParams(logprobs=21), "logprobs=21 must be between 0 and 20"),
    ],
)
def test_bad_requests_are_refused_in_one_line(trained, prompt_len, params, match):
    model, tok = trained
    eng = Engine(model, tok, EngineConfig(slots=1))  # not started: check needs no model run
    with pytest.raises(GenerationError, match=match) as e:
        eng.check([5] * prompt_len, params)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("attention", list(VARIANTS))
def test_every_conformant_variant_serves_concurrently(attention):
    """Each variant: 3 requests over 2 slots (a slot is re-admitted) give the single-request generator's tokens."""
    pos_enc = "none" if attention == "alibi" else "rope"
    cfg = from_preset("tiny", attention=attention, attention_kwargs=VARIANTS[attention], pos_encoding=pos_enc)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # sharpen the random model's logits so that greedy choices are not near-ties
        model.output.weight.mul_(20)
    from gpt.tokenizer import CharTokenizer

    tok = CharTokenizer([chr(32 + i) for i in range(96)])
    gen = Generator(model, tok, temperature=0)
    # the first two (11 characters each) are admitted together: one 2-row prefill
    prompts = [("hello there", 20), ("xyz abc def", 9), ("a", 14)]
    eng = Engine(model, tok, EngineConfig(slots=2))
    eng.start()
    eng.wait_ready(60)
    try:
        parts = {i: [] for i in range(3)}
        done = threading.Semaphore(0)
        batches = record_prefills(eng)
        with eng._cond:  # the engine thread takes the requests only once all are queued
            for i, (p, n) in enumerate(prompts):
                eng.submit(tok.encode(p), SamplingParams(max_tokens=n, temperature=0),
                           lambda o, i=i: (parts[i].append(o), o.finish_reason and done.release()))  # fmt: skip
        for _ in prompts:
            assert done.acquire(timeout=60)
        for i, (p, n) in enumerate(prompts):
            assert merge_outputs(parts[i]).token_ids == gen.generate([p], n).tokens[0], (attention, p)
        assert batches[0] == [0, 1] and len(batches) == 2
    finally:
        eng.stop()


@pytest.mark.slow
def test_compiled_engine_admits_and_finishes_requests_without_recompiling(trained, engine):
    """Two graphs (argmax-only and general sampling), captured at start-up; then requests of
    every length and setting come and go under error_on_recompile, with the eager engine's answers."""
    from torch._dynamo.utils import counters

    model, tok = trained
    expect = [engine.generate(ids_of(tok, p), _copy(sp)) for p, sp in REQUESTS]
    torch._dynamo.reset()
    counters.clear()
    eng = Engine(model, tok, EngineConfig(slots=3, compile=True))
    eng.start()
    eng.wait_ready(900)
    try:
        graphs = counters["stats"]["unique_graphs"]
        assert graphs == 2 and not counters["graph_break"] and eng.compile_s > 0
        # a server decodes for hours: its default leaves out "regional" (start-up for decode speed)
        assert eng.tricks == sorted(SERVE_TRICKS) and "regional" not in eng.tricks
        assert type(eng.decode_net.layers[0]) is Block
        with torch._dynamo.config.patch(error_on_recompile=True):
            parts = {i: [] for i in range(len(REQUESTS))}
            done = threading.Semaphore(0)
            for i, (p, sp) in enumerate(REQUESTS):
                eng.submit(ids_of(tok, p), _copy(sp),
                           lambda o, i=i: (parts[i].append(o), o.finish_reason and done.release()))  # fmt: skip
            for _ in REQUESTS:
                assert done.acquire(timeout=120)
            greedy_only = eng.generate(ids_of(tok, "The frog"), SamplingParams(max_tokens=9, temperature=0))
            with_lp = eng.generate(ids_of(tok, "The frog"), SamplingParams(max_tokens=9, temperature=0, logprobs=2))
        assert eng.error is None and counters["stats"]["unique_graphs"] == graphs
        for i, ref in enumerate(expect):
            got = merge_outputs(parts[i])
            assert (got.token_ids, got.finish_reason) == (ref.token_ids, ref.finish_reason), REQUESTS[i]
        assert greedy_only.token_ids == with_lp.token_ids and len(with_lp.logprobs) == 9
        assert eng.steps["greedy"] > 0 and eng.steps["sample"] > 0  # both graphs served
    finally:
        eng.stop()


@pytest.mark.slow
def test_engine_steps_as_packages_answer_as_the_eager_engine(trained, engine, tmp_path):
    """EngineConfig(aot=True): both step graphs are AOTInductor packages (built by the first engine,
    loaded by the next one) and every request gets the eager engine's tokens."""
    model, tok = trained
    expect = [engine.generate(ids_of(tok, p), _copy(sp)) for p, sp in REQUESTS]
    for report in ("built", "loaded"):
        eng = Engine(model, tok, EngineConfig(slots=3, compile=True, aot=True, aot_dir=str(tmp_path)))
        eng.start()
        eng.wait_ready(900)
        try:
            assert eng.aot_report == report and "lean_guards" not in eng.tricks
            for (p, sp), ref in zip(REQUESTS, expect, strict=True):
                got = eng.generate(ids_of(tok, p), _copy(sp))
                assert (got.token_ids, got.finish_reason) == (ref.token_ids, ref.finish_reason), (p, sp)
            assert eng.steps["greedy"] > 0 and eng.steps["sample"] > 0
        finally:
            eng.stop()
    assert len(list(tmp_path.glob("*/decode.pt2"))) == 2  # the argmax-only graph and the general one


def test_ids_beyond_the_tokenizers_vocabulary_have_no_text(trained):
    """A model whose vocab_size is padded past the tokenizer's may sample such an id: no crash, no text."""
    _, tok = trained
    d = IncrementalDetokenizer(tok, ids_of(tok, "Once"))
    assert d.push(tok.vocab_size + 3) == "" and d.push(tok.encode(" upon")[0]) != ""
