"""The three architectures by name: ModelConfig.arch -> the model class that builds it.

    decoder  gpt.model.Transformer       causal LM (LLaMA-style)
    encoder  gpt.encoder.MaskedLM        bidirectional, masked-LM head (BERT-style)
    seq2seq  gpt.seq2seq.EncoderDecoder  encoder + decoder with cross-attention (the original Transformer)

Every one keeps its weights under the same names where they are shared (tok_embeddings, output,
layers.N.attention.*), is saved by gpt.checkpoint in the same format, and is rebuilt from
config.json's arch by load_model.
"""

from __future__ import annotations

from torch import nn

from gpt.config import ModelConfig
from gpt.encoder import MaskedLM
from gpt.model import Transformer
from gpt.seq2seq import EncoderDecoder

MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "decoder": Transformer,
    "encoder": MaskedLM,
    "seq2seq": EncoderDecoder,
}


def model_class(config: ModelConfig) -> type[nn.Module]:
    return MODEL_CLASSES[config.arch]


def build_model(config: ModelConfig) -> nn.Module:
    """The model config.arch names, freshly initialised."""
    return model_class(config)(config)
