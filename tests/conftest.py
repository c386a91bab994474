from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from gpt.config import ModelConfig, from_preset
from gpt.data import prepare_dataset

# Subprocesses (the CLIs run as a user runs them) import gpt from this checkout, whatever is
# installed: a git worktree or a second clone tests its own code.
ROOT = Path(__file__).resolve().parent.parent
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_config() -> ModelConfig:
    return from_preset("tiny")


@pytest.fixture(scope="session")
def shakespeare_char_dir(tmp_path_factory):
    """The built-in corpus, char-tokenized once per test session."""
    out = tmp_path_factory.mktemp("shakespeare-char")
    prepare_dataset("shakespeare", out, "char")
    return out
