"""scheduler.output.OutputProcessor: UTF-8 across tokens, stop strings across tokens and hold-back,
max_tokens, logprob release."""

from __future__ import annotations

import random

import pytest

from foundry_local_py.engines.base import TokenLogprobs, TokenOutput
from foundry_local_py.scheduler.output import Delta, OutputProcessor


def tok(piece: bytes, *, eog: bool = False, lp: float | None = None) -> TokenOutput:
    return TokenOutput(
        "r", 0, piece, end_of_generation=eog, logprobs=TokenLogprobs(lp) if lp is not None else None
    )


def run(
    pieces: list[bytes],
    *,
    max_tokens: int = 1000,
    stop: list[str] | None = None,
    eog: bool = True,
) -> tuple[list[Delta], OutputProcessor]:
    p = OutputProcessor(max_tokens=max_tokens, stop=stop or [])
    deltas = []
    for piece in pieces:
        d = p.feed(tok(piece))
        if d is not None:
            deltas.append(d)
        if p.finish_reason is not None:
            return deltas, p
    if eog:
        d = p.feed(tok(b"", eog=True))
        if d is not None:
            deltas.append(d)
    return deltas, p


def text_of(deltas: list[Delta]) -> str:
    return "".join(d.text for d in deltas)


# --- UTF-8 -------------------------------------------------------------------------------------


def test_two_byte_character_split_across_tokens() -> None:
    p = OutputProcessor(max_tokens=10, stop=[])
    first = p.feed(tok(b"caf\xc3"))
    assert first is not None and first.text == "caf"  # the lone lead byte is held
    second = p.feed(tok(b"\xa9!"))
    assert second is not None and second.text == "\u00e9!"


def test_emoji_one_byte_per_token() -> None:
    emoji = "😀".encode()
    deltas, p = run([bytes([b]) for b in emoji])
    texts = [d.text for d in deltas]
    assert texts[:3] == ["", "", ""]  # nothing sendable until the fourth byte
    assert text_of(deltas) == "😀"
    assert p.completion_tokens == 4
    assert sum(d.n_tokens for d in deltas) == 4  # every token is reported, even those without text


@pytest.mark.parametrize("seed", range(20))
def test_random_splits_never_break_utf8(seed: int) -> None:
    rng = random.Random(seed)
    text = "".join(rng.choice(["a", "é", "猫", "😀", " ", "ß", "🎉", "\u0301", "z"]) for _ in range(40))
    data = text.encode()
    cuts = sorted(rng.sample(range(1, len(data)), k=min(25, len(data) - 1)))
    pieces = [data[i:j] for i, j in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    deltas, p = run(pieces)
    for d in deltas:
        assert "\ufffd" not in d.text
    assert text_of(deltas) == text
    assert p.finish_reason == "stop"


def test_max_tokens_in_the_middle_of_a_character_drops_it() -> None:
    deltas, p = run([b"ok ", b"\xf0\x9f", b"\x98"], max_tokens=3)
    assert p.finish_reason == "length"
    assert text_of(deltas) == "ok "  # no U+FFFD for the half emoji


def test_invalid_bytes_become_replacement_characters() -> None:
    deltas, _ = run([b"a\xff", b"b"])
    assert text_of(deltas) == "a\ufffdb"


# --- stop strings ------------------------------------------------------------------------------


def test_stop_string_across_tokens() -> None:
    deltas, p = run([b"Hel", b"lo W", b"orld", b"!!"], stop=["o Wo"])
    assert text_of(deltas) == "Hell"
    assert p.finish_reason == "stop"
    assert p.completion_tokens == 3


def test_holdback_of_a_possible_stop_prefix() -> None:
    p = OutputProcessor(max_tokens=10, stop=["lo!"])
    d1 = p.feed(tok(b"Hel"))
    assert d1 is not None and d1.text == "He"  # "l" could start "lo!"
    d2 = p.feed(tok(b"lo"))
    assert d2 is not None and d2.text == "l"  # "llo" ends in "lo", still a possible stop
    d3 = p.feed(tok(b" x"))
    assert d3 is not None and d3.text == "lo x"  # it was not a stop: released
    assert p.finish_reason is None


def test_held_text_is_flushed_at_the_end() -> None:
    deltas, p = run([b"Hel", b"l"], stop=["lo"])
    assert text_of(deltas) == "Hell"
    assert p.finish_reason == "stop"


def test_held_text_is_flushed_at_max_tokens() -> None:
    deltas, p = run([b"Hel", b"l"], stop=["lo"], max_tokens=2)
    assert text_of(deltas) == "Hell"
    assert p.finish_reason == "length"


def test_earliest_of_several_stops_wins() -> None:
    deltas, _ = run([b"abc", b"def", b"ghi"], stop=["gh", "cd", "ef"])
    assert text_of(deltas) == "ab"


def test_stop_inside_one_token_drops_its_tail() -> None:
    deltas, p = run([b"one. two", b" three"], stop=["."])
    assert text_of(deltas) == "one"
    assert p.finish_reason == "stop"


def test_stop_at_the_very_start() -> None:
    deltas, p = run([b"STOP", b"x"], stop=["STOP"])
    assert text_of(deltas) == ""
    assert p.finish_reason == "stop"


def test_stop_with_multibyte_characters_split() -> None:
    data = "ab猫cd".encode()
    deltas, p = run([data[:3], data[3:4], data[4:]], stop=["猫"])
    assert text_of(deltas) == "ab"
    assert p.finish_reason == "stop"


def test_empty_stop_strings_are_ignored() -> None:
    deltas, p = run([b"a", b"b"], stop=[""])
    assert text_of(deltas) == "ab" and p.finish_reason == "stop"


# --- max_tokens and end of generation ----------------------------------------------------------


def test_max_tokens_counts_exactly() -> None:
    deltas, p = run([b"a"] * 10, max_tokens=4)
    assert text_of(deltas) == "aaaa"
    assert p.finish_reason == "length"
    assert p.completion_tokens == 4
    with pytest.raises(AssertionError):
        p.feed(tok(b"a"))


def test_end_of_generation_is_not_a_completion_token() -> None:
    deltas, p = run([b"a", b"b"])
    assert p.finish_reason == "stop"
    assert p.completion_tokens == 2
    assert sum(d.n_tokens for d in deltas) == 2


# --- logprobs ----------------------------------------------------------------------------------


def test_logprobs_released_with_their_text() -> None:
    p = OutputProcessor(max_tokens=10, stop=["xy"])
    d1 = p.feed(tok(b"ab", lp=-0.1))
    assert d1 is not None and [e.token for e in d1.logprobs] == ["ab"]
    d2 = p.feed(tok(b"cx", lp=-0.2))  # "x" held: its token's logprob waits with it
    assert d2 is not None and d2.text == "c" and d2.logprobs == []
    d3 = p.feed(tok(b"d", lp=-0.3))
    assert d3 is not None and d3.text == "xd"
    assert [e.logprob for e in d3.logprobs] == [-0.2, -0.3]


def test_logprobs_of_partial_characters() -> None:
    p = OutputProcessor(max_tokens=10, stop=[])
    d1 = p.feed(tok(b"\xe7\x8c", lp=-1.0))
    d2 = p.feed(tok(b"\xab", lp=-2.0))
    got = [e for d in (d1, d2) if d for e in d.logprobs]
    assert [e.raw for e in got] == [b"\xe7\x8c", b"\xab"]
    assert b"".join(e.raw for e in got).decode() == "猫"
