"""The decode step compiled ahead of time (gpt.aot): the same tokens as torch.compile, a package
built once and loaded by a later Generator, keyed by what it was built for, and a fallback."""

import copy

import pytest
import torch

import generate as cli
from gpt import aot, kernels
from gpt.cli import CliError
from gpt.config import from_preset
from gpt.generation import Generator
from gpt.model import Transformer
from gpt.quant import quantize_model
from gpt.tokenizer import CharTokenizer

CHARS = "abcdefghijklmnopqrstuvwxyz ,.:\n"
PROMPT = "the cat sat on the mat"


@pytest.fixture(scope="module")
def tok():
    return CharTokenizer(list(CHARS))


@pytest.fixture(scope="module")
def int8_model(tok):
    """A tiny int8 model: its layers call gpt.kernels' ops (where built) inside the package."""
    torch.manual_seed(0)
    model = Transformer(from_preset("tiny", vocab_size=tok.vocab_size)).eval()
    quantize_model(model, "int8")
    return model


@pytest.fixture(scope="module")
def aot_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("aot")


@pytest.fixture(scope="module")
def compiled_greedy(int8_model, tok):
    """torch.compile's tokens, the reference: greedy, and seeded sampling."""
    greedy = Generator(int8_model, tok, temperature=0, compile=True).generate([PROMPT], 40)
    sampled = Generator(int8_model, tok, temperature=0.9, top_k=20, compile=True).generate([PROMPT], 40, seed=5)
    return greedy.tokens, sampled.tokens


def packages(directory):
    return sorted(directory.glob(f"*/{aot.PACKAGE}"))


def test_package_decodes_what_torch_compile_decodes_then_loads_and_is_reused(int8_model, tok, aot_dir, compiled_greedy):
    gen = Generator(int8_model, tok, temperature=0, compile=True, aot=True, aot_dir=aot_dir)
    first = gen.generate([PROMPT], 40)
    assert first.report.aot == "built" and first.tokens == compiled_greedy[0]
    assert len(packages(aot_dir)) == 1
    # a second call of the same Generator: new KV caches, the same package pointed at them
    again = gen.generate([PROMPT], 40)
    assert again.report.aot == "reused" and again.tokens == compiled_greedy[0]
    # a new Generator (a later process) loads the package instead of building it
    later = Generator(int8_model, tok, temperature=0, compile=True, aot=True, aot_dir=aot_dir).generate([PROMPT], 40)
    assert later.report.aot == "loaded" and later.tokens == compiled_greedy[0]
    assert later.report.compile_s < first.report.compile_s
    assert "ahead of time (package loaded" in later.report.format()
    assert "regional" not in later.report.tricks and "lean_guards" not in later.report.tricks
    if kernels.available():
        assert "fuse_int8" in later.report.tricks  # the C++ ops are called from inside the package


def test_seeded_sampling_matches_torch_compile(int8_model, tok, aot_dir, compiled_greedy):
    gen = Generator(int8_model, tok, temperature=0.9, top_k=20, compile=True, aot=True, aot_dir=aot_dir)
    out = gen.generate([PROMPT], 40, seed=5)
    assert out.report.aot in ("built", "loaded")
    assert out.tokens == compiled_greedy[1]
    assert gen.generate([PROMPT], 40, seed=5).tokens == out.tokens


def test_package_holds_no_weights_and_serves_another_checkpoint_of_the_same_shapes(int8_model, tok, aot_dir):
    gen = Generator(int8_model, tok, temperature=0, compile=True, aot=True, aot_dir=aot_dir)
    gen.generate([PROMPT], 40)
    (package,) = {s.path for s in gen._aot_steps.values()}
    other = copy.deepcopy(int8_model)  # other float weights (embedding, norms), the same names and shapes
    with torch.no_grad():
        for p in other.parameters():
            if p.is_floating_point():
                p.add_(torch.randn_like(p) * 0.5)
    want = Generator(other, tok, temperature=0, compile=True).generate([PROMPT], 40).tokens
    got_gen = Generator(other, tok, temperature=0, compile=True, aot=True, aot_dir=aot_dir)
    got = got_gen.generate([PROMPT], 40)
    # the same package, and the other model's tokens: its weights came from the model, not the file
    assert got.report.aot == "loaded" and {s.path for s in got_gen._aot_steps.values()} == {package}
    assert got.tokens == want != gen.generate([PROMPT], 40).tokens


def test_left_padded_batch_matches_torch_compile(int8_model, tok, aot_dir):
    prompts = ["the cat", "a dog ran off to the park"]
    want = Generator(int8_model, tok, temperature=0, compile=True).generate(prompts, 24).tokens
    got = Generator(int8_model, tok, temperature=0, compile=True, aot=True, aot_dir=aot_dir).generate(prompts, 24)
    assert got.report.aot in ("built", "loaded") and got.tokens == want


def test_key_follows_what_the_graph_bakes_in(int8_model, tok):
    gen = Generator(int8_model, tok, temperature=0, compile=True)
    int8_model.setup_caches(1, 32)
    step = aot._Step(int8_model, gen._plain_decode)
    inputs = [torch.zeros(1, 1, dtype=torch.long), torch.tensor([3]), None, None]
    base = aot._key(aot.describe(step, inputs, {"temperature": 0.0}))
    assert base == aot._key(aot.describe(step, inputs, {"temperature": 0.0}))
    assert base != aot._key(aot.describe(step, inputs, {"temperature": 0.8}))
    int8_model.setup_caches(1, 64)  # another cache length: other constant shapes
    assert base != aot._key(aot.describe(step, inputs, {"temperature": 0.0}))
    int8_model.clear_caches()


def test_a_damaged_package_is_rebuilt(int8_model, tok, tmp_path, capsys, compiled_greedy):
    Generator(int8_model, tok, temperature=0, compile=True, aot=True, aot_dir=tmp_path).generate([PROMPT], 40)
    (package,) = packages(tmp_path)
    package.write_bytes(b"not a zip file")
    out = Generator(int8_model, tok, temperature=0, compile=True, aot=True, aot_dir=tmp_path).generate([PROMPT], 40)
    assert "did not load" in capsys.readouterr().err
    assert out.report.aot == "built" and out.tokens == compiled_greedy[0]
    assert not list(tmp_path.glob("*/*.tmp.pt2"))  # no half-written file left behind


def test_falls_back_to_torch_compile_with_one_line(int8_model, tok, tmp_path, capsys, monkeypatch, compiled_greedy):
    def broken(*args, **kwargs):
        raise RuntimeError("export failed\nwith a long traceback")

    monkeypatch.setattr(aot, "_build", broken)
    gen = Generator(int8_model, tok, temperature=0, compile=True, aot=True, aot_dir=tmp_path)
    out = gen.generate([PROMPT], 40)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "aot: the decode step could not be compiled ahead of time (RuntimeError: export failed); "
        "compiling the step with torch.compile instead"
    ]
    assert out.report.aot == "" and out.report.compiled and out.tokens == compiled_greedy[0]


def test_aot_applies_to_plain_cpu_decoding_only(int8_model, tok):
    assert Generator(int8_model, tok, compile=True, aot=True).aot
    assert not Generator(int8_model, tok, compile=False, aot=True).aot
    assert not Generator(int8_model, tok, compile=True, aot=True, draft_model=int8_model).aot


def test_no_aot_without_compile_is_refused(tmp_path):
    with pytest.raises(CliError, match="--no-aot does nothing without --compile"):
        cli.run(["--checkpoint", str(tmp_path), "--no-aot"])


def test_an_unwritable_package_directory_falls_back_with_one_line(int8_model, tok, tmp_path, capsys, compiled_greedy):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out = Generator(int8_model, tok, temperature=0, compile=True, aot=True, aot_dir=blocker).generate([PROMPT], 40)
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"aot: {blocker}/") and "cannot write the package there" in line
    assert line.endswith("compiling the step with torch.compile instead")
    assert out.report.aot == "" and out.tokens == compiled_greedy[0]


def test_after_a_fallback_no_package_is_used_again(int8_model, tok, aot_dir, monkeypatch, compiled_greedy):
    """A Generator that fell back to torch.compile for one shape uses it for every shape after, also for
    a shape whose package it had loaded before (that package is not pointed at the new KV cache)."""
    gen = Generator(int8_model, tok, temperature=0, compile=True, aot=True, aot_dir=aot_dir)
    assert gen.generate([PROMPT], 40).report.aot in ("built", "loaded")
    monkeypatch.setattr(aot, "_build", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no compiler")))
    monkeypatch.setattr(aot, "_load", lambda path: (_ for _ in ()).throw(RuntimeError("not this one")))
    gen.generate([PROMPT, PROMPT], 12)  # another batch size: its package cannot be had -> torch.compile
    again = gen.generate([PROMPT], 40)
    assert again.report.aot == "" and again.tokens == compiled_greedy[0]
