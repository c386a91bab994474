"""gpt.compile_cache: the vector-ISA probe is skipped only after a run found every ISA usable."""

import json

import pytest
import torch._inductor.config as inductor_config
import torch._inductor.cpu_vec_isa as cpu_vec_isa

from gpt import compile_cache


class FakeISA:
    def __init__(self, name: str, ok: bool) -> None:
        self.name, self.ok = name, ok

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        return self.name


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    if compile_cache.isa_key() is None:  # not x86-64 Linux: a stand-in key, keyed by torch's version too
        monkeypatch.setattr(compile_cache, "isa_key", lambda: "stand-in-" + compile_cache.torch.__version__)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with inductor_config.patch({"cpp.vec_isa_ok": None, "fx_graph_cache": False}):
        yield tmp_path


def test_a_verdict_is_written_when_every_isa_passes_and_later_runs_skip_the_probe(fresh, monkeypatch):
    monkeypatch.setattr(cpu_vec_isa, "valid_vec_isa_list", lambda: [FakeISA("avx512", True), FakeISA("avx2", True)])
    compile_cache.enable_compile_caches()
    assert inductor_config.cpp.vec_isa_ok is None and inductor_config.fx_graph_cache  # first run: probe
    assert compile_cache.remember_vec_isa_probe()
    (verdict,) = (fresh / "gpt" / "inductor-isa").glob("*.json")
    assert json.loads(verdict.read_text())["isas"] == ["avx512", "avx2"]
    compile_cache.enable_compile_caches()
    assert inductor_config.cpp.vec_isa_ok is True  # the next run trusts it


def test_no_verdict_when_an_isa_fails_so_inductor_keeps_probing(fresh, monkeypatch):
    monkeypatch.setattr(cpu_vec_isa, "valid_vec_isa_list", lambda: [FakeISA("avx512", False), FakeISA("avx2", True)])
    assert not compile_cache.remember_vec_isa_probe()
    assert not (fresh / "gpt" / "inductor-isa").exists()
    compile_cache.enable_compile_caches()
    assert inductor_config.cpp.vec_isa_ok is None


def test_the_verdict_is_keyed_by_cpu_compiler_and_torch(fresh, monkeypatch):
    monkeypatch.setattr(cpu_vec_isa, "valid_vec_isa_list", lambda: [FakeISA("avx2", True)])
    assert compile_cache.remember_vec_isa_probe()
    monkeypatch.setattr(compile_cache.torch, "__version__", "0.0.0-another-build")
    compile_cache.enable_compile_caches()
    assert inductor_config.cpp.vec_isa_ok is None  # another torch: probe again


def test_no_key_where_inductor_does_not_probe(monkeypatch):
    monkeypatch.setattr(compile_cache.platform, "machine", lambda: "arm64")
    assert compile_cache.isa_key() is None
    monkeypatch.setattr(compile_cache.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(compile_cache.platform, "system", lambda: "Darwin")
    assert compile_cache.isa_key() is None
