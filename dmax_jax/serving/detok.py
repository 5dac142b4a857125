"""Incremental detokenisation of committed blocks with stop strings.

Why not ``decode(block)`` per block: BPE pieces of one character may straddle a block boundary (a
partial UTF-8 sequence decodes to U+FFFD) and some decoders rewrite text across tokens (space
clean-up, byte fallback). The stream therefore re-decodes the whole committed sequence, emits only
the prefix that later tokens cannot change (the text that the sequence without its last token and
the full sequence agree on, minus trailing U+FFFD), and holds back any tail that could be the start
of a stop string. Invariant, tested: the concatenated deltas equal :attr:`TextStream.text`, which is
``decode(tokens)`` cut before the first stop string — the text of the non-streamed response.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT = "\ufffd"


def detokenize(tokenizer: Any, ids: Sequence[int]) -> str:
    """The one decode call the server uses for generated text (specials dropped, as ``decode.py``)."""
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class TextStream:
    """Feed committed token ids block by block (:meth:`push`), then :meth:`finish` once.

    After a stop string is found, :attr:`stopped` is set, :attr:`text` is final and further pushes are
    refused; :attr:`tokens_used` is the number of committed tokens the text needed (the tokens up to
    and including the one that completed the stop string), which the server reports as
    ``completion_tokens``.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.emitted = ""           # text already handed out
        self.stopped = False
        self.finished = False
        self.tokens_used = 0

    @property
    def text(self) -> str:
        return self.emitted

    def push(self, ids: Sequence[int]) -> str:
        """Append committed ids; return the new text that is final (possibly "")."""
        if self.finished:
            raise RuntimeError("TextStream already finished")
        self.ids.extend(int(t) for t in ids)
        full = detokenize(self.tokenizer, self.ids)
        before = detokenize(self.tokenizer, self.ids[:-1]) if len(self.ids) > 1 else ""
        stable = full[:_common_prefix(full, before)].rstrip(REPLACEMENT)
        return self._advance(stable, final=False)

    def finish(self) -> str:
        """No more tokens: flush the held-back tail (or nothing if a stop string ended the text)."""
        if self.finished:
            return ""
        delta = "" if self.stopped else self._advance(detokenize(self.tokenizer, self.ids), final=True)
        self.finished = True
        if not self.stopped:
            self.tokens_used = len(self.ids)
        return delta

    def _advance(self, text: str, *, final: bool) -> str:
        if not text.startswith(self.emitted):
            raise RuntimeError(f"detokenisation is not prefix-stable: emitted {self.emitted!r}, now {text!r}")
        cut = self._first_stop(text)
        if cut is not None:
            start, length = cut
            delta = text[len(self.emitted):start]
            self.emitted = text[:start]
            self.stopped = self.finished = True
            self.tokens_used = self._tokens_for(start + length)
            return delta
        end = len(text) if final else len(text) - self._stop_prefix_tail(text)
        end = max(end, len(self.emitted))
        delta = text[len(self.emitted):end]
        self.emitted = text[:end]
        return delta

    def _first_stop(self, text: str) -> tuple[int, int] | None:
        """(start, length) of the earliest stop string occurrence; the search starts where a match could
        still be new (earlier text was checked when it was emitted)."""
        lo = max(0, len(self.emitted) - max((len(s) for s in self.stop), default=0))
        best = None
        for s in self.stop:
            i = text.find(s, lo)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, len(s))
        return best

    def _stop_prefix_tail(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best

    def _tokens_for(self, n_chars: int) -> int:
        """Fewest leading committed tokens whose text covers ``n_chars`` characters."""
        for k in range(1, len(self.ids) + 1):
            if len(detokenize(self.tokenizer, self.ids[:k]).rstrip(REPLACEMENT)) >= n_chars:
                return k
        return len(self.ids)
