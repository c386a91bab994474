"""Conformance suite: does an attention variant keep the promises the rest of the toolkit relies on?

    python scripts/check_attention.py NAME [--kwargs JSON] [--pos-encoding none] [--skip compile]
    python scripts/check_attention.py my_attn.py:MyAttention

prints one row per property with the reason for each failure, and exits 0 only if all pass:

    shape       (B, Hq, Tq, D) out for a full forward and for one query against a static cache
    causality   perturbing tokens at positions >= t changes no output before t
    gradients   torch.autograd.gradcheck in float64 at tiny sizes
    cache       token-by-token decoding through the cache equals the full forward (and a reused cache too)
    padding     a left-padded row (key_padding_mask + pos_offset) equals that prompt alone
    compile     torch.compile(fullgraph=True) of the one-token decode step runs and equals eager

and, for each other mode the variant claims (its `modes`), the mixing module alone in that mode,
rows named MODE.PROPERTY (bidirectional.padding, cross.compile, ...):

    shape        (B, Hq, Tq, D) out, finite, and the weights' shape with return_weights
    visibility   nothing but padding is hidden: every output depends on every real key
    padding      padded keys (key_padding_mask) and extra padded queries change no real output,
                 and no output is NaN (a padding query out of reach of every real key sees itself)
    permutation  permuting tokens together with their positions permutes the outputs (cross: a
                 permuted source changes nothing); positions are the only order a variant may use
    gradients    gradcheck in float64, with padding
    compile      torch.compile(fullgraph=True) of the call, no gradients (the flex path), equals eager

--modes picks the modes to check (default: all the variant claims); --skip NAME skips that
property in every mode, --skip MODE.NAME in one.

The cache, padding and compile properties decode through a whole model, which the caller
passes in (this package does not import the model): `model_factory` builds it from a
ModelConfig and must offer what gpt.model.Transformer does (forward(idx, input_pos,
key_padding_mask=, pos_offset=), setup_caches). From pytest, a plug-in author calls

    from gpt.model import Transformer
    assert_conforms("my_attn", {...}, model_factory=Transformer)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.autograd.gradcheck import GradcheckError

from gpt.attention import MODES, Attention, build_attention, get_attention, resolve_attention
from gpt.config import ModelConfig
from gpt.errors import ConfigError

PROPERTIES = ("shape", "causality", "gradients", "cache", "padding", "compile")
# the checks of the bidirectional and cross modes (rows MODE.NAME)
MODE_PROPERTIES = ("shape", "visibility", "padding", "permutation", "gradients", "compile")
ModelFactory = Callable[[ModelConfig], nn.Module]


class CheckFailed(AssertionError):
    """A property does not hold; the message says how."""


@dataclass
class CheckResult:
    name: str
    passed: bool
    detail: str
    seconds: float


@dataclass
class Subject:
    """The variant under test, at tiny sizes: GQA (4 query heads, 2 kv heads), head_dim 8."""

    config: ModelConfig
    atol: float
    compile_backend: str
    model_factory: ModelFactory


def tiny_config(attention: str, kwargs: dict[str, Any] | None = None, pos_encoding: str = "rope") -> ModelConfig:
    return ModelConfig(
        vocab_size=32,
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        max_seq_len=16,
        attention=attention,
        attention_kwargs=dict(kwargs or {}),
        pos_encoding=pos_encoding,
    )


def _qkv(b: int, t: int, dtype=torch.float32, gen: torch.Generator | None = None):
    q = torch.randn(b, 4, t, 8, dtype=dtype, generator=gen)
    k = torch.randn(b, 2, t, 8, dtype=dtype, generator=gen)
    v = torch.randn(b, 2, t, 8, dtype=dtype, generator=gen)
    return q, k, v


def _gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def _model(s: Subject) -> nn.Module:
    torch.manual_seed(0)
    m = s.model_factory(s.config).eval()
    # A fresh variant's own parameters may start at a trivial value (e.g. zero sink logits),
    # which could hide a wrong use of them: move them off it.
    with torch.no_grad():
        for mix in (mod for mod in m.modules() if isinstance(mod, Attention)):
            for p in mix.parameters():
                p.add_(0.5 * torch.randn_like(p))
    return m


# -- the properties ----------------------------------------------------------------------


def check_shape(s: Subject) -> str:
    mix = build_attention(s.config).eval()
    q, k, v = _qkv(2, 7)
    pos = torch.arange(7)
    with torch.no_grad():
        out = mix(q, k, v, pos, pos)
        if tuple(out.shape) != (2, 4, 7, 8):
            raise CheckFailed(f"full forward returned {tuple(out.shape)}, expected (2, 4, 7, 8)")
        if not torch.isfinite(out).all():
            raise CheckFailed("full forward returned NaN or inf")
        if not mix.replaces_kv_cache:  # one query against a 12-slot static cache
            qs, ks, vs = _qkv(2, 12)
            out = mix(qs[:, :, :1], ks, vs, torch.tensor([6]), torch.arange(12))
            if tuple(out.shape) != (2, 4, 1, 8):
                raise CheckFailed(
                    f"one query against a static cache returned {tuple(out.shape)}, expected (2, 4, 1, 8)"
                )
        try:
            out, w = mix(q, k, v, pos, pos, return_weights=True)
        except NotImplementedError:
            return "ok (no return_weights)"
        if tuple(w.shape) != (2, 4, 7, 7):
            raise CheckFailed(f"return_weights gave weights of shape {tuple(w.shape)}, expected (2, 4, 7, 7)")
    return "ok"


def check_causality(s: Subject) -> str:
    mix = build_attention(s.config).eval()
    gen = torch.Generator().manual_seed(1)
    q, k, v = _qkv(2, 8, gen=gen)
    pos = torch.arange(8)
    with torch.no_grad():
        ref = mix(q, k, v, pos, pos)
        for t in (1, 4, 7):
            q2, k2, v2 = q.clone(), k.clone(), v.clone()
            for x in (q2, k2, v2):
                x[:, :, t:] += 3.0 * torch.randn(x[:, :, t:].shape, generator=gen)
            gap = _gap(mix(q2, k2, v2, pos, pos)[:, :, :t], ref[:, :, :t])
            if gap > s.atol:
                raise CheckFailed(f"changing positions >= {t} changed earlier outputs by {gap:.2e} (future leaks)")
    return "ok"


def check_gradients(s: Subject) -> str:
    mix = build_attention(s.config).double().train()
    gen = torch.Generator().manual_seed(2)
    q, k, v = (x.requires_grad_() for x in _qkv(1, 5, torch.float64, gen))
    pos = torch.arange(5)
    try:
        torch.autograd.gradcheck(lambda q, k, v: mix(q, k, v, pos, pos), (q, k, v), eps=1e-6, atol=1e-5, fast_mode=True)
    except GradcheckError as e:
        raise CheckFailed(f"gradcheck: {str(e).splitlines()[0]}") from None
    return "ok"


def check_cache(s: Subject) -> str:
    m = _model(s)
    gen = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 32, (2, 12), generator=gen)
    other = torch.randint(0, 32, (2, 12), generator=gen)
    with torch.no_grad():
        full, full_other = m(idx), m(other)
        m.setup_caches(2, 16)
        for label, seq, ref in (("", idx, full), (" after reusing the cache", other, full_other)):
            outs = [m(seq[:, :5], torch.arange(5))]  # prefill, then one token at a time
            outs += [m(seq[:, t : t + 1], torch.tensor([t])) for t in range(5, 12)]
            got = torch.cat(outs, dim=1)
            gaps = (got - ref).abs().amax(dim=(0, 2))
            if gaps.max() > s.atol:
                where = int((gaps > s.atol).nonzero()[0])
                raise CheckFailed(
                    f"cached decoding{label} differs from the full forward by {gaps.max():.2e} "
                    f"(first at position {where})"
                )
    return "ok"


def check_padding(s: Subject) -> str:
    m = _model(s)
    gen = torch.Generator().manual_seed(4)
    a, b = torch.randint(0, 32, (9,), generator=gen), torch.randint(0, 32, (5,), generator=gen)
    pad = torch.tensor([0, 4])
    batch = torch.stack([a, torch.cat([torch.full((4,), 7), b])])  # row 1: 4 pad tokens, then b
    kpm = torch.ones(2, 16, dtype=torch.bool)
    kpm[1, :4] = False
    with torch.no_grad():
        ref_a, ref_b = m(torch.cat([a, torch.tensor([3])])[None]), m(torch.cat([b, torch.tensor([5])])[None])
        out = m(batch, key_padding_mask=kpm[:, :9], pos_offset=pad)
        gap = max(_gap(out[0], ref_a[0, :9]), _gap(out[1, 4:], ref_b[0, :5]))
        if gap > s.atol:
            raise CheckFailed(f"full forward: a left-padded row differs from the prompt alone by {gap:.2e}")
        m.setup_caches(2, 16)
        out = m(batch, torch.arange(9), key_padding_mask=kpm, pos_offset=pad)
        nxt = m(torch.tensor([[3], [5]]), torch.tensor([9]), key_padding_mask=kpm, pos_offset=pad)
        gap = max(_gap(out[1, 4:], ref_b[0, :5]), _gap(nxt[0, 0], ref_a[0, 9]), _gap(nxt[1, 0], ref_b[0, 5]))
        if gap > s.atol:
            raise CheckFailed(f"cached decoding: a left-padded row differs from the prompt alone by {gap:.2e}")
    return "ok"


def check_compile(s: Subject) -> str:
    m = _model(s)
    idx = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(5))
    # as generate.py decodes a batch: row 1 is left-padded by 2 tokens
    kpm, pad = torch.ones(2, 16, dtype=torch.bool), torch.tensor([0, 2])
    kpm[1, :2] = False
    torch._dynamo.reset()  # a fresh compile: no graphs or guards left over from earlier checks

    def step(tok, pos):
        return m(tok, pos, key_padding_mask=kpm, pos_offset=pad)

    with torch.no_grad():
        m.setup_caches(2, 16)
        step(idx[:, :4], torch.arange(4))
        eager = [step(idx[:, t : t + 1], torch.tensor([t])) for t in range(4, 8)]
        step(idx[:, :4], torch.arange(4))  # the same prefix again, so the compiled steps see the same state
        compiled_step = torch.compile(step, fullgraph=True, dynamic=False, backend=s.compile_backend)
        try:
            compiled = [compiled_step(idx[:, t : t + 1], torch.tensor([t])) for t in range(4, 8)]
        except Exception as e:
            first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
            raise CheckFailed(f"torch.compile(fullgraph=True) failed: {type(e).__name__}: {first}") from None
    gap = max(_gap(c, e) for c, e in zip(compiled, eager, strict=True))
    if gap > s.atol:
        raise CheckFailed(f"the compiled decode step differs from eager by {gap:.2e}")
    return f"ok ({s.compile_backend})"


# -- the bidirectional and cross modes: the mixing module alone -------------------------


def _mode_inputs(mode: str, b: int, tq: int, gen: torch.Generator, dtype=torch.float32):
    """q (b, 4, tq, 8) and k, v (b, 2, tk, 8): tk = tq for bidirectional, a longer source for cross."""
    tk = tq if mode == "bidirectional" else tq + 3
    q = torch.randn(b, 4, tq, 8, dtype=dtype, generator=gen)
    k = torch.randn(b, 2, tk, 8, dtype=dtype, generator=gen)
    v = torch.randn(b, 2, tk, 8, dtype=dtype, generator=gen)
    return q, k, v, torch.arange(tq), torch.arange(tk)


def check_mode_shape(s: Subject, mode: str) -> str:
    mix = build_attention(s.config, mode).eval()
    q, k, v, qp, kp = _mode_inputs(mode, 2, 7, torch.Generator().manual_seed(10))
    with torch.no_grad():
        out = mix(q, k, v, qp, kp, mode=mode)
        if tuple(out.shape) != (2, 4, 7, 8):
            raise CheckFailed(f"returned {tuple(out.shape)}, expected (2, 4, 7, 8)")
        if not torch.isfinite(out).all():
            raise CheckFailed("returned NaN or inf")
        try:
            out, w = mix(q, k, v, qp, kp, return_weights=True, mode=mode)
        except NotImplementedError:
            return "ok (no return_weights)"
    if tuple(w.shape) != (2, 4, 7, k.size(2)):
        raise CheckFailed(f"return_weights gave weights of shape {tuple(w.shape)}, expected (2, 4, 7, {k.size(2)})")
    return "ok"


def check_mode_visibility(s: Subject, mode: str) -> str:
    mix = build_attention(s.config, mode).eval()
    gen = torch.Generator().manual_seed(11)
    q, k, v, qp, kp = _mode_inputs(mode, 1, 6, gen)
    # the key next to the first query (bidirectional: its right neighbour, so a window hides nothing)
    j = 1
    with torch.no_grad():
        ref = mix(q, k, v, qp, kp, mode=mode)
        k2, v2 = k.clone(), v.clone()
        k2[:, :, j] += 3.0
        v2[:, :, j] += 3.0
        if mode == "bidirectional":
            q2 = q.clone()
            q2[:, :, j] += 3.0
            out = mix(q2, k2, v2, qp, kp, mode=mode)
        else:
            out = mix(q, k2, v2, qp, kp, mode=mode)
    gap = _gap(out[:, :, 0], ref[:, :, 0])
    if gap < 1e-4:
        raise CheckFailed(
            f"the first query ignores key {j} (changing it moved the output by {gap:.1e}): hidden as future?"
        )
    return "ok"


def check_mode_padding(s: Subject, mode: str) -> str:
    mix = build_attention(s.config, mode).eval()
    gen = torch.Generator().manual_seed(12)
    q, k, v, qp, kp = _mode_inputs(mode, 2, 5, gen)
    n_pad = 9  # more than a window of 8: some padding queries have no real key in reach
    junk = lambda x: torch.cat([x, 50 * torch.randn(*x.shape[:2], n_pad, x.size(3), generator=gen)], 2)  # noqa: E731
    qj, kj, vj = junk(q), junk(k), junk(v)
    kpm = torch.ones(2, kj.size(2), dtype=torch.bool)
    kpm[:, -n_pad:] = False
    qpj, kpj = torch.arange(qj.size(2)), torch.arange(kj.size(2))
    with torch.no_grad():
        ref = mix(q, k, v, qp, kp, mode=mode)
        out = mix(qj, kj, vj, qpj, kpj, kpm, mode=mode)
    gap = _gap(out[:, :, : q.size(2)], ref)
    if gap > s.atol:
        raise CheckFailed(f"{n_pad} padded keys and queries changed the real outputs by {gap:.2e}")
    if not torch.isfinite(out).all():
        # a NaN row of a padding token reaches every token in the next layer (through 0 * NaN)
        raise CheckFailed("a padding query's output is NaN or inf: leave no row fully masked (let it see itself)")
    return "ok"


def check_mode_permutation(s: Subject, mode: str) -> str:
    mix = build_attention(s.config, mode).eval()
    gen = torch.Generator().manual_seed(13)
    q, k, v, qp, kp = _mode_inputs(mode, 2, 6, gen)
    pq, pk = torch.randperm(q.size(2), generator=gen), torch.randperm(k.size(2), generator=gen)
    if mode == "bidirectional":
        pk = pq  # one sequence: queries and keys move together
    with torch.no_grad():
        ref = mix(q, k, v, qp, kp, mode=mode)
        out = mix(q[:, :, pq], k[:, :, pk], v[:, :, pk], qp[pq], kp[pk], mode=mode)
    gap = _gap(out, ref[:, :, pq])
    if gap > s.atol:
        what = "tokens with their positions" if mode == "bidirectional" else "the source and the queries"
        raise CheckFailed(f"permuting {what} changed the outputs (beyond the permutation) by {gap:.2e}")
    return "ok"


def check_mode_gradients(s: Subject, mode: str) -> str:
    mix = build_attention(s.config, mode).double().train()
    q, k, v, qp, kp = _mode_inputs(mode, 1, 4, torch.Generator().manual_seed(14), torch.float64)
    kpm = torch.ones(1, k.size(2), dtype=torch.bool)
    kpm[0, -1] = False
    for x in (q, k, v):
        x.requires_grad_()
    try:
        torch.autograd.gradcheck(
            lambda q, k, v: mix(q, k, v, qp, kp, kpm, mode=mode), (q, k, v), eps=1e-6, atol=1e-5, fast_mode=True
        )
    except GradcheckError as e:
        raise CheckFailed(f"gradcheck: {str(e).splitlines()[0]}") from None
    return "ok"


def check_mode_compile(s: Subject, mode: str) -> str:
    mix = build_attention(s.config, mode).eval()
    q, k, v, qp, kp = _mode_inputs(mode, 2, 6, torch.Generator().manual_seed(15))
    kpm = torch.ones(2, k.size(2), dtype=torch.bool)
    kpm[1, -2:] = False
    torch._dynamo.reset()

    def call(q, k, v):
        return mix(q, k, v, qp, kp, kpm, mode=mode)

    with torch.no_grad():
        eager = call(q, k, v)
        try:
            compiled = torch.compile(call, fullgraph=True, dynamic=False, backend=s.compile_backend)(q, k, v)
        except Exception as e:
            first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
            raise CheckFailed(f"torch.compile(fullgraph=True) failed: {type(e).__name__}: {first}") from None
    gap = _gap(compiled, eager)
    if gap > s.atol:
        raise CheckFailed(f"the compiled call differs from eager by {gap:.2e}")
    return f"ok ({s.compile_backend})"


MODE_CHECKS: dict[str, Callable[[Subject, str], str]] = {
    "shape": check_mode_shape,
    "visibility": check_mode_visibility,
    "padding": check_mode_padding,
    "permutation": check_mode_permutation,
    "gradients": check_mode_gradients,
    "compile": check_mode_compile,
}


CHECKS: dict[str, Callable[[Subject], str]] = {
    "shape": check_shape,
    "causality": check_causality,
    "gradients": check_gradients,
    "cache": check_cache,
    "padding": check_padding,
    "compile": check_compile,
}


# -- running and reporting ---------------------------------------------------------------


def run_checks(
    attention: str,
    kwargs: dict[str, Any] | None = None,
    *,
    model_factory: ModelFactory,
    pos_encoding: str = "rope",
    skip: Iterable[str] = (),
    compile_backend: str = "inductor",
    atol: float = 1e-5,
    modes: Iterable[str] | None = None,
) -> list[CheckResult]:
    """Run every property (minus `skip`) on the variant, in each of `modes` (default: every mode it
    claims); `attention` may be a plug-in spec. skip names a property (every mode) or MODE.NAME.

    model_factory(config) builds the model the cache, padding and compile properties decode
    through (gpt.model.Transformer).
    """
    skip = set(skip)
    known = set(PROPERTIES) | {f"{m}.{p}" for m in MODES if m != "causal" for p in MODE_PROPERTIES}
    known |= set(MODE_PROPERTIES)
    unknown = sorted(skip - known)
    if unknown:
        names = ", ".join(dict.fromkeys(PROPERTIES + MODE_PROPERTIES))
        raise ConfigError(f"unknown check(s) {', '.join(unknown)}; choose from {names} (or MODE.NAME)")
    name = resolve_attention(attention)
    claimed = get_attention(name).modes
    modes = list(claimed if modes is None else modes)
    refused = [m for m in modes if m not in claimed]
    if refused:
        raise ConfigError(
            f"attention {attention!r} claims modes {', '.join(claimed)}, not {', '.join(refused)}; "
            "check only the modes it claims"
        )
    config = tiny_config(name, kwargs, pos_encoding)
    build_attention(config)  # bad kwargs: one ConfigError here rather than six failures
    subject = Subject(config, atol, compile_backend, model_factory)
    plan: list[tuple[str, Callable[[], str]]] = []
    if "causal" in modes:
        plan += [(p, lambda fn=fn: fn(subject)) for p, fn in CHECKS.items() if p not in skip]
    for mode in (m for m in MODES if m != "causal" and m in modes):
        plan += [
            (f"{mode}.{p}", lambda fn=fn, mode=mode: fn(subject, mode))
            for p, fn in MODE_CHECKS.items()
            if p not in skip and f"{mode}.{p}" not in skip
        ]
    results = []
    for prop, fn in plan:
        t0 = time.perf_counter()
        try:
            passed, detail = True, fn()
        except CheckFailed as e:
            passed, detail = False, str(e)
        except Exception as e:  # a crash is a failure of that property, reported on one line
            first = next((ln for ln in str(e).splitlines() if ln.strip()), "")
            passed, detail = False, f"raised {type(e).__name__}: {first}"
        results.append(CheckResult(prop, passed, detail, time.perf_counter() - t0))
    return results


def format_table(attention: str, results: list[CheckResult]) -> str:
    width = max(len(r.name) for r in results)
    lines = [f"{'property':<{width}}  result  time    detail", f"{'-' * width}  ------  ------  ------"]
    for r in results:
        lines.append(f"{r.name:<{width}}  {'pass' if r.passed else 'FAIL':<6}  {r.seconds:5.1f}s  {r.detail}")
    n_fail = sum(not r.passed for r in results)
    verdict = "all properties hold" if not n_fail else f"{n_fail} of {len(results)} properties FAIL"
    lines.append(f"{attention}: {verdict}")
    return "\n".join(lines)


def assert_conforms(
    attention: str, kwargs: dict[str, Any] | None = None, *, model_factory: ModelFactory, **options: Any
) -> list[CheckResult]:
    """For plug-in authors' tests: raise AssertionError with the table if any property fails."""
    results = run_checks(attention, kwargs, model_factory=model_factory, **options)
    if not all(r.passed for r in results):
        raise AssertionError("\n" + format_table(attention, results))
    return results


def main(argv: list[str] | None = None, *, model_factory: ModelFactory) -> int:
    """The command line of scripts/check_attention.py, which passes the model."""
    ap = argparse.ArgumentParser(
        prog="python scripts/check_attention.py", description="Check an attention variant against the contract."
    )
    ap.add_argument("attention", help="a registered name, path/to/file.py:NAME or package.module:NAME")
    ap.add_argument("--kwargs", default="{}", help="attention_kwargs as JSON, e.g. '{\"window\": 4}'")
    ap.add_argument("--pos-encoding", default="rope", help="rope | sinusoidal | learned | none (alibi: none)")
    ap.add_argument("--skip", default="", help=f"comma-separated properties to skip: {', '.join(PROPERTIES)}")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend (eager: capture only)")
    ap.add_argument(
        "--modes", default="", help=f"comma-separated modes to check: {', '.join(MODES)} (default: all it claims)"
    )
    args = ap.parse_args(argv)
    try:
        kwargs = json.loads(args.kwargs)
        if not isinstance(kwargs, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        print(
            f"error: --kwargs {args.kwargs!r} is not a JSON object ({e}); e.g. --kwargs '{{\"window\": 4}}'",
            file=sys.stderr,
        )
        return 2
    skip = [p for p in args.skip.split(",") if p]
    try:
        results = run_checks(
            args.attention,
            kwargs,
            model_factory=model_factory,
            pos_encoding=args.pos_encoding,
            skip=skip,
            compile_backend=args.compile_backend,
            modes=[m for m in args.modes.split(",") if m] or None,
        )
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(args.attention, results))
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    # the suite needs a model, and this package does not import one
    print("error: run the conformance suite as python scripts/check_attention.py NAME", file=sys.stderr)
    sys.exit(2)
