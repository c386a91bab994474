import copy
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import generate as cli
from gpt.checkpoint import save_checkpoint
from gpt.config import ModelConfig, from_preset
from gpt.generation import (
    GenerationError,
    Generator,
    _accept_sampled,
    generate,
    kv_cache_bytes,
    logits_to_probs,
    sample,
    weight_bytes,
)
from gpt.model import Transformer
from gpt.tokenizer import CharTokenizer, TokenizerError

ROOT = Path(__file__).resolve().parent.parent
CHARS = "abcdefghijklmnopqrstuvwxyz ,.:\n"


@pytest.fixture
def tok():
    return CharTokenizer(list(CHARS))


@pytest.fixture
def model(tok):
    return Transformer(from_preset("tiny", vocab_size=tok.vocab_size)).eval()


class EosCharTokenizer(CharTokenizer):
    """A char tokenizer whose eos is one of its characters (chars have no eos of their own)."""

    def __init__(self, chars, eos_id):
        super().__init__(chars)
        self.eos_id = eos_id


def greedy_reference(model, ids: list[int], n: int) -> list[int]:
    """Greedy decoding with the full, uncached forward over the whole sequence each step."""
    model.clear_caches()
    seq = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    return seq[0, len(ids) :].tolist()


def test_greedy_cached_equals_full_forward(model, tok):
    res = generate(model, tok, "to be, or not", 30, temperature=0)
    assert res.tokens[0] == greedy_reference(model, tok.encode("to be, or not"), 30)
    assert res.texts[0] == tok.decode(res.tokens[0])


def test_batched_equals_individual(model, tok):
    prompts = ["the king", "o", "what light through yonder"]
    gen = Generator(model, tok, temperature=0)
    batched = gen.generate(prompts, 25)
    for p, row in zip(prompts, batched.tokens, strict=True):
        assert row == gen.generate([p], 25).tokens[0] == greedy_reference(model, tok.encode(p), 25)


def test_stops_at_eos_and_fills_the_context(model, tok):
    free = generate(model, tok, "abc", 40, temperature=0).tokens[0]
    eos = free[7]
    first = free.index(eos)
    stopped = generate(model, EosCharTokenizer(list(CHARS), eos), "abc", 40, temperature=0).tokens[0]
    assert stopped == free[: first + 1]
    # no max_new_tokens: generate until the context (64) is full
    assert len(generate(model, tok, "abc", None, temperature=0).tokens[0]) == 64 - 3


def test_stream_callback_sees_every_token(model, tok):
    seen = []
    res = generate(model, tok, "abc", 12, temperature=0.9, seed=3, on_token=lambda i, t: seen.append(t[0]))
    assert seen == res.tokens[0]
    assert generate(model, tok, "abc", 12, temperature=0.9, seed=3).tokens == res.tokens  # seeded


def test_report_counts_weights_and_kv_cache(model, tok):
    r = generate(model, tok, "hello", 20, temperature=0).report
    c = model.config
    # untied embedding: a step reads one row of it, so it is left out; fp32 = 4 bytes
    weights = 4 * (model.num_params() - c.vocab_size * c.dim)
    cache_len = 64  # prompt + new tokens rounded up to 64, capped at max_seq_len
    kv = 4 * 2 * c.n_layers * c.n_kv_heads * cache_len * c.head_dim
    assert kv_cache_bytes(model, 1) == kv
    assert r.bytes_per_token == weights + kv
    assert r.new_tokens == 20 and r.decode_steps == 19 and r.prompt_tokens == 5
    assert r.tokens_per_s > 0 and r.ttft_s > 0 and r.peak_memory_mb > 0
    assert r.gb_per_s == pytest.approx(19 * (weights + kv) / r.decode_s / 1e9)
    assert (r.device, r.dtype, r.compiled) == ("cpu", "float32", False)
    json.dumps(r.to_dict())


# -- sampling ----------------------------------------------------------------------------------


def test_top_k_and_top_p_draw_only_allowed_tokens():
    torch.manual_seed(0)
    logits = torch.randn(50) * 2
    n = 4000
    many = logits.expand(n, 50)
    top5 = set(torch.topk(logits, 5).indices.tolist())
    drawn, _ = sample(many, 1.0, top_k=5)
    assert set(drawn.tolist()) == top5  # only the top 5, and every one of them

    probs = torch.softmax(logits, -1)
    order = probs.argsort(descending=True)
    cum = probs[order].cumsum(0)
    nucleus = set(order[: int((cum < 0.6).sum()) + 1].tolist())  # smallest head with mass >= 0.6
    drawn, _ = sample(many, 1.0, top_p=0.6)
    assert set(drawn.tolist()) == nucleus
    drawn, _ = sample(many, 1.0, top_k=2, top_p=0.99)
    assert set(drawn.tolist()) <= set(torch.topk(logits, 2).indices.tolist())


def test_exponential_race_matches_the_distribution():
    torch.manual_seed(0)
    logits = torch.randn(8)
    drawn, probs = sample(logits.expand(20000, 8), 0.7)
    freq = torch.bincount(drawn, minlength=8).float() / 20000
    expected = torch.softmax(logits / 0.7, -1)
    torch.testing.assert_close(probs[0], expected)
    assert (freq - expected).abs().sum() / 2 < 0.02  # total variation distance


def test_top_p_renormalises():
    probs = logits_to_probs(torch.tensor([[3.0, 2.0, 1.0, 0.0]]), 1.0, top_p=0.7)
    full = torch.softmax(torch.tensor([3.0, 2.0, 1.0, 0.0]), -1)
    torch.testing.assert_close(probs[0], torch.cat([full[:2] / full[:2].sum(), torch.zeros(2)]))


# -- speculative decoding ----------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, 6])
def test_speculative_greedy_equals_target_greedy(model, tok, k):
    torch.manual_seed(1)
    draft = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, max_seq_len=64)).eval()
    prompt = "the quick brown"
    expect = generate(model, tok, prompt, 30, temperature=0).tokens[0]
    res = generate(model, tok, prompt, 30, temperature=0, draft_model=draft, speculate_k=k)
    assert res.tokens[0] == expect
    assert 0 <= res.report.mean_accepted <= k


def test_speculative_with_the_target_as_draft_accepts_everything(model, tok):
    res = generate(model, tok, "abc", 25, temperature=0, draft_model=copy.deepcopy(model), speculate_k=4)
    assert res.tokens[0] == generate(model, tok, "abc", 25, temperature=0).tokens[0]
    assert res.report.mean_accepted == 4


def test_speculative_sampling_keeps_the_target_distribution():
    """The first emitted token of a speculative step must follow p, not the draft's q."""
    torch.manual_seed(0)
    k, v = 2, 4
    p = torch.tensor([[0.6, 0.3, 0.05, 0.05], [0.25, 0.25, 0.25, 0.25], [0.1, 0.2, 0.3, 0.4]])
    q = torch.tensor([[0.05, 0.05, 0.3, 0.6], [0.7, 0.1, 0.1, 0.1]])
    counts = torch.zeros(v)
    for _ in range(3000):
        proposed = torch.stack([torch.multinomial(q[j], 1)[0] for j in range(k)])
        n, extra = _accept_sampled(proposed, q, p)
        counts[int(proposed[0]) if n >= 1 else extra] += 1
    assert (counts / counts.sum() - p[0]).abs().sum() / 2 < 0.04  # TV(p, q) is 0.55 here


def _peaked_model(vocab: int, seed: int) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(ModelConfig(vocab_size=vocab, dim=16, n_layers=1, n_heads=2, max_seq_len=16)).eval()
    with torch.no_grad():
        m.output.weight.mul_(60.0)  # far from uniform, so that draft and target disagree
    return m


def test_speculative_sampling_follows_the_target_end_to_end():
    """Two sampled tokens through Generator with a different draft follow the target's own joint
    distribution p(t1) p(t2 | t1) (total variation), not the draft's."""
    tok = CharTokenizer(list("abcd"))
    target, draft = _peaked_model(4, 1), _peaked_model(4, 2)
    prompt = tok.encode("ab")

    def joint(m: Transformer) -> torch.Tensor:
        with torch.no_grad():
            p1 = torch.softmax(m(torch.tensor([prompt]))[0, -1].float(), -1)
            p2 = torch.stack([torch.softmax(m(torch.tensor([prompt + [t]]))[0, -1].float(), -1) for t in range(4)])
        return (p1[:, None] * p2).reshape(-1)

    p, q = joint(target), joint(draft)
    assert (p - q).abs().sum() / 2 > 0.3  # the test can tell the two apart
    gen = Generator(target, tok, temperature=1.0, top_k=None, draft_model=draft, speculate_k=2)
    counts = torch.zeros(16)
    n = 1500
    for seed in range(n):
        t1, t2 = gen.generate(["ab"], 2, seed=seed).tokens[0]
        counts[t1 * 4 + t2] += 1
    tv = (counts / n - p).abs().sum() / 2
    assert tv < 0.07, f"total variation {tv:.3f} from the target's distribution"


# -- errors (item 6 of the issue) ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "max_new", "err", "match"),
    [
        ("", 10, GenerationError, "the prompt is empty"),
        ("abcX", 10, TokenizerError, "character 'X' is not in the char vocabulary"),
        ("a" * 70, 10, GenerationError, "the prompt is 70 tokens but the model's context is 64 tokens"),
        ("abc", 62, GenerationError, "max-new-tokens=62 does not fit: .* use at most 61"),
        ("abc", 0, GenerationError, "max-new-tokens=0 must be >= 1"),
    ],
)
def test_bad_input_gives_one_line_errors(model, tok, prompt, max_new, err, match):
    with pytest.raises(err, match=match) as e:
        generate(model, tok, prompt, max_new)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(temperature=-1), "temperature=-1 must be >= 0"),
        (dict(top_k=-1), r"top-k=-1 must be >= 1 \(0 or unset = off\)"),
        (dict(top_p=1.5), r"top-p=1.5 must be in \(0, 1\]"),
        (dict(draft_model="vocab"), "the draft model's vocab_size 7 differs"),
        (dict(draft_model="same", speculate_k=0), "speculate-k=0 must be >= 1"),
    ],
)
def test_bad_settings_are_rejected(model, tok, kwargs, match):
    if kwargs.get("draft_model") == "vocab":
        kwargs["draft_model"] = Transformer(from_preset("tiny", vocab_size=7))
    elif kwargs.get("draft_model") == "same":
        kwargs["draft_model"] = model
    with pytest.raises(GenerationError, match=match):
        Generator(model, tok, **kwargs)


def test_top_k_zero_means_off(model, tok):
    """As in the CLI (and llama.cpp, transformers): top-k 0 samples from the whole vocabulary."""
    logits = torch.randn(2, model.config.vocab_size)
    torch.testing.assert_close(logits_to_probs(logits, 1.0, top_k=0), logits_to_probs(logits, 1.0, top_k=None))
    assert Generator(model, tok, top_k=0).top_k == 0


def test_speculation_is_refused_for_state_keeping_attention(tok):
    """Linear attention's recurrent state would keep the rejected draft tokens: refused in one line."""
    linear = Transformer(from_preset("tiny", vocab_size=tok.vocab_size, attention="linear")).eval()
    plain = Transformer(from_preset("tiny", vocab_size=tok.vocab_size)).eval()
    for target, draft, who in ((linear, plain, "target"), (plain, linear, "draft")):
        with pytest.raises(GenerationError, match=f"the {who} model's attention 'linear' keeps its own") as e:
            Generator(target, tok, draft_model=draft)
        assert "\n" not in str(e.value)


def test_cli_attention_runs_the_checkpoint_with_another_variant(ckpt, model, tok, capsys):
    """--attention math runs an sdpa checkpoint through the reference mixing step: the same tokens."""
    args = ["--checkpoint", ckpt, "--prompt", "to be", "--temperature", "0", "--max-new-tokens", "10", "--json"]
    rc, out, _ = run_cli(capsys, *args, "--attention", "math")
    assert rc == 0 and json.loads(out)["samples"][0]["tokens"] == greedy_reference(model, tok.encode("to be"), 10)


def test_speculation_needs_room_and_a_single_prompt(model, tok):
    gen = Generator(model, tok, draft_model=model, speculate_k=4)
    with pytest.raises(GenerationError, match="one prompt at a time"):
        gen.generate(["ab", "cd"], 5)
    with pytest.raises(GenerationError, match=r"does not fit: .*\(minus 5 for speculation\); use at most 56"):
        gen.generate(["abc"], 60)


# -- the CLI ------------------------------------------------------------------------------------


@pytest.fixture
def ckpt(tmp_path, model, tok):
    return str(save_checkpoint(tmp_path / "ckpt", model, tok))


def run_cli(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_json_matches_the_api(ckpt, model, tok, capsys):
    rc, out, err = run_cli(
        capsys, "--checkpoint", ckpt, "--prompt", "to be", "--prompt", "or", "--temperature", "0",
        "--max-new-tokens", "15", "--json",
    )  # fmt: skip
    assert rc == 0 and err == ""
    d = json.loads(out)
    assert [s["tokens"] for s in d["samples"]] == [greedy_reference(model, tok.encode(p), 15) for p in ("to be", "or")]
    assert d["report"]["batch_size"] == 2 and d["report"]["tokens_per_s"] > 0


def test_cli_text_stream_and_samples(ckpt, capsys):
    rc, out, err = run_cli(capsys, "--checkpoint", ckpt, "--prompt", "abc", "--temperature", "0",
                           "--max-new-tokens", "10", "--stream")  # fmt: skip
    assert rc == 0 and out.startswith("abc") and len(out) == 3 + 10 + 1
    assert "tokens/s" in err and "time to first token" in err and "GB/s" in err
    rc2, out2, _ = run_cli(capsys, "--checkpoint", ckpt, "--prompt", "abc", "--temperature", "0",
                           "--max-new-tokens", "10")  # fmt: skip
    assert out2 == out
    rc, out, _ = run_cli(capsys, "--checkpoint", ckpt, "--prompt", "ab", "--num-samples", "3", "--seed", "1",
                         "--max-new-tokens", "5", "--json")  # fmt: skip
    assert rc == 0 and len(json.loads(out)["samples"]) == 3


def test_cli_prompt_file_and_speculative(ckpt, tmp_path, capsys):
    f = tmp_path / "p.txt"
    f.write_text("once upon")
    rc, out, _ = run_cli(capsys, "--checkpoint", ckpt, "--prompt-file", str(f), "--temperature", "0",
                         "--max-new-tokens", "12", "--json")  # fmt: skip
    plain = json.loads(out)["samples"][0]["tokens"]
    spec = ["--draft-checkpoint", ckpt, "--speculate-k", "3"]
    rc, out, _ = run_cli(capsys, "--checkpoint", ckpt, "--prompt-file", str(f), "--temperature", "0",
                         "--max-new-tokens", "12", "--json", *spec)  # fmt: skip
    d = json.loads(out)
    assert rc == 0 and d["samples"][0]["tokens"] == plain and d["report"]["mean_accepted"] == 3


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--prompt", ""], "the prompt is empty"),
        (["--prompt", "abcX"], "character 'X' is not in the char vocabulary"),
        (["--prompt", "a" * 80], "the prompt is 80 tokens but the model's context is 64 tokens"),
        (["--prompt", "abc", "--max-new-tokens", "100"], "max-new-tokens=100 does not fit"),
        (["--prompt", "abc", "--max-new-tokens", "-3"], "--max-new-tokens=-3 must be >= 1"),
        (["--prompt", "abc", "--temperature", "-0.5"], "temperature=-0.5 must be >= 0"),
        (["--prompt", "abc", "--top-p", "0"], r"top-p=0.0 must be in \(0, 1\]"),
        (["--prompt", "abc", "--num-samples", "0"], "--num-samples=0 must be >= 1"),
        (["--prompt", "abc", "--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
        (["--prompt", "abc", "--max-new-tokens", "ten"], "argument --max-new-tokens: invalid int value"),
        (["--prompt-file", "/nonexistent/p.txt"], "--prompt-file /nonexistent/p.txt: cannot read it"),
        (["--prompt", "a", "--prompt", "b", "--stream"], "--stream prints one sequence"),
        (["--draft-checkpoint", "/nonexistent/draft"], "checkpoint directory /nonexistent/draft does not exist"),
        (["--prompt", "abc", "--compile", "--tricks", "matvec,turbo"], r"unknown speed trick\(s\) turbo \(--tricks\)"),
        # flags that would do nothing in the combination are refused, not ignored
        (["--prompt", "abc", "--tricks", "none"], "--tricks does nothing without --compile"),
        (["--prompt", "abc", "--compile-prefill"], "--compile-prefill does nothing without --compile"),
        (["--prompt", "abc", "--speculate-k", "3"], "--speculate-k does nothing without --draft-checkpoint"),
        (["--prompt", "abc", "--stream", "--json"], "--stream .* --json .*; choose one"),
        (["--prompt", "abc", "--attention", "nope"], "unknown attention 'nope'"),
        (["--prompt", "abc", "--attention", "differential"], "lacks tensor.*lambda_q1"),
    ],
)
def test_cli_errors_are_one_line(ckpt, capsys, argv, match):
    rc, out, err = run_cli(capsys, "--checkpoint", ckpt, *argv)
    assert rc == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1
    assert re.search(match, err)


def test_cli_missing_default_checkpoint_names_the_training_command(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc, out, err = run_cli(capsys, "--prompt", "abc")
    assert rc == 2
    assert err == (
        "error: no checkpoint at out/shakespeare-char/best; create it with `python train_ddp.py` "
        "(or pass --checkpoint DIR)\n"
    )


def test_cli_interactive_keeps_going_after_a_bad_prompt(ckpt, monkeypatch, capsys):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("abc\nabcX\nab\n"))
    rc, out, err = run_cli(capsys, "--checkpoint", ckpt, "--interactive", "--temperature", "0",
                           "--max-new-tokens", "5")  # fmt: skip
    lines = out.splitlines()
    assert rc == 0 and len(lines) == 2 and lines[0].startswith("abc") and lines[1].startswith("ab")
    assert "error: character 'X'" in err


@pytest.mark.slow
def test_cli_script_end_to_end(ckpt):
    """As a user runs it: a subprocess, prompt on stdin."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "generate.py"), "--checkpoint", ckpt, "--temperature", "0", "--max-new-tokens",
         "8", "--json"],
        input="to be", capture_output=True, text=True, cwd=ROOT, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["samples"][0]["tokens"]) == 8


# -- compiled decoding --------------------------------------------------------------------------


@pytest.mark.slow
def test_decode_step_has_no_graph_breaks(model, tok):
    """dynamo traces the whole step (model + sampling) as one graph, for padded batches too."""
    model.setup_caches(2, 64)
    kpm = torch.ones(2, 64, dtype=torch.bool)
    kpm[1, :3] = False
    offset = torch.tensor([0, 3])
    for settings in (dict(temperature=0), dict(temperature=0.8, top_k=5, top_p=0.9)):
        step = Generator(model, tok, **settings)._decode
        torch._dynamo.reset()
        explained = torch._dynamo.explain(step)(torch.zeros(2, 1, dtype=torch.long), torch.tensor([5]), kpm, offset)
        assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.slow
def test_compiled_greedy_equals_full_forward_and_is_captured_once(model, tok):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    gen = Generator(model, tok, temperature=0, compile=True, cache_len=64)
    prompts = ["to be, or", "not"]
    first = gen.generate(prompts, 20)
    for p, row in zip(prompts, first.tokens, strict=True):
        assert row == greedy_reference(model, tok.encode(p), 20)
    assert first.report.compiled and first.report.compile_s > 0
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 1 and not counters["graph_break"]  # the decode step only; prefill stays eager
    # a second request of the same batch shape reuses the graph: no compile, no new graph
    second = gen.generate(["abc", "de"], 30)
    assert second.report.compile_s == 0 and counters["stats"]["unique_graphs"] == graphs
    assert second.tokens[0] == greedy_reference(model, tok.encode("abc"), 30)


def test_cli_cuda_without_a_gpu(ckpt, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc, out, err = run_cli(capsys, "--checkpoint", ckpt, "--prompt", "abc", "--device", "cuda")
    assert rc == 2 and err == "error: --device cuda: no CUDA device is available here; use --device cpu\n"


@pytest.mark.slow
def test_compiled_speculative_greedy_equals_target_without_recompiles(model, tok):
    from torch._dynamo.utils import counters

    expect = generate(model, tok, "to be", 30, temperature=0).tokens[0]
    torch._dynamo.reset()
    counters.clear()
    res = generate(
        model, tok, "to be", 30, temperature=0, compile=True, draft_model=copy.deepcopy(model), speculate_k=3
    )
    assert res.tokens[0] == expect and res.report.mean_accepted == 3
    # the draft's one-token step and the target's (k+1)-token check, each captured once
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]


def test_weight_bytes_counts_what_a_decode_step_reads():
    """The embedding is a lookup (one row per token) unless the head reads the same tensor."""
    from gpt.quant import quantize_model

    cfg = ModelConfig(vocab_size=1000, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, max_seq_len=16)
    table = 1000 * 32 * 4
    tied = Transformer(dataclasses.replace(cfg, tie_embeddings=True))
    untied = Transformer(dataclasses.replace(cfg, tie_embeddings=False))
    everything = sum(t.numel() * t.element_size() for t in untied.state_dict().values())
    assert weight_bytes(untied) == everything - table  # the untied head is read, the table is not
    assert weight_bytes(tied) == everything - table  # the shared tensor once, as the head
    quantize_model(tied, "int8")  # the head gets its own int8 weights; the float table stays a lookup
    q = tied.output
    assert weight_bytes(tied) < everything - table and q.qweight.numel() == 1000 * 32
    body = sum(t.numel() * t.element_size() for k, t in tied.state_dict().items() if not k.startswith("tok_"))
    assert weight_bytes(tied) == body
