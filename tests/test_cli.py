"""Every command line fails on bad input the same way: ONE line on stderr, `error: ...`, naming the
flag or file (and the bad value), exit code 2, no traceback (gpt/cli.py's conventions).

Each CLI and script is run as a user runs it (`python generate.py ...` from the repo root, in its
own process: a fork of one that has imported torch, tests/cli_forks.py), with at least one bad
input for every library module it touches: a flag argparse refuses, a missing checkpoint
directory, a corrupt model.safetensors, a config.json whose quantization block names a mode that
does not exist, a bad --dtype, a bad tokenizer or corpus...
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from gpt.checkpoint import save_checkpoint
from gpt.config import from_preset
from gpt.data import prepare_dataset
from gpt.hf import hf_config_dict
from gpt.model import Transformer
from gpt.tokenizer import CHAR_FILE, load_tokenizer, train_sentencepiece

ROOT = Path(__file__).resolve().parent.parent
TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 30
# not a safetensors file: an 8-byte header length, then a header that is not JSON
CORRUPT = b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def f(tmp_path_factory) -> SimpleNamespace:
    """The inputs, made once: good ones and one bad variant of each kind."""
    d = tmp_path_factory.mktemp("cli")
    corpus = d / "corpus.txt"
    corpus.write_text(TEXT)
    prepare_dataset(str(corpus), d / "data", "char")
    prepare_dataset(str(corpus), d / "shortval", "char", val_fraction=0.005)  # val.bin shorter than a block
    tok = load_tokenizer(d / "data")
    ck = save_checkpoint(d / "ck", Transformer(from_preset("tiny", vocab_size=tok.vocab_size)), tok)
    learned = from_preset("tiny", vocab_size=tok.vocab_size, pos_encoding="learned")
    learned = save_checkpoint(d / "learned", Transformer(learned), tok)

    badquant = _copy(ck, d / "badquant")
    cfg = json.loads((badquant / "config.json").read_text())
    cfg["quantization"] = {
        "mode": "int7",
        "group_size": None,
        "layers": ["output"],
        "weights_file": "model.safetensors",
    }
    (badquant / "config.json").write_text(json.dumps(cfg))
    corrupt = _copy(ck, d / "corrupt")
    (corrupt / "model.safetensors").write_bytes(CORRUPT)
    notok = _copy(ck, d / "notok")
    (notok / CHAR_FILE).unlink()

    sp_tok = train_sentencepiece([corpus], d / "sp-tok", vocab_size=320)
    sp = save_checkpoint(d / "sp", Transformer(from_preset("tiny", vocab_size=sp_tok.vocab_size)), sp_tok)
    sp_corrupt = _copy(sp, d / "sp-corrupt")
    (sp_corrupt / "model.safetensors").write_bytes(CORRUPT)

    hf_bad = d / "hf-bad"
    hf_bad.mkdir()
    (hf_bad / "config.json").write_text(json.dumps({**hf_config_dict(from_preset("tiny")), "model_type": "mistral"}))
    hf_corrupt = d / "hf-corrupt"
    hf_corrupt.mkdir()
    (hf_corrupt / "config.json").write_text(json.dumps(hf_config_dict(from_preset("tiny"))))
    (hf_corrupt / "model.safetensors").write_bytes(CORRUPT)

    latin = d / "latin1.txt"
    latin.write_bytes("Ophélie, ô rose de mai\n".encode("latin-1"))
    return SimpleNamespace(
        d=d,
        corpus=corpus,
        data=d / "data",
        shortval=d / "shortval",
        ck=ck,
        learned=learned,
        badquant=badquant,
        corrupt=corrupt,
        notok=notok,
        sp=sp,
        sp_corrupt=sp_corrupt,
        hf_bad=hf_bad,
        hf_corrupt=hf_corrupt,
        latin=latin,
        missing=d / "missing",
        gone=d / "gone.py",
        out=d / "out",
    )


def run_cli(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def run_forks(cases: list[dict], timeout: float) -> list[dict]:
    """tests/cli_forks.py over the cases: one {returncode, stdout, stderr} per case."""
    r = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "cli_forks.py")],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def assert_one_line_error(r: subprocess.CompletedProcess, names: list[str]) -> str:
    assert "Traceback" not in r.stderr, f"a traceback instead of one error line:\n{r.stderr[-3000:]}"
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), f"not one `error:` line on stderr:\n{r.stderr[-3000:]}"
    assert r.returncode == 2, f"exit code {r.returncode}, not 2: {lines[0]}"
    for name in names:
        assert name in lines[0], f"the error does not name {name!r}: {lines[0]}"
    return lines[0]


# (what, argv, what the error line must name); "{field}" is filled in from the fixture f, after
# the argv is split on spaces (so paths with spaces stay one argument)
CASES: dict[str, list[tuple[str, str, list[str]]]] = {
    "generate.py": [
        ("argparse: not a number", "--checkpoint {ck} --max-new-tokens abc", ["--max-new-tokens", "abc"]),
        ("cli: bad --dtype", "--checkpoint {ck} --prompt a --dtype fp64", ["--dtype", "fp64"]),
        ("cli: bad --device", "--checkpoint {ck} --prompt a --device tpu", ["--device", "tpu"]),
        ("checkpoint: missing dir", "--checkpoint {missing} --prompt a", ["{missing}"]),
        ("checkpoint: corrupt weights", "--checkpoint {corrupt} --prompt a", ["{corrupt}/model.safetensors"]),
        ("quant: bad quantization block", "--checkpoint {badquant} --prompt a", ["{badquant}", "int7"]),
        ("tokenizer: no tokenizer file", "--checkpoint {notok} --prompt a", ["{notok}"]),
        ("tokenizer: unknown character", "--checkpoint {ck} --prompt € --max-new-tokens 2", ["'€'"]),
        ("generation: bad top-p", "--checkpoint {ck} --prompt a --top-p 1.5", ["top-p", "1.5"]),
        ("fast: unknown trick", "--checkpoint {ck} --prompt a --compile --tricks bogus", ["--tricks", "bogus"]),
        ("cli: --tricks without --compile", "--checkpoint {ck} --prompt a --tricks none", ["--tricks", "--compile"]),
        ("attention: plug-in not found", "--checkpoint {ck} --prompt a --attention {gone}:X", ["{gone}"]),
        ("cli: unreadable prompt file", "--checkpoint {ck} --prompt-file {missing}", ["--prompt-file"]),
    ],
    "quantize.py": [
        ("argparse: --mode missing", "--checkpoint {ck} --out {out}/q", ["--mode"]),
        ("quant: unknown mode", "--checkpoint {ck} --mode int7 --out {out}/q", ["mode", "int7"]),
        ("cli: --group-size without int4", "--checkpoint {ck} --mode int8 --group-size 32", ["--group-size"]),
        ("checkpoint: missing dir", "--checkpoint {missing} --mode int8", ["{missing}"]),
        (
            "checkpoint: corrupt weights",
            "--checkpoint {corrupt} --mode int8 --out {out}/q",
            ["{corrupt}/model.safetensors"],
        ),
        ("quant: bad quantization block", "--checkpoint {badquant} --mode int8 --out {out}/q", ["{badquant}"]),
        ("tokenizer: no tokenizer file", "--checkpoint {notok} --mode int8 --out {out}/q", ["{notok}"]),
        ("quant: --out is the input", "--checkpoint {ck} --mode int8 --out {ck}", ["--out"]),
    ],
    "train_ddp.py": [
        ("argparse: not a number", "--lr abc --out {out}/t --data-dir {out}/td0", ["--lr", "abc"]),
        ("config: unknown preset", "--preset nope --data {corpus} --out {out}/t --data-dir {out}/td6", ["nope"]),
        (
            "data: missing corpus",
            "--preset tiny --block-size 32 --data {missing} --out {out}/t --data-dir {out}/td7",
            ["{missing}"],
        ),
        (
            "data: bad --tokenizer",
            "--preset tiny --block-size 32 --data {corpus} --tokenizer sp:abc --out {out}/t --data-dir {out}/td1",
            ["--tokenizer", "sp:abc"],
        ),
        (
            "tokenizer: vocab too large",
            "--preset tiny --block-size 32 --data {corpus} --tokenizer sp:5000 --out {out}/t --data-dir {out}/td2",
            ["{corpus}", "5000"],
        ),
        ("training: missing --config", "--config {missing}.yaml --out {out}/t", ["{missing}.yaml"]),
        (
            "training: bad --block-size",
            "--preset tiny --data {corpus} --block-size 0 --out {out}/t --data-dir {out}/td3",
            ["--block-size"],
        ),
        (
            "attention: plug-in not found",
            "--preset tiny --block-size 32 --data {corpus} --attention {gone}:X --out {out}/t --data-dir {out}/td4",
            ["{gone}"],
        ),
        (
            "checkpoint: --resume without state",
            "--preset tiny --data {corpus} --block-size 32 --resume --out {out}/norun --data-dir {out}/td5",
            ["--resume", "{out}/norun"],
        ),
    ],
    "scripts/eval_ppl.py": [
        ("argparse: not a positive number", "--checkpoint {ck} --data {data} --batch-size 0", ["--batch-size"]),
        ("cli: bad --dtype", "--checkpoint {ck} --data {data} --dtype fp64", ["--dtype", "fp64"]),
        ("cli: bad --device", "--checkpoint {ck} --data {data} --device tpu", ["--device", "tpu"]),
        ("checkpoint: missing dir", "--checkpoint {missing} --data {data}", ["{missing}"]),
        ("checkpoint: corrupt weights", "--checkpoint {corrupt} --data {data}", ["{corrupt}/model.safetensors"]),
        ("quant: bad quantization block", "--checkpoint {badquant} --data {data}", ["{badquant}", "int7"]),
        ("tokenizer: no tokenizer file", "--checkpoint {notok} --data {data}", ["{notok}"]),
        ("data: missing dataset", "--checkpoint {ck} --data {missing}", ["{missing}/meta.json"]),
        ("data: another tokenizer", "--checkpoint {sp} --data {data}", ["{data}", "--data"]),
        (
            "cli: --block-size past learned positions",
            "--checkpoint {learned} --data {data} --block-size 65",
            ["--block-size", "{learned}"],
        ),
        ("evaluate: split shorter than a block", "--checkpoint {ck} --data {shortval}", ["{shortval}/val.bin"]),
    ],
    "scripts/convert_hf_checkpoint.py": [
        ("argparse: not a positive number", "--hf-dir {hf_corrupt} --max-seq-len 0 --out {out}/c", ["--max-seq-len"]),
        ("cli: bad --dtype", "--hf-dir {hf_corrupt} --dtype float64 --out {out}/c", ["--dtype", "float64"]),
        ("hf: missing dir", "--hf-dir {missing} --out {out}/c", ["{missing}"]),
        ("hf: unsupported config", "--hf-dir {hf_bad} --out {out}/c", ["{hf_bad}/config.json", "model_type"]),
        ("hf: corrupt weights", "--hf-dir {hf_corrupt} --out {out}/c", ["{hf_corrupt}/model.safetensors"]),
    ],
    "scripts/export_hf.py": [
        ("argparse: --out missing", "--checkpoint {sp}", ["--out"]),
        ("checkpoint: missing dir", "--checkpoint {missing} --out {out}/h", ["{missing}"]),
        ("checkpoint: corrupt weights", "--checkpoint {sp_corrupt} --out {out}/h", ["{sp_corrupt}/model.safetensors"]),
        ("hf: quantization block", "--checkpoint {badquant} --out {out}/h", ["{badquant}"]),
        ("tokenizer: char tokenizer", "--checkpoint {ck} --out {out}/h", ["{ck}", "char tokenizer"]),
        ("hf: --out is the checkpoint", "--checkpoint {sp} --out {sp}", ["--out"]),
    ],
    "scripts/export_gguf.py": [
        ("argparse: bad choice", "--checkpoint {sp} --out {out}/g.gguf --outtype q3_k", ["--outtype", "q3_k"]),
        ("checkpoint: missing dir", "--checkpoint {missing} --out {out}/g.gguf", ["{missing}"]),
        (
            "checkpoint: corrupt weights",
            "--checkpoint {sp_corrupt} --out {out}/g.gguf",
            ["{sp_corrupt}/model.safetensors"],
        ),
        ("hf: quantization block", "--checkpoint {badquant} --out {out}/g.gguf", ["{badquant}"]),
        ("gguf: --out is a directory", "--checkpoint {sp} --out {d}", ["--out"]),
    ],
    "scripts/prepare_data.py": [
        ("argparse: out of range", "--data {corpus} --val-fraction 1.5 --out {out}/p", ["--val-fraction", "1.5"]),
        ("data: missing corpus", "--data {missing} --out {out}/p", ["{missing}"]),
        ("data: not UTF-8", "--data {latin} --out {out}/p", ["{latin}"]),
        ("data: bad --tokenizer", "--data {corpus} --tokenizer sp:abc --out {out}/p", ["--tokenizer", "sp:abc"]),
        ("tokenizer: vocab too large", "--data {corpus} --tokenizer sp:5000 --out {out}/p", ["{corpus}", "5000"]),
    ],
    "scripts/train_tokenizer.py": [
        ("argparse: not a positive number", "--data {corpus} --vocab-size 0 --out {out}/k", ["--vocab-size"]),
        ("data: missing corpus", "--data {missing} --out {out}/k", ["{missing}"]),
        ("tokenizer: vocab too large", "--data {corpus} --vocab-size 5000 --out {out}/k", ["{corpus}", "5000"]),
    ],
    "scripts/new_checkpoint.py": [
        ("argparse: unknown preset", "--preset nope --out {out}/n", ["--preset", "nope"]),
        ("cli: bad --dtype", "--preset tiny --dtype fp64 --out {out}/n", ["--dtype", "fp64"]),
        ("tokenizer: no tokenizer there", "--preset tiny --tokenizer {missing} --out {out}/n", ["{missing}"]),
    ],
    "scripts/bench_generate.py": [
        ("argparse: unknown row", "--rows nope", ["--rows", "nope"]),
        ("argparse: not a positive number", "--max-new-tokens 0", ["--max-new-tokens"]),
        ("cli: --out is a directory", "--rows fp32-eager --out {d}", ["--out"]),
    ],
    "scripts/bench_train.py": [
        ("argparse: not a number", "--steps abc --out {out}/b.md", ["--steps", "abc"]),
    ],
    "scripts/compare_attention.py": [
        ("argparse: not a number", "--variants sdpa --steps abc", ["--steps", "abc"]),
        ("argparse: bad --eval-lengths", "--variants sdpa --steps 2 --eval-lengths 64,x", ["--eval-lengths", "64,x"]),
        ("data: missing corpus", "--variants sdpa --steps 2 --data {missing} --out {out}/ca", ["{missing}"]),
    ],
    "scripts/plot_attention.py": [
        ("argparse: not a number", "--checkpoint {ck} --prompt ab --layer abc", ["--layer", "abc"]),
        ("checkpoint: missing dir", "--checkpoint {missing} --prompt ab", ["{missing}"]),
        (
            "checkpoint: corrupt weights",
            "--checkpoint {corrupt} --prompt ab --out {out}/a.png",
            ["{corrupt}/model.safetensors"],
        ),
        (
            "quant: bad quantization block",
            "--checkpoint {badquant} --prompt ab --out {out}/a.png",
            ["{badquant}", "int7"],
        ),
    ],
}


def _case_argv(f: SimpleNamespace, script: str, argv: str) -> list[str]:
    fields = {k: str(v) for k, v in vars(f).items()}
    if script == "train_ddp.py":  # should the input be accepted after all, the run stays short
        argv += " --max-steps 1 --no-progress"
    return [script, *(a.format(**fields) for a in argv.split())]


@pytest.fixture(scope="module")
def bad_runs(f) -> dict[tuple[str, str], subprocess.CompletedProcess]:
    """Every case of CASES, run once: as forks of one process that has imported torch
    (tests/cli_forks.py, a few minutes faster than 79 fresh interpreters), or one
    subprocess each where there is no fork()."""
    keys = [(s, a) for s, rows in CASES.items() for _, a, _ in rows]
    argvs = [_case_argv(f, s, a) for s, a in keys]
    if not hasattr(os, "fork"):
        return {k: run_cli(v) for k, v in zip(keys, argvs, strict=True)}
    out = run_forks([{"argv": v, "cwd": str(ROOT), "timeout": 300} for v in argvs], timeout=1800)
    return {
        k: subprocess.CompletedProcess(v, o["returncode"], o["stdout"], o["stderr"])
        for k, v, o in zip(keys, argvs, out, strict=True)
    }


@pytest.mark.parametrize(
    "script, argv, names",
    [pytest.param(s, a, n, id=f"{s} {what}") for s, rows in CASES.items() for what, a, n in rows],
)
def test_bad_input_is_one_error_line(f, bad_runs, script, argv, names):
    fields = {k: str(v) for k, v in vars(f).items()}
    assert_one_line_error(bad_runs[(script, argv)], [n.format(**fields) for n in names])


def test_train_ddp_resume_from_a_corrupt_state_is_one_error_line(f, tmp_path):
    common = ["--preset", "tiny", "--data", str(f.corpus), "--data-dir", str(tmp_path / "data"), "--block-size", "32"]
    common += ["--batch-size", "2", "--eval-iters", "1", "--eval-interval", "2", "--out", str(tmp_path / "run")]
    common += ["--threads", "1", "--no-progress"]
    r = run_cli(["train_ddp.py", *common, "--max-steps", "2"])
    assert r.returncode == 0, r.stderr[-3000:]
    state_weights = tmp_path / "run" / "state" / "model.safetensors"
    assert state_weights.exists()
    state_weights.write_bytes(CORRUPT)
    assert_one_line_error(run_cli(["train_ddp.py", *common, "--max-steps", "4", "--resume"]), [str(state_weights)])


def test_bench_generate_writes_the_whole_markdown_file(tmp_path):
    """The file the README links to: title, the command that made it, the machine (CPU flags
    included), the settings and the table, written by the script itself."""
    out = tmp_path / "docs" / "bench.md"
    argv = ["--shapes", "stories15M", "--rows", "fp32-eager", "--max-new-tokens", "2", "--prompt-tokens", "2"]
    argv += ["--rounds", "1", "--threads", "1", "--out", str(out)]
    r = run_cli(["scripts/bench_generate.py", *argv])
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.read_text()
    lines = text.splitlines()
    assert lines[0] == "# Generation benchmark (scripts/bench_generate.py)"
    assert f"`python scripts/bench_generate.py {' '.join(argv)}`" in text
    machine = next(line for line in lines if line.startswith("Machine: "))
    for flag in ("avx2", "avx512f", "avx512_vnni", "amx"):
        assert f"{flag} yes" in machine or f"{flag} no" in machine or f"{flag} ?" in machine
    assert "2 new tokens" in text and "1 thread(s)" in machine
    table = [line for line in lines if line.startswith("| ")]
    assert table[0].startswith("| shape | row | tokens/s |")
    row = next(line for line in table if line.startswith("| stories15M | fp32-eager | "))
    assert float(row.split("|")[3]) > 0  # tokens/s was measured


def test_the_fork_runner_reports_what_a_fresh_process_would(tmp_path):
    """tests/cli_forks.py must not hide a traceback, a warning or an exit status from the cases."""
    script = tmp_path / "s.py"
    script.write_text(
        "import sys, warnings\nwarnings.warn('w1')\nprint('out')\n"
        "if sys.argv[1] == 'boom':\n    raise ValueError('x')\nsys.exit(int(sys.argv[1]))\n"
    )
    cases = [{"argv": [str(script), a], "cwd": str(tmp_path)} for a in ("boom", "3", "0")]
    boom, three, zero = run_forks(cases, timeout=120)
    assert boom["returncode"] == 1 and "Traceback" in boom["stderr"] and "ValueError: x" in boom["stderr"]
    assert [three["returncode"], zero["returncode"]] == [3, 0]
    for o in (boom, three, zero):
        assert o["stdout"] == "out\n" and "UserWarning: w1" in o["stderr"]
