"""The one error base of the library, and the error of each area.

Every error the library raises on bad input is a GptError whose message is one line that
names the file, flag or field and says what to do. The CLIs and scripts catch GptError
(gpt.cli.main_guard) and print that line, so no library error reaches a user as a traceback.
The subclasses also derive from ValueError, which is what most of them replaced.
"""

from __future__ import annotations


def first_line(e: BaseException) -> str:
    """The first non-blank line of an exception's message ("" if none): the one-line form of a
    foreign error (a compiler's, torch's) inside one of ours."""
    return next((line.strip() for line in str(e).splitlines() if line.strip()), "")


class GptError(Exception):
    """Base of every error gpt raises on bad input. The message is one line."""


class ConfigError(GptError, ValueError):
    """A configuration that cannot build a model."""


class CheckpointError(GptError, ValueError):
    """A checkpoint that cannot be loaded or written."""


class TokenizerError(GptError, ValueError):
    """Text or a tokenizer file that cannot be used."""


class DataError(GptError, ValueError):
    """A corpus or dataset directory that cannot be used."""


class QuantError(GptError, ValueError):
    """A quantisation request or quantized checkpoint that cannot be used."""


class GenerationError(GptError, ValueError):
    """A prompt or setting that cannot be generated from."""


class TrainError(GptError, ValueError):
    """A setting, file or state a training run cannot use."""


class HFError(GptError, ValueError):
    """A Hugging Face checkpoint or config that cannot be converted."""


class GGUFError(HFError):
    """A checkpoint or option the GGUF export refuses."""


class CliError(GptError, ValueError):
    """A command-line flag, or a combination of flags, that cannot be used."""


class ParallelError(GptError, ValueError):
    """A model or launch that cannot be split over processes (tensor parallel, FSDP)."""
