"""The conformance suite: every built-in passes, and deliberately broken variants are caught by name."""

import ast
import math
import re
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from gpt.attention import _REGISTRY, Attention, available, causal_mask, register_attention, repeat_kv
from gpt.attention import check as check_mod
from gpt.attention.check import MODE_PROPERTIES, PROPERTIES
from gpt.attention.linear import LinearAttention
from gpt.attention.softmax import SoftmaxAttention
from gpt.config import ConfigError
from gpt.model import Transformer

ROOT = Path(__file__).resolve().parent.parent

# the suite takes the model from its caller, as scripts/check_attention.py gives it
run_checks = partial(check_mod.run_checks, model_factory=Transformer)
assert_conforms = partial(check_mod.assert_conforms, model_factory=Transformer)
main = partial(check_mod.main, model_factory=Transformer)

# every built-in with the kwargs that make it differ from plain causal attention at the suite's sizes
BUILTINS = {
    "sdpa": ({}, "rope"),
    "math": ({}, "rope"),
    "sliding_window": ({"window": 4}, "rope"),
    "alibi": ({}, "none"),
    "softcap": ({"cap": 1.0}, "rope"),
    "sigmoid": ({}, "rope"),
    "linear": ({}, "rope"),
    "sinks": ({"window": 6}, "learned"),
    "differential": ({}, "sinusoidal"),
}


def test_every_builtin_is_covered():
    assert sorted(BUILTINS) == available()


def failures(results):
    return {r.name: r.detail for r in results if not r.passed}


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_builtin_conforms(name):
    """Every built-in claims all three modes and keeps the contract in each."""
    kwargs, pos = BUILTINS[name]
    results = run_checks(name, kwargs, pos_encoding=pos, skip=["compile"])
    mode_rows = [f"{m}.{p}" for m in ("bidirectional", "cross") for p in MODE_PROPERTIES if p != "compile"]
    assert [r.name for r in results] == [p for p in PROPERTIES if p != "compile"] + mode_rows
    assert failures(results) == {}


def test_builtin_calls_capture_as_one_graph_in_every_mode():
    """torch.compile(fullgraph=True) of the bidirectional and cross calls (eager backend: capture only)."""
    for name, (kwargs, pos) in BUILTINS.items():
        skip = [p for p in MODE_PROPERTIES if p != "compile"]
        results = run_checks(
            name, kwargs, pos_encoding=pos, skip=skip, compile_backend="eager", modes=["bidirectional", "cross"]
        )
        assert [r.name for r in results] == ["bidirectional.compile", "cross.compile"]
        assert failures(results) == {}, name


@pytest.mark.slow
def test_flex_variants_compile_with_inductor_in_the_encoder_and_cross_modes():
    skip = [p for p in MODE_PROPERTIES if p != "compile"]
    results = run_checks("alibi", {}, pos_encoding="none", skip=skip, modes=["bidirectional", "cross"])
    assert failures(results) == {} and {r.detail for r in results} == {"ok (inductor)"}


@pytest.mark.slow
def test_builtin_decode_steps_capture_as_one_graph():
    """torch.compile(fullgraph=True) of each built-in's decode step (dynamo capture, eager backend)."""
    for name, (kwargs, pos) in BUILTINS.items():
        only_compile = [p for p in PROPERTIES if p != "compile"]
        results = run_checks(
            name, kwargs, pos_encoding=pos, skip=only_compile, compile_backend="eager", modes=["causal"]
        )
        assert failures(results) == {}, name


@pytest.mark.slow
@pytest.mark.parametrize("name", ["alibi", "linear"])
def test_decode_step_compiles_with_inductor(name):
    """What generate.py does: an inductor-compiled decode step (flex path without RoPE / recurrent state)."""
    kwargs, pos = BUILTINS[name]
    only_compile = [p for p in PROPERTIES if p != "compile"]
    results = run_checks(name, kwargs, pos_encoding=pos, skip=only_compile, modes=["causal"])
    assert failures(results) == {} and results[0].detail == "ok (inductor)"


# -- deliberately broken variants ---------------------------------------------------------


@pytest.fixture
def broken():
    """Register test-only variants; remove them afterwards."""
    added = []

    def add(name, cls):
        register_attention(name)(cls)
        added.append(name)
        return name

    yield add
    for name in added:
        _REGISTRY.pop(name)


class LeaksTheFuture(Attention):
    """Softmax attention that forgets the causal mask (keeps padding, so only causality is wrong)."""

    def forward(self, q, k, v, q_pos, k_pos, key_padding_mask=None, return_weights=False):
        k, v = repeat_kv(k, 2), repeat_kv(v, 2)
        s = q @ k.mT / math.sqrt(q.size(-1))
        if key_padding_mask is not None:
            s = s.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
        w = s.softmax(-1)
        return (w @ v, w) if return_weights else w @ v


class ForgetfulLinear(LinearAttention):
    """Linear attention whose state update overwrites instead of accumulating."""

    def _add_state(self, fq, fk, vf, input_pos, num, den, n_rep):
        b = fq.size(0)
        num = num + fq @ repeat_kv(self.state[:b], n_rep)
        den = den + (fq * repeat_kv(self.normalizer[:b], n_rep)[:, :, None, :]).sum(-1, keepdim=True)
        self.state[:b].copy_(fk.mT @ vf)  # bug: drops everything before this chunk
        self.normalizer[:b].copy_(fk.sum(2))
        return num, den


class BreaksTheGraph(Attention):
    """Correct numbers, but a data-dependent Python branch: torch.compile(fullgraph=True) cannot capture it."""

    def forward(self, q, k, v, q_pos, k_pos, key_padding_mask=None, return_weights=False):
        k, v = repeat_kv(k, 2), repeat_kv(v, 2)
        s = q @ k.mT / math.sqrt(q.size(-1))
        if s.abs().max().item() > 1e6:  # a "safety" check that syncs and leaves the graph
            s = s.clamp(-1e6, 1e6)
        w = s.masked_fill(~causal_mask(q_pos, k_pos, key_padding_mask), float("-inf")).softmax(-1)
        return (w @ v, w) if return_weights else w @ v


class DetachesTheKeys(Attention):
    """Right numbers, wrong gradients: the scores see a detached copy of the keys."""

    def forward(self, q, k, v, q_pos, k_pos, key_padding_mask=None, return_weights=False):
        k, v = repeat_kv(k, 2), repeat_kv(v, 2)
        s = q @ k.detach().mT / math.sqrt(q.size(-1))
        w = s.masked_fill(~causal_mask(q_pos, k_pos, key_padding_mask), float("-inf")).softmax(-1)
        return (w @ v, w) if return_weights else w @ v


class IgnoresPadding(Attention):
    """Causal softmax attention that drops the key-padding mask: a padded row reads its pad tokens."""

    def forward(self, q, k, v, q_pos, k_pos, key_padding_mask=None, return_weights=False):
        k, v = repeat_kv(k, 2), repeat_kv(v, 2)
        s = q @ k.mT / math.sqrt(q.size(-1))
        w = s.masked_fill(~causal_mask(q_pos, k_pos), float("-inf")).softmax(-1)
        return (w @ v, w) if return_weights else w @ v


def test_future_leak_is_caught_as_causality(broken):
    results = run_checks(broken("test_leaky", LeaksTheFuture), skip=["gradients", "compile"])
    fails = failures(results)
    assert "causality" in fails and "future leaks" in fails["causality"]
    assert "shape" not in fails


def test_wrong_state_update_is_caught_as_cache(broken):
    results = run_checks(broken("test_forgetful", ForgetfulLinear), skip=["gradients", "compile"])
    fails = failures(results)
    assert list(fails) == ["cache"]
    assert "cached decoding differs from the full forward" in fails["cache"]
    # the prefill (0..4) and token 5 read a correct state; token 5 then overwrites it
    assert "(first at position 6)" in fails["cache"]


def test_wrong_gradient_is_caught_as_gradients(broken):
    results = run_checks(broken("test_detached", DetachesTheKeys), skip=["compile"])
    fails = failures(results)
    assert list(fails) == ["gradients"]
    # gradcheck's own reason: the Jacobian with respect to k (input 1) is wrong
    assert fails["gradients"].startswith("gradcheck: Jacobian mismatch for output 0 with respect to input 1")


def test_ignored_padding_is_caught_as_padding(broken):
    results = run_checks(broken("test_no_padding", IgnoresPadding), skip=["compile"])
    fails = failures(results)
    assert list(fails) == ["padding"]
    assert fails["padding"].startswith("full forward: a left-padded row differs from the prompt alone by")


def test_graph_break_is_caught_as_compile(broken):
    results = run_checks(broken("test_graph_break", BreaksTheGraph), skip=["gradients"], compile_backend="eager")
    fails = failures(results)
    assert list(fails) == ["compile"]
    assert fails["compile"].startswith("torch.compile(fullgraph=True) failed:")


def test_assert_conforms_shows_the_table(broken):
    with pytest.raises(AssertionError, match=r"causality\s+FAIL.*future leaks"):
        assert_conforms(broken("test_leaky2", LeaksTheFuture), skip=["gradients", "compile"])
    assert len(assert_conforms("sdpa", skip=["gradients", "compile"], modes=["causal"])) == 4


class ForgetsTheMode(SoftmaxAttention):
    """Claims every mode but always applies the causal mask (a forward that drops `mode`)."""

    def forward(self, q, k, v, q_pos, k_pos, key_padding_mask=None, return_weights=False, mode="causal"):
        return super().forward(q, k, v, q_pos, k_pos, key_padding_mask, return_weights)


class DistanceByIndex(SoftmaxAttention):
    """A symmetric distance penalty computed from the tensor index instead of q_pos / k_pos."""

    def forward(self, q, k, v, q_pos, k_pos, key_padding_mask=None, return_weights=False, mode="causal"):
        if mode != "bidirectional":
            return super().forward(q, k, v, q_pos, k_pos, key_padding_mask, return_weights, mode)
        t = torch.arange(q.size(2))  # bug: the index, not the position it was given
        s = q @ repeat_kv(k, 2).mT / math.sqrt(q.size(-1)) - 0.5 * (t[:, None] - t[None, :]).abs()
        if key_padding_mask is not None:
            s = s.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
        w = s.softmax(-1)
        return (w @ repeat_kv(v, 2), w) if return_weights else w @ repeat_kv(v, 2)


def test_a_variant_that_ignores_the_mode_fails_visibility(broken):
    results = run_checks(broken("test_forgets_mode", ForgetsTheMode), skip=["compile", "gradients"])
    fails = failures(results)
    assert set(fails) == {"bidirectional.visibility", "cross.visibility"}
    assert "hidden as future?" in fails["bidirectional.visibility"]


def test_positions_from_the_tensor_index_fail_permutation(broken):
    results = run_checks(
        broken("test_by_index", DistanceByIndex), skip=["compile", "gradients"], modes=["bidirectional"]
    )
    assert list(failures(results)) == ["bidirectional.permutation"]


def test_modes_a_variant_does_not_claim_are_not_checked(broken):
    name = broken("test_leaky_modes", LeaksTheFuture)
    assert {r.name for r in run_checks(name, skip=["gradients", "compile"])} == set(PROPERTIES) - {
        "gradients",
        "compile",
    }
    with pytest.raises(ConfigError, match="claims modes causal, not bidirectional"):
        run_checks(name, modes=["bidirectional"])


def test_unknown_check_or_kwargs_are_config_errors():
    with pytest.raises(ConfigError, match="unknown check"):
        run_checks("sdpa", skip=["speed"])
    with pytest.raises(ConfigError, match="rejected attention_kwargs"):
        run_checks("sliding_window", {"width": 3})


# -- the CLI --------------------------------------------------------------------------------


def test_cli_prints_the_table_and_exits_0(capsys):
    assert main(["sliding_window", "--kwargs", '{"window": 3}', "--skip", "gradients,compile"]) == 0
    out = capsys.readouterr().out
    for prop in ("shape", "causality", "cache", "padding"):
        assert f"{prop} " in out
    assert "sliding_window: all properties hold" in out


def test_cli_exits_1_on_a_failing_property(broken, capsys):
    assert main([broken("test_leaky3", LeaksTheFuture), "--skip", "gradients,compile"]) == 1
    out = capsys.readouterr().out
    assert "causality  FAIL" in out and "properties FAIL" in out


def test_cli_bad_input_is_one_line_exit_2(capsys):
    assert main(["no_such_attention"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown attention 'no_such_attention'") and err.count("\n") == 1
    assert main(["sdpa", "--kwargs", "[1, 2]"]) == 2
    assert "error: --kwargs '[1, 2]' is not a JSON object" in capsys.readouterr().err
    assert main(["sdpa", "--kwargs", "{window: 3}"]) == 2
    assert "is not a JSON object" in capsys.readouterr().err


def test_check_attention_script_runs_the_suite():
    """The command a user runs: the script gives the suite the model."""
    cmd = [sys.executable, str(ROOT / "scripts" / "check_attention.py"), "sdpa", "--skip", "gradients,compile"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "sdpa: all properties hold" in done.stdout
    assert re.search(r"^padding\s+pass", done.stdout, re.M) and re.search(r"^cross\.padding\s+pass", done.stdout, re.M)


def test_the_attention_package_imports_no_model_and_no_speed_tricks():
    """A variant's code and its test suite stand below the model; gpt.fast transforms them from outside."""
    for path in sorted((ROOT / "gpt" / "attention").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                assert not name.startswith(("gpt.model", "gpt.fast", "gpt.generation")), f"{path.name} imports {name}"


PLUGIN_ALL_MODES = '''
import math

from gpt.attention import MODES, Attention, attention_mask, repeat_kv


class CosineAllModes(Attention):
    """A user's variant written once for all three modes: attention_mask gives each mode's mask."""

    modes = MODES

    def forward(self, q, k, v, q_pos, k_pos, key_padding_mask=None, return_weights=False, mode="causal"):
        n = q.size(1) // k.size(1)
        k, v = repeat_kv(k, n), repeat_kv(v, n)
        s = 4.0 * q.div(q.norm(dim=-1, keepdim=True)) @ k.div(k.norm(dim=-1, keepdim=True)).mT
        mask = attention_mask(q_pos, k_pos, key_padding_mask, mode)
        w = (s if mask is None else s.masked_fill(~mask, -math.inf)).softmax(-1)
        return (w @ v, w) if return_weights else w @ v
'''


def test_a_plugin_file_is_checked_in_every_mode_it_claims(tmp_path):
    path = tmp_path / "cosine_modes.py"
    path.write_text(PLUGIN_ALL_MODES)
    try:
        results = run_checks(f"{path}:CosineAllModes", skip=["compile"])
        assert failures(results) == {}
        assert {r.name.partition(".")[0] for r in results if "." in r.name} == {"bidirectional", "cross"}
        assert len(results) == 5 + 2 * 5
    finally:
        _REGISTRY.pop("CosineAllModes", None)
