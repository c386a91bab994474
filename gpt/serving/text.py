"""Token ids -> text as it streams: incremental detokenisation and stop strings that never leak.

IncrementalDetokenizer decodes a short window of ids (the last few before the new ones) and
emits only what the window adds, and nothing while the text ends in U+FFFD, the replacement
character a byte-level tokenizer yields for an incomplete UTF-8 sequence: half a character
is never emitted. Decoding in context (after the prompt's last tokens) also keeps the leading
space that sentencepiece drops from the first piece of a bare decode.

StopText holds back any tail of the text that could still become a stop string, so a
client never sees a stop string, not even its first half while streaming.
"""

from __future__ import annotations

from collections.abc import Sequence

from gpt.tokenizer import Tokenizer

_INCOMPLETE = "\ufffd"
_CONTEXT = 6  # prompt ids decoded before the first new one


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.ids = [i for i in prompt_ids[-_CONTEXT:] if 0 <= i < tokenizer.vocab_size]
        self.prefix = 0  # window start
        self.read = len(self.ids)  # ids whose text has been emitted

    def push(self, token: int) -> str:
        """Add one id; return the new text it completes ("" while a character is incomplete).

        An id beyond the tokenizer's vocabulary (a model whose vocab_size is padded past it)
        has no text."""
        if not 0 <= token < self.tokenizer.vocab_size:
            return ""
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        text = self.tokenizer.decode(self.ids[self.prefix :])
        if len(text) <= len(before) or text.endswith(_INCOMPLETE) or not text.startswith(before):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before) :]

    def flush(self) -> str:
        """Whatever is still held at the end (an incomplete character stays as U+FFFD)."""
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        text = self.tokenizer.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return text[len(before) :] if text.startswith(before) else ""


class StopText:
    """The completion's text with stop strings: what may be released, and where it must end."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.longest = max((len(s) for s in self.stops), default=0)
        self.text = ""
        self.sent = 0  # characters released
        self.searched = 0  # no stop string starts before this index
        self.cut: int | None = None  # where a stop string begins, once found

    def add(self, piece: str) -> str:
        """Append text; return the part that is safe to release now. Sets `cut` on a stop string."""
        self.text += piece
        if not self.stops:
            return self._release(len(self.text))
        start = self.searched
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.cut = min(hits)
            return self._release(self.cut)
        self.searched = max(0, len(self.text) - self.longest + 1)
        return self._release(len(self.text) - self._held())

    def finish(self) -> str:
        """The rest of the text at the end (no stop string matched)."""
        return self._release(len(self.text) if self.cut is None else self.cut)

    def _held(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        for n in range(min(self.longest - 1, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def _release(self, end: int) -> str:
        end = max(end, self.sent)
        out = self.text[self.sent : end]
        self.sent = end
        return out
