"""Turn a sequence's raw token bytes into safe text deltas: UTF-8, stop strings, max_tokens.

Engine-neutral: the same for llama.cpp and onnxruntime-genai. Bytes of a character split across
tokens are held until the character is complete, so no delta carries broken UTF-8. Text that could
be the beginning of a stop string is held back until it is known not to be one.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field
from typing import Literal

from ..engines.base import TokenLogprobs, TokenOutput

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class LogprobEntry:
    token: str
    raw: bytes
    logprob: float
    top: tuple[tuple[str, bytes, float], ...]


@dataclass
class Delta:
    text: str
    n_tokens: int
    logprobs: list[LogprobEntry] = field(default_factory=list)


@dataclass
class _PendingToken:
    start: int  # offsets in the sequence's text where this token's text begins and ends
    end: int
    entry: LogprobEntry | None


def _entry(out: TokenOutput, lp: TokenLogprobs) -> LogprobEntry:
    return LogprobEntry(
        token=out.piece.decode("utf-8", errors="backslashreplace"),
        raw=out.piece,
        logprob=lp.logprob,
        top=tuple((c.piece.decode("utf-8", errors="backslashreplace"), c.piece, c.logprob) for c in lp.top),
    )


class OutputProcessor:
    """Per-sequence state. Not thread-safe: owned by the scheduler's worker thread."""

    def __init__(self, *, max_tokens: int, stop: list[str]) -> None:
        self.max_tokens = max_tokens
        self.stop = [s for s in stop if s]
        self._max_stop = max((len(s) for s in self.stop), default=0)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""  # decoded but not yet emitted text
        self._emitted_chars = 0  # chars emitted so far (offset base of _pending)
        self._tokens: list[_PendingToken] = []
        self._unreported_tokens = 0
        self.completion_tokens = 0
        self.finish_reason: FinishReason | None = None
        self.stop_sequence: str | None = None
        """The stop string the text was cut at, if it was (Anthropic's ``stop_sequence``)."""

    def feed(self, out: TokenOutput) -> Delta | None:
        """Process one token; return the text that is safe to send now (or None)."""
        assert self.finish_reason is None, "fed a finished sequence"
        if out.end_of_generation:
            self.finish_reason = "stop"
            return self._flush(final=True)
        self.completion_tokens += 1
        self._unreported_tokens += 1
        start = self._emitted_chars + len(self._pending)
        self._pending += self._decoder.decode(out.piece)
        entry = _entry(out, out.logprobs) if out.logprobs is not None else None
        self._tokens.append(_PendingToken(start, self._emitted_chars + len(self._pending), entry))

        if self.stop:
            cut = self._find_stop()
            if cut is not None:
                opened = self._earliest_open_stop(before=cut)
                if opened is None:
                    self.finish_reason = "stop"
                    return self._emit(cut, drop_rest=True)
                # A stop string that starts earlier may still complete: the text ends at the
                # stop that starts first, however the tokens split it, so hold until it is known.
                if self.completion_tokens < self.max_tokens:
                    return self._emit(opened)
        if self.completion_tokens >= self.max_tokens:
            self.finish_reason = "length"
            return self._flush(final=True)
        hold = self._stop_prefix_len() if self.stop else 0
        return self._emit(len(self._pending) - hold)

    def end(self, reason: FinishReason) -> Delta | None:
        """The runner ended the sequence (``length``: no KV room left): the rest of the text."""
        self.finish_reason = reason
        return self._flush(final=True)

    def _find_stop(self) -> int | None:
        """Where the first stop string starts in the pending text (the text ends there: the
        string is remembered as ``stop_sequence``)."""
        best: int | None = None
        for s in self.stop:
            i = self._pending.find(s)
            if i >= 0 and (best is None or i < best):
                best = i
                self.stop_sequence = s
        return best

    def _earliest_open_stop(self, *, before: int) -> int | None:
        """The first offset before ``before`` where the pending text's tail is a proper
        beginning of some stop string (one that would start earlier than a completed one)."""
        text = self._pending
        for j in range(max(0, len(text) - self._max_stop + 1), before):
            tail = text[j:]
            if any(len(s) > len(tail) and s.startswith(tail) for s in self.stop):
                return j
        return None

    def _stop_prefix_len(self) -> int:
        """Length of the longest suffix of pending text that starts some stop string."""
        text = self._pending
        longest = 0
        for k in range(1, min(len(text), self._max_stop - 1) + 1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                longest = k
        return longest

    def _flush(self, *, final: bool) -> Delta | None:
        if final:
            # Bytes of a character that max_tokens (or the end of generation) cut in half are
            # dropped: decoding them would put a U+FFFD replacement character into the text.
            self._decoder.reset()
        if self.stop and final:
            cut = self._find_stop()
            if cut is not None:
                self.finish_reason = "stop"
                return self._emit(cut, drop_rest=True)
        return self._emit(len(self._pending), drop_rest=final)

    def _emit(self, n: int, *, drop_rest: bool = False) -> Delta | None:
        text, self._pending = self._pending[:n], self._pending[n:]
        limit = self._emitted_chars + n
        self._emitted_chars = limit
        released: list[LogprobEntry] = []
        keep: list[_PendingToken] = []
        for tok in self._tokens:
            # A token is released once its text is out; at a stop, tokens that began before it.
            if tok.end <= limit or (drop_rest and tok.start < limit):
                if tok.entry is not None:
                    released.append(tok.entry)
            elif not drop_rest:
                keep.append(tok)
        self._tokens = keep
        if drop_rest:
            self._pending = ""
        n_tokens, self._unreported_tokens = self._unreported_tokens, 0
        if not text and not released and n_tokens == 0:
            return None
        return Delta(text=text, n_tokens=n_tokens, logprobs=released)
