"""Fast generation: prefill the prompt, then a one-token decode step over the static KV cache.

The decode step has static shapes (token (B, 1), slot tensor (1,), a fixed cache length), so
`torch.compile(fullgraph=True)` captures it once per run and every token reuses that graph.
Sampling happens inside the step, on the device, with the exponential race
(argmax(p / E), E ~ Exp(1), which draws exactly from p) instead of torch.multinomial. The
loop never reads a tensor value on the host per token: end-of-sequence is checked every
`sync_every` steps and tokens after eos are trimmed afterwards.

    result = Generator(model, tokenizer, compile=True).generate(["Once upon a time"], max_new_tokens=200)
    result.texts, result.tokens, result.report.format()

Speculative decoding (draft_model=...) lets a small model propose k tokens that the target
checks in one forward: with greedy sampling the output is exactly the target's own, with
sampling the standard accept/reject rule keeps the target's distribution.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from gpt import aot as aot_mod
from gpt.compile_cache import enable_compile_caches, remember_vec_isa_probe
from gpt.errors import GenerationError  # noqa: F401  (re-exported: gpt.generation.GenerationError)
from gpt.fast import apply_tricks, compile_options, parse_tricks
from gpt.tokenizer import Tokenizer

# -- sampling -----------------------------------------------------------------------------


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise GenerationError(f"temperature={temperature} must be >= 0 (0 means greedy)")
    if top_k is not None and top_k < 0:
        raise GenerationError(f"top-k={top_k} must be >= 1 (0 or unset = off)")
    if top_p is not None and not 0 < top_p <= 1:
        raise GenerationError(f"top-p={top_p} must be in (0, 1] (or leave it unset)")


def logits_to_probs(
    logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> Tensor:
    """The sampling distribution (..., V) in fp32 after temperature, top-k and top-p."""
    logits = logits.float() / max(temperature, 1e-5)
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # keep the smallest head of the sorted list whose mass reaches top_p; the first token
        # always survives because the mass before it is 0
        drop_sorted = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample_from_probs(probs: Tensor) -> Tensor:
    """One draw per row from probs (..., V), without a host sync: argmax(p / E), E ~ Exp(1)."""
    race = torch.empty_like(probs).exponential_(1).clamp_min_(1e-20)  # clamp: 0/0 would be NaN
    return torch.argmax(probs / race, dim=-1)


def sample(
    logits: Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None
) -> tuple[Tensor, Tensor | None]:
    """Next token (...,) and, unless greedy, the distribution it was drawn from."""
    if temperature == 0:
        return torch.argmax(logits, dim=-1), None
    probs = logits_to_probs(logits, temperature, top_k, top_p)
    return sample_from_probs(probs), probs


# -- the report ---------------------------------------------------------------------------


@dataclass
class GenerationReport:
    device: str
    dtype: str
    batch_size: int
    prompt_tokens: int  # longest prompt (the padded prefill length)
    new_tokens: int  # tokens kept, all rows
    decode_steps: int  # forwards after the first token (target forwards when speculating)
    ttft_s: float  # prefill + first sampled token
    decode_s: float
    tokens_per_s: float  # new tokens after the first, all rows, per second of decode
    bytes_per_token: int  # weights + KV cache read by one decode step (per step, not per row)
    gb_per_s: float  # bytes actually read during decode / decode time
    compile_s: float  # 0 when not compiled or already compiled by an earlier call
    peak_memory_mb: float  # CUDA: max allocated; CPU: the process's peak resident set
    compiled: bool
    tricks: list[str] = field(default_factory=list)  # gpt.fast speed tricks in the compiled step
    mean_accepted: float | None = None  # speculative decoding: draft tokens accepted per step
    aot: str = ""  # the decode step ahead of time (gpt.aot): "built" or "loaded" this call, "reused", or ""

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        lines = [
            f"device {self.device}, dtype {self.dtype}, batch {self.batch_size}, "
            f"{'compiled' if self.compiled else 'eager'}"
            + (f" (compile {self.compile_s:.1f} s)" if self.compiled and not self.aot else "")
            + (f" ahead of time (package {self.aot} in {self.compile_s:.1f} s)" if self.aot else "")
            + (f", tricks: {', '.join(self.tricks) or 'none'}" if self.compiled else ""),
            f"time to first token {self.ttft_s * 1000:.1f} ms ({self.prompt_tokens} prompt tokens)",
            f"decode {self.tokens_per_s:.1f} tokens/s ({self.new_tokens} new tokens in "
            f"{self.ttft_s + self.decode_s:.2f} s)",
            f"memory bandwidth {self.gb_per_s:.2f} GB/s ({self.bytes_per_token / 1e6:.1f} MB read per step)",
            f"peak memory {self.peak_memory_mb:.0f} MB",
        ]
        if self.mean_accepted is not None:
            lines.append(f"speculative: {self.mean_accepted:.2f} draft tokens accepted per step on average")
        return "\n".join(lines)


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens of each row (eos included when it stopped there)
    texts: list[str]  # decoded new tokens
    prompt_tokens: list[list[int]]
    report: GenerationReport


def weight_bytes(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: every stored tensor once, except the embedding
    table, of which a step reads one row per token, unless the head reads the same tensor (tied;
    a quantised head of a tied model has its own weights, and the float table is then a lookup)."""
    seen, total = set(), 0
    skip = set()
    emb = getattr(model, "tok_embeddings", None)
    head = getattr(getattr(model, "output", None), "weight", None)
    if emb is not None:
        skip = {t.data_ptr() for t in emb.state_dict().values()}
        if isinstance(head, torch.Tensor):
            skip.discard(head.data_ptr())
    for t in model.state_dict().values():
        if t.data_ptr() in seen or t.data_ptr() in skip:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def kv_cache_bytes(model: nn.Module, batch_size: int) -> int:
    """Bytes of KV cache one decode step reads: attention reads every slot of the static cache."""
    total = 0
    for layer in model.layers:
        cache = layer.attention.mix.kv_cache
        if cache is not None:
            for buf in (cache.k_cache, cache.v_cache):
                total += buf[:batch_size].numel() * buf.element_size()
    return total


def float_dtype(model: nn.Module) -> torch.dtype:
    """The activation dtype: that of the embedding table (weights may be int8/int4 elsewhere)."""
    return model.tok_embeddings.weight.dtype


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- the generator ------------------------------------------------------------------------


class Generator:
    """Holds a model (and optional draft), the sampling settings and the compiled steps.

    Reuse one Generator for many calls (e.g. an interactive loop): with a fixed `cache_len`
    the compiled decode step is captured on the first call and reused afterwards.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        *,
        temperature: float = 0.8,
        top_k: int | None = 200,
        top_p: float | None = None,
        compile: bool = False,
        compile_prefill: bool = False,
        draft_model: nn.Module | None = None,
        speculate_k: int = 5,
        cache_len: int | None = None,
        sync_every: int = 16,
        tricks: str | Sequence[str] | None = None,
        aot: bool = False,
        aot_dir: str | Path | None = None,
    ) -> None:
        """`tricks`: gpt.fast speed tricks for the compiled decode step (None = the defaults,
        "none" = plain torch ops). They act on a copy of the module tree that shares the weights
        (gpt.fast.apply_tricks), so `model` itself is never changed. `top_k` 0 or None = off.

        `aot` (with `compile`, one model on the CPU): the decode step is an AOTInductor package
        (gpt.aot) built once per machine and settings and cached in `aot_dir` (default
        ~/.cache/gpt/aot), so a later process loads it in ~0.1 s instead of tracing and compiling;
        where it cannot be built, the step is torch.compile'd as without it (one line on stderr)."""
        check_sampling(temperature, top_k, top_p)
        arch = getattr(getattr(model, "config", None), "arch", "decoder")
        if arch != "decoder":
            raise GenerationError(
                f"arch={arch!r}: the Generator continues text with a decoder "
                "(score an encoder or an encoder-decoder with python scripts/eval_arch.py)"
            )
        self.aot = bool(aot and compile and draft_model is None and model.tok_embeddings.weight.device.type == "cpu")
        self.aot_dir = Path(aot_dir) if aot_dir is not None else None
        self.tricks = sorted(parse_tricks(tricks)) if compile else []
        if self.aot:  # regional and lean_guards act on dynamo, which a package has none of
            self.tricks = aot_mod.package_tricks(self.tricks)
        if draft_model is not None:
            for name, m in (("target", model), ("draft", draft_model)):
                keeper = _state_keeping_attention(m)
                if keeper is not None:
                    raise GenerationError(
                        f"speculative decoding needs a KV cache it can rewind, but the {name} model's attention "
                        f"{keeper!r} keeps its own decode state; drop the draft model (--draft-checkpoint)"
                    )
            if speculate_k < 1:
                raise GenerationError(f"speculate-k={speculate_k} must be >= 1")
            if draft_model.config.vocab_size != model.config.vocab_size:
                raise GenerationError(
                    f"the draft model's vocab_size {draft_model.config.vocab_size} differs from the target's "
                    f"{model.config.vocab_size}; speculative decoding needs the same tokenizer"
                )
        self.model, self.tokenizer, self.draft = model, tokenizer, draft_model
        # what actually runs: the caller's modules, or with compile a decode-specialised copy of them
        self.net = apply_tricks(model, self.tricks) if compile else model
        self.draft_net = draft_model
        if compile and draft_model is not None:
            self.draft_net = apply_tricks(draft_model, self.tricks)
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.speculate_k, self.fixed_cache_len, self.sync_every = speculate_k, cache_len, sync_every
        self.compiled, self.compile_prefill = compile, compile and compile_prefill
        self.device = model.tok_embeddings.weight.device
        self._warm: set[tuple] = set()  # shapes the compiled functions have been run with
        net, draft_net = self.net, self.draft_net
        self._decode = self._make_decode(net, with_probs=False)
        self._draft_decode = self._make_decode(draft_net, with_probs=True) if draft_net is not None else None
        self._verify = self._make_verify(net) if draft_net is not None else None
        self._prefill = self._make_prefill(net)
        self._draft_prefill = self._make_prefill(draft_net) if draft_net is not None else None
        self._aot_steps: dict[tuple, aot_mod.AOTStep] = {}
        self._plain_decode = self._decode
        self.aot_report = ""  # how the last warm-up got its package: "built", "loaded", "reused" or ""
        if compile:
            self._torch_compile(decode=not self.aot, prefill=self.compile_prefill)

    def _torch_compile(self, decode: bool, prefill: bool) -> None:
        if not (decode or prefill):
            return
        enable_compile_caches()
        if decode:
            # one graph per function for the whole run: shapes are static, so never dynamic
            opts = dict(fullgraph=True, dynamic=False, **compile_options(self.tricks))
            self._decode = torch.compile(self._plain_decode, **opts)
            if self.draft is not None:
                self._draft_decode = torch.compile(self._draft_decode, **opts)
                self._verify = torch.compile(self._verify, **opts)
        if prefill:
            self._prefill = torch.compile(self._prefill, fullgraph=True, dynamic=True)

    # The steps. Each closes over its model and the sampling settings, so the compiled graph
    # sees them as constants; inputs are tensors only.
    def _make_decode(self, model: nn.Module, with_probs: bool) -> Callable:
        temperature, top_k, top_p = self.temperature, self.top_k, self.top_p

        def decode_step(tok: Tensor, input_pos: Tensor, kpm: Tensor | None, offset: Tensor | None):
            logits = model(tok, input_pos, key_padding_mask=kpm, pos_offset=offset)
            nxt, probs = sample(logits[:, -1], temperature, top_k, top_p)
            # the draft's distribution is needed by the accept/reject rule; plain decoding instead
            # gets the next step's inputs, so that no eager op runs between two compiled steps
            return (nxt, probs) if with_probs else (nxt[:, None], input_pos + 1)

        return decode_step

    def _make_prefill(self, model: nn.Module) -> Callable:
        temperature, top_k, top_p = self.temperature, self.top_k, self.top_p

        def prefill(idx: Tensor, input_pos: Tensor, kpm: Tensor | None, offset: Tensor | None):
            logits = model(idx, input_pos, key_padding_mask=kpm, pos_offset=offset, last_only=True)
            nxt, _ = sample(logits[:, -1], temperature, top_k, top_p)
            return nxt

        return prefill

    def _make_verify(self, model: nn.Module) -> Callable:
        temperature, top_k, top_p = self.temperature, self.top_k, self.top_p

        def verify(idx: Tensor, input_pos: Tensor):
            """Target logits for k+1 tokens at once: argmax tokens when greedy, else probs."""
            logits = model(idx, input_pos)
            if temperature == 0:
                return torch.argmax(logits, dim=-1)
            return logits_to_probs(logits, temperature, top_k, top_p)

        return verify

    # -- input checks ------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str]) -> list[list[int]]:
        if not prompts:
            raise GenerationError("no prompt given; pass at least one prompt")
        out = []
        for p in prompts:
            if not p:
                raise GenerationError("the prompt is empty; pass some text to continue (e.g. --prompt 'Once upon')")
            bos = getattr(self.tokenizer, "bos_id", None) is not None
            out.append(self.tokenizer.encode(p, bos=bos))  # TokenizerError names the bad character
        return out

    def _plan(self, prompt_ids: list[list[int]], max_new_tokens: int | None) -> tuple[int, int]:
        """(max_new_tokens, cache_len) after checking that the prompts and the request fit."""
        ctx = self.model.config.max_seq_len
        if self.draft is not None:
            ctx = min(ctx, self.draft.config.max_seq_len)
        longest = max(len(p) for p in prompt_ids)
        extra = self.speculate_k + 1 if self.draft is not None else 0  # slots a final speculation may fill
        room = ctx - longest - extra
        if room < 1:
            raise GenerationError(
                f"the prompt is {longest} tokens but the model's context is {ctx} tokens"
                + (f" (minus {extra} for speculation)" if extra else "")
                + "; shorten the prompt"
            )
        if max_new_tokens is None:
            max_new_tokens = room  # fill the context
        elif max_new_tokens < 1:
            raise GenerationError(f"max-new-tokens={max_new_tokens} must be >= 1")
        elif max_new_tokens > room:
            raise GenerationError(
                f"max-new-tokens={max_new_tokens} does not fit: the prompt is {longest} tokens and the "
                f"context is {ctx}" + (f" (minus {extra} for speculation)" if extra else "") + f"; use at most {room}"
            )
        if self.fixed_cache_len is not None:
            cache_len = self.fixed_cache_len
            if longest + max_new_tokens + extra > cache_len:
                raise GenerationError(
                    f"prompt ({longest} tokens) + max-new-tokens ({max_new_tokens}) exceed the cache of "
                    f"{cache_len} slots; lower max-new-tokens"
                )
        else:
            # round up so that nearby lengths share one compiled graph
            cache_len = min(ctx, -(-(longest + max_new_tokens + extra) // 64) * 64)
        return max_new_tokens, cache_len

    # -- generation --------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int | None = 200,
        *,
        seed: int | None = None,
        stop_at_eos: bool = True,
        on_token: Callable[[int, list[int]], None] | None = None,
    ) -> GenerationResult:
        """Continue every prompt (one batch, left padded). `on_token(step, tokens)` streams the
        new token of every row as it is produced (this costs a host sync per token)."""
        prompt_ids = self.encode_prompts(prompts)
        if self.draft is not None and len(prompt_ids) > 1:
            raise GenerationError("speculative decoding runs one prompt at a time; pass a single prompt")
        max_new, cache_len = self._plan(prompt_ids, max_new_tokens)
        eos = getattr(self.tokenizer, "eos_id", None) if stop_at_eos else None
        b, t = len(prompt_ids), max(len(p) for p in prompt_ids)
        dev = self.device

        # left padding: row i's tokens sit in slots pad_i .. t-1 and have positions 0 .. len_i - 1
        idx = torch.zeros(b, t, dtype=torch.long)
        for i, p in enumerate(prompt_ids):
            idx[i, t - len(p) :] = torch.tensor(p)
        idx = idx.to(dev)
        pads = [t - len(p) for p in prompt_ids]
        kpm = offset = None
        if any(pads):
            offset = torch.tensor(pads, device=dev)
            kpm = torch.arange(cache_len, device=dev)[None, :] >= offset[:, None]
        for m in (self.net, self.draft_net):
            if m is not None:
                m.setup_caches(b, cache_len, dtype=float_dtype(m), device=dev)

        compile_s = self._warmup(b, t, cache_len, kpm, offset) if self.compiled else 0.0
        aot_step = self._aot_steps.get((b, cache_len, kpm is not None))
        if seed is not None:
            torch.manual_seed(seed)

        _sync(dev)
        t0 = time.perf_counter()
        pos = torch.arange(t, device=dev)
        tok = self._prefill(idx, pos, kpm, offset)
        if self.draft is not None:
            self._draft_prefill(idx, pos, kpm, offset)
        _sync(dev)
        ttft = time.perf_counter() - t0
        if on_token is not None:
            on_token(0, tok.tolist())

        if self.draft is None:
            decode = aot_step or self._decode
            out, steps, bytes_read, mean_acc = self._decode_loop(decode, tok, t, max_new, kpm, offset, eos, on_token)
        else:
            out, steps, bytes_read, mean_acc = self._speculative_loop(tok, t, max_new, eos, on_token)
        _sync(dev)
        decode_s = time.perf_counter() - t0 - ttft

        tokens = [_trim(row, eos) for row in out]
        n_new = sum(len(r) for r in tokens)
        report = GenerationReport(
            device=str(dev),
            dtype=str(float_dtype(self.model)).replace("torch.", ""),
            batch_size=b,
            prompt_tokens=t,
            new_tokens=n_new,
            decode_steps=steps,
            ttft_s=ttft,
            decode_s=decode_s,
            tokens_per_s=(n_new - b) / decode_s if decode_s > 0 and n_new > b else 0.0,
            bytes_per_token=weight_bytes(self.model) + kv_cache_bytes(self.net, b),
            gb_per_s=bytes_read / decode_s / 1e9 if decode_s > 0 else 0.0,
            compile_s=compile_s,
            peak_memory_mb=_peak_memory_mb(dev),
            compiled=self.compiled,
            tricks=self.tricks,
            mean_accepted=mean_acc,
            aot=self.aot_report if aot_step is not None else "",
        )
        texts = [self.tokenizer.decode(r) for r in tokens]
        return GenerationResult(tokens=tokens, texts=texts, prompt_tokens=prompt_ids, report=report)

    def _decode_loop(self, decode, tok, t, max_new, kpm, offset, eos, on_token):
        """Plain decoding: one compiled step per token, whose outputs are the next step's inputs;
        tokens stay on the device, and eos is looked for once every sync_every tokens."""
        cur, input_pos = tok[:, None], torch.tensor([t], device=tok.device)
        toks = [cur]
        steps = 0
        for i in range(1, max_new):
            cur, input_pos = decode(cur, input_pos, kpm, offset)
            toks.append(cur)
            steps += 1
            if on_token is not None:
                on_token(i, cur[:, 0].tolist())
            if eos is not None and i % self.sync_every == 0 and bool((torch.cat(toks, 1) == eos).any(1).all()):
                break  # every row has ended (one host sync per sync_every tokens)
        per_step = weight_bytes(self.model) + kv_cache_bytes(self.net, tok.size(0))
        return torch.cat(toks, 1).tolist(), steps, steps * per_step, None

    def _speculative_loop(self, tok, t, max_new, eos, on_token):
        """Draft proposes k tokens one at a time; the target scores all of them in one forward."""
        dev, k = tok.device, self.speculate_k
        seq: list[int] = [int(tok[0])]
        pos = t  # slot of the newest token, which neither cache holds yet
        accepted_total = steps = 0
        target_bytes = weight_bytes(self.model) + kv_cache_bytes(self.net, 1)
        draft_bytes = weight_bytes(self.draft) + kv_cache_bytes(self.draft_net, 1)
        bytes_read = 0
        cur = tok.view(1, 1)
        while len(seq) < max_new and not (eos is not None and seq[-1] == eos):
            # 1. draft k tokens (each step also writes the previous token into the draft cache)
            draft_toks, draft_probs = [], []
            d = cur
            for j in range(k):
                nxt, q = self._draft_decode(d, torch.tensor([pos + j], device=dev), None, None)
                draft_toks.append(nxt)
                draft_probs.append(q)
                d = nxt.view(1, 1)
            proposal = torch.cat([cur.view(1)] + draft_toks).view(1, k + 1)
            # 2. the target scores cur and the k proposals in one forward
            target = self._verify(proposal, torch.arange(pos, pos + k + 1, device=dev))
            bytes_read += k * draft_bytes + target_bytes
            steps += 1
            # 3. accept a prefix, then take one token from the target
            proposed = proposal[0, 1:]
            if self.temperature == 0:
                n_acc, extra = _accept_greedy(proposed, target[0])
            else:
                n_acc, extra = _accept_sampled(proposed, torch.stack(draft_probs, 1)[0], target[0])
            new = proposed[:n_acc].tolist() + [extra]
            if n_acc == k:  # the draft never saw its last proposal: write it into the draft cache
                # (a fresh (1, 1) tensor: a slice of `proposal` has other strides, which would fail the
                # compiled step's guards and recompile it)
                last = torch.tensor([[new[k - 1]]], device=dev)
                self._draft_decode(last, torch.tensor([pos + k], device=dev), None, None)
                bytes_read += draft_bytes
            accepted_total += n_acc
            if eos is not None and eos in new:
                new = new[: new.index(eos) + 1]
            for j, x in enumerate(new):
                if on_token is not None and len(seq) + j < max_new:
                    on_token(len(seq) + j, [x])
            seq.extend(new)
            pos += n_acc + 1
            cur = torch.tensor([[seq[-1]]], device=dev)
        return [seq[:max_new]], steps, bytes_read, (accepted_total / steps if steps else 0.0)

    def _warmup(self, b: int, t: int, cache_len: int, kpm: Tensor | None, offset: Tensor | None) -> float:
        """Compile (or load from the on-disk cache) the steps for these shapes; return the seconds taken."""
        key = (b, cache_len, kpm is not None)
        if self.aot:
            return self._aot_warmup(key, b, t, kpm, offset)
        if key in self._warm:
            return 0.0
        dev = self.device
        _sync(dev)
        t0 = time.perf_counter()
        tok = torch.zeros(b, 1, dtype=torch.long, device=dev)
        if self.compile_prefill:
            self._prefill(torch.zeros(b, t, dtype=torch.long, device=dev), torch.arange(t, device=dev), kpm, offset)
        # the warm-up writes junk into slots that the real run overwrites before reading
        for _ in range(2):  # twice: a recapture on the second call would be paid here, not on the clock
            if self.draft is None:
                self._decode(tok, torch.tensor([t], device=dev), kpm, offset)
            else:  # speculation never runs the target's one-token step
                self._draft_decode(tok, torch.tensor([t], device=dev), None, None)
                self._verify(
                    torch.zeros(1, self.speculate_k + 1, dtype=torch.long, device=dev),
                    torch.arange(t, t + self.speculate_k + 1, device=dev),
                )
        _sync(dev)
        self._warm.add(key)
        remember_vec_isa_probe()
        return time.perf_counter() - t0

    def _aot_warmup(self, key: tuple, b: int, t: int, kpm: Tensor | None, offset: Tensor | None) -> float:
        """Load (or build once) the package of the decode step for these shapes, and point it at
        this call's KV cache; where it cannot be built, torch.compile the step instead."""
        step = self._aot_steps.get(key)
        if step is not None:
            step.bind()  # setup_caches made new caches for this call
            self.aot_report = "reused"
            return 0.0
        dev = self.device
        tok, pos = torch.zeros(b, 1, dtype=torch.long, device=dev), torch.tensor([t], device=dev)
        settings = {
            "step": "decode",
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "tricks": self.tricks,
        }
        try:
            step = aot_mod.load_or_build(self.net, self._plain_decode, [tok, pos, kpm, offset], settings, self.aot_dir)
        except aot_mod.AOTError as e:
            print(f"aot: {e}; compiling the step with torch.compile instead", file=sys.stderr)
            self.aot = False
            self._aot_steps.clear()  # from now on every shape takes torch.compile's step (no unbound package)
            self._torch_compile(decode=True, prefill=False)
            return self._warmup(b, t, key[1], kpm, offset)
        t0 = time.perf_counter()
        step(tok, pos, kpm, offset)  # the first call's one-off costs (threads, page faults) off the clock
        self._aot_steps[key] = step
        self.aot_report = "built" if step.built else "loaded"
        return step.seconds + time.perf_counter() - t0


def _state_keeping_attention(model: nn.Module) -> str | None:
    """The name of a variant that decodes from its own state (which a rejected draft token would
    have advanced), or None."""
    for m in model.modules():
        if getattr(m, "replaces_kv_cache", False):
            return model.config.attention
    return None


def _accept_greedy(proposed: Tensor, target_argmax: Tensor) -> tuple[int, int]:
    """Accept draft tokens while they equal the target's argmax; then the target's own choice."""
    k = proposed.numel()
    match = (proposed == target_argmax[:k]).int()
    n = int(match.cumprod(0).sum())
    return n, int(target_argmax[n])


def _accept_sampled(proposed: Tensor, q: Tensor, p: Tensor) -> tuple[int, int]:
    """The standard rule (Leviathan et al. 2023; Chen et al. 2023): accept token x with probability
    min(1, p(x)/q(x)); at the first rejection draw from norm(max(p - q, 0)); if all k pass, draw
    from the target's next distribution. The output is then distributed exactly as p."""
    k = proposed.numel()
    idx = torch.arange(k, device=proposed.device)
    p_x, q_x = p[idx, proposed], q[idx, proposed]
    u = torch.rand(k, device=proposed.device)
    ok = (u * q_x <= p_x).int()  # u <= p/q without dividing by a zero q
    n = int(ok.cumprod(0).sum())
    if n == k:
        return n, int(sample_from_probs(p[k]))
    residual = (p[n] - q[n]).clamp_min(0)
    if float(residual.sum()) <= 0:  # p == q exactly: any draw from p is right
        residual = p[n]
    return n, int(sample_from_probs(residual / residual.sum()))


def _trim(row: list[int], eos: int | None) -> list[int]:
    if eos is not None and eos in row:
        return row[: row.index(eos) + 1]
    return row


def generate(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompts: str | Sequence[str],
    max_new_tokens: int | None = 200,
    *,
    temperature: float = 0.8,
    top_k: int | None = 200,
    top_p: float | None = None,
    seed: int | None = None,
    compile: bool = False,
    draft_model: nn.Module | None = None,
    speculate_k: int = 5,
    stop_at_eos: bool = True,
    on_token: Callable[[int, list[int]], None] | None = None,
) -> GenerationResult:
    """One-shot generation: tokens, texts and the timing report. See Generator for reuse."""
    if isinstance(prompts, str):
        prompts = [prompts]
    gen = Generator(
        model,
        tokenizer,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        compile=compile,
        draft_model=draft_model,
        speculate_k=speculate_k,
    )
    return gen.generate(prompts, max_new_tokens, seed=seed, stop_at_eos=stop_at_eos, on_token=on_token)
