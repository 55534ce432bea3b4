"""Text side of decoding: incremental detokenization and stop strings, both fed one token at a time."""

from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas that never split a character.

    Wraps `tokenizers.decoders.DecodeStream`, which holds back bytes until they form valid UTF-8 (a character
    split across byte-fallback tokens, e.g. "世" = 3 tokens, comes out whole with its last token). The stream is
    primed with the prompt's last tokens so tokenizers whose decoder strips a leading space (Metaspace) render
    the first generated word as they would mid-text.
    """

    PRIME_TOKENS = 4

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._stream = DecodeStream(ids=list(prompt_ids[-self.PRIME_TOKENS:]),
                                    skip_special_tokens=skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Returns the text this token completes ('' while a character is still incomplete)."""
        return self._stream.step(self._tokenizer, token_id) or ""


class StopStringMatcher:
    """Finds stop strings in a stream of text deltas without emitting text that might begin one.

    `push` returns the text that is safe to emit now and whether a stop string was found. Text that could be the
    beginning of a stop string is held back until the next delta settles it; `flush` releases it at the end.
    The stop string itself and anything after it are never emitted.

    Example: stop=["\\n\\n"]; push("a\\n") -> ("a", False) with "\\n" held; push("\\nb") -> ("", True).
    """

    def __init__(self, stop: tuple[str, ...] | list[str]):
        self._stop = tuple(s for s in stop if s)
        self._held = ""

    def push(self, delta: str) -> tuple[str, bool]:
        if not self._stop:
            return delta, False
        text = self._held + delta
        first = min((pos for pos in (text.find(s) for s in self._stop) if pos >= 0), default=-1)
        if first >= 0:
            self._held = ""
            return text[:first], True
        keep = self._longest_stop_prefix_suffix(text)
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held

    def _longest_stop_prefix_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        best = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best
