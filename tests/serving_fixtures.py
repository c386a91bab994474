"""A tiny trained checkpoint with a byte-fallback sentencepiece tokenizer, shared by
tests/test_engine.py and tests/test_serve.py (trained in a few seconds, deterministically)."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import torch

from gpt.checkpoint import save_checkpoint
from gpt.config import ModelConfig
from gpt.model import Transformer
from gpt.tokenizer import train_sentencepiece

SENTENCES = [
    "Once upon a time there was a little fox who lived in the forest.",
    "The fox liked to run and play with her friend the owl.",
    "One day the owl said: let us go to the river and look at the fish.",
    "They walked to the river and saw a big green frog on a stone.",
    "The frog said hello and jumped into the water with a splash.",
    "Le café était très bon, dit la renarde à la chouette.",
    "Über den Bergen schien die Sonne, und alle waren froh.",
    "日本の森に小さな狐がいました。",
    "At night the stars came out and the friends went home to sleep.",
    "User: tell me a story\nAssistant: Once upon a time there was a fox.\n",
]


def corpus() -> str:
    g = torch.Generator().manual_seed(0)
    order = torch.randint(0, len(SENTENCES), (400,), generator=g).tolist()
    return "\n".join(SENTENCES[i] for i in order) + "\n"


def make_tiny_checkpoint(out: Path, attention: str = "sdpa", steps: int = 100) -> Path:
    """Train sentencepiece + a 2-layer model on the corpus; save a checkpoint in out/ckpt."""
    out.mkdir(parents=True, exist_ok=True)
    text_file = out / "corpus.txt"
    text = corpus()
    text_file.write_text(text, encoding="utf-8")
    tok = train_sentencepiece([text_file], out / "tok", vocab_size=400)
    ids = torch.tensor(tok.encode(text))
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=512,
                      attention=attention)  # fmt: skip
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 49, (8,), generator=g)
        x = torch.stack([ids[s : s + 48] for s in starts])
        y = torch.stack([ids[s + 1 : s + 49] for s in starts])
        _, loss = model(x, targets=y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return save_checkpoint(out / "ckpt", model, tok)


@functools.cache
def tiny_checkpoint(attention: str = "sdpa") -> Path:
    """make_tiny_checkpoint once per test session (both serving test files share it)."""
    return make_tiny_checkpoint(Path(tempfile.mkdtemp(prefix=f"gpt-serve-{attention}-")), attention)
