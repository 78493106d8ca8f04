"""Property tests (hypothesis) of the incremental UTF-8 / stop-string processor
(scheduler/output.py): however the engine splits a byte string into tokens, the text that comes
out is the text of the whole, no delta carries broken UTF-8, and stop strings cut at the same
place."""

from __future__ import annotations

import codecs
import itertools

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from foundry_local_py.engines.base import TokenOutput
from foundry_local_py.scheduler.output import OutputProcessor

SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Text that exercises every UTF-8 length, combining marks, and characters that are stop-string-ish.
ALPHABET = st.sampled_from(
    ["a", "b", " ", "\n", "é", "ß", "猫", "語", "😀", "🎉", "\u0301", "\u200d", "<", "/", ">"])
TEXT = st.lists(st.one_of(ALPHABET, st.characters(blacklist_categories=["Cs"])), max_size=60).map("".join)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[i:j] for i, j in itertools.pairwise(bounds)]


def _run(pieces: list[bytes], *, stop: list[str] | None = None, max_tokens: int = 10_000,
         eog: bool = True) -> tuple[list[str], OutputProcessor]:
    p = OutputProcessor(max_tokens=max_tokens, stop=stop or [])
    texts: list[str] = []
    for piece in pieces:
        d = p.feed(TokenOutput("r", 0, piece))
        if d is not None:
            texts.append(d.text)
        if p.finish_reason is not None:
            return texts, p
    if eog:
        d = p.feed(TokenOutput("r", 0, b"", end_of_generation=True))
        if d is not None:
            texts.append(d.text)
    return texts, p


def _valid_utf8(text: str) -> bool:
    try:
        text.encode("utf-8", errors="strict")  # a lone surrogate cannot be encoded
    except UnicodeEncodeError:
        return False
    return True


@SETTINGS
@given(text=TEXT, cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=40))
@example(text="😀é", cuts=[1, 2, 3, 4, 5])
def test_any_split_of_valid_utf8_gives_the_whole_text(text: str, cuts: list[int]) -> None:
    data = text.encode()
    texts, p = _run(_split(data, cuts))
    assert "".join(texts) == text
    assert all(_valid_utf8(t) and "\ufffd" not in t for t in texts)
    assert p.finish_reason == "stop"


@SETTINGS
@given(data=st.binary(max_size=80), cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=40))
@example(data=b"\xf0\x9f\x98", cuts=[1, 2])
@example(data=b"a\xc3(\xe2\x82", cuts=[2, 3])
def test_any_split_of_any_bytes_is_the_same_as_whole_and_valid(data: bytes, cuts: list[int]) -> None:
    whole, _ = _run([data])
    split, _ = _run(_split(data, cuts))
    assert "".join(split) == "".join(whole)
    assert all(_valid_utf8(t) for t in split)
    # what comes out is the bytes decoded with replacement, less an incomplete character at the
    # very end (dropped, never half-sent)
    assert "".join(split) == codecs.getincrementaldecoder("utf-8")("replace").decode(data, final=False)


def _reference_stop(text: str, stops: list[str]) -> str:
    cuts = [text.find(s) for s in stops if s and s in text]
    return text[: min(cuts)] if cuts else text


@SETTINGS
@given(
    text=TEXT,
    stops=st.lists(st.one_of(TEXT.filter(bool).map(lambda t: t[:6]),
                             st.sampled_from(["</s>", "\n\n", "é猫"])), min_size=1, max_size=4),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=40),
)
@example(text="hello</s>world", stops=["</s>"], cuts=[6, 7, 8])
@example(text="aab", stops=["ab"], cuts=[1])
# A shorter stop completes first inside a longer one that started earlier: cut at the earlier.
@example(text="\x80éaa", stops=["é", "\x80éa"], cuts=[6276])
@example(text="xabc", stops=["b", "abc"], cuts=[2, 3])
def test_stop_strings_cut_at_the_same_place_however_split(
    text: str, stops: list[str], cuts: list[int]
) -> None:
    stops = [s for s in stops if s]
    data = text.encode()
    texts, p = _run(_split(data, cuts), stop=stops)
    out = "".join(texts)
    assert out == _reference_stop(text, stops)
    assert not any(s in out for s in stops)
    assert all(_valid_utf8(t) and "\ufffd" not in t for t in texts)
    assert p.finish_reason == "stop"


@SETTINGS
@given(text=TEXT, n=st.integers(min_value=1, max_value=30),
       cuts=st.lists(st.integers(0, 10_000), max_size=40))
def test_max_tokens_ends_with_length_and_a_prefix(text: str, n: int, cuts: list[int]) -> None:
    pieces = [p for p in _split(text.encode(), cuts) if p]
    texts, p = _run(pieces, max_tokens=n, eog=False)
    out = "".join(texts)
    assert text.startswith(out)
    assert all(_valid_utf8(t) and "\ufffd" not in t for t in texts)
    if len(pieces) >= n:
        assert p.finish_reason == "length" and p.completion_tokens == n
