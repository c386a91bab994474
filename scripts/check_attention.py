"""Check an attention variant against the contract the toolkit relies on (gpt/attention/check.py).

    python scripts/check_attention.py NAME [--kwargs JSON] [--pos-encoding none] [--skip compile]
    python scripts/check_attention.py my_attn.py:MyAttention --skip gradients,compile

One row per property with the reason for each failure; exit 0 all pass, 1 a property fails,
2 bad input. The suite lives in the attention package; this command gives it the model
(gpt.model.Transformer) its cache, padding and compile properties decode through.
"""

from __future__ import annotations

import sys

from gpt.attention.check import main
from gpt.model import Transformer

if __name__ == "__main__":
    sys.exit(main(model_factory=Transformer))
