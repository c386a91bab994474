import pytest
import torch

from gpt.config import ModelConfig
from gpt.model import Transformer


@pytest.mark.slow
def test_decode_step_compiles_fullgraph_and_matches_eager():
    """One-token decoding over the static cache is a single graph (no breaks, no recompiles)."""
    torch._dynamo.reset()
    cfg = ModelConfig(vocab_size=40, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16)
    m = Transformer(cfg).eval()
    idx = torch.randint(0, 40, (1, 12))
    with torch.no_grad():
        full = m(idx)
        m.setup_caches(1, 16)
        m(idx[:, :4], torch.arange(4))

        @torch.compile(fullgraph=True, dynamic=False)
        def step(tok, pos):
            return m(tok, pos)

        outs = [step(idx[:, t : t + 1], torch.tensor([t])) for t in range(4, 12)]
    torch.testing.assert_close(torch.cat(outs, 1), full[:, 4:], atol=1e-5, rtol=1e-5)
