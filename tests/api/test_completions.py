"""POST /v1/completions through the official openai client, on the real SmolLM2 model."""

from __future__ import annotations

import openai
import pytest

from tests.support.serving import SMOLLM

pytestmark = pytest.mark.slow


def test_string_prompt(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model=SMOLLM, prompt="The capital of France is", max_tokens=6, temperature=0
    )
    assert r.object == "text_completion"
    assert r.id.startswith("cmpl-")
    assert len(r.choices) == 1 and r.choices[0].index == 0
    assert r.choices[0].text
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 6
    assert r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_list_prompt_gives_one_choice_each(det_client: openai.OpenAI) -> None:
    client = det_client  # compares batched and alone greedy tokens (tests/conftest.py: det_server)
    prompts = ["Once upon a time", "The sky is"]
    singles = [
        client.completions.create(model=SMOLLM, prompt=p, max_tokens=5, temperature=0) for p in prompts
    ]
    r = client.completions.create(model=SMOLLM, prompt=prompts, max_tokens=5, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [s.choices[0].text for s in singles]
    assert r.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)
    assert r.usage.completion_tokens == 10


def test_token_id_prompt(client: openai.OpenAI) -> None:
    """A prompt of token ids is the same prompt as its text ([504, 6376, 314] is SmolLM2's 'The sky is')."""
    by_ids = client.completions.create(
        model=SMOLLM, prompt=[504, 6376, 314], max_tokens=4, temperature=0, echo=True
    )
    assert by_ids.choices[0].text.startswith("The sky is")
    by_text = client.completions.create(model=SMOLLM, prompt="The sky is", max_tokens=4, temperature=0)
    assert by_ids.usage.prompt_tokens == by_text.usage.prompt_tokens == 3
    assert by_ids.choices[0].text == "The sky is" + by_text.choices[0].text


@pytest.mark.parametrize("n_prompts", [1, 2])
def test_stream_matches_non_stream(det_client: openai.OpenAI, n_prompts: int) -> None:
    client = det_client  # the same tokens twice at temperature 0: deterministic mode
    prompts = ["Once upon a time", "The sky is"][:n_prompts]
    prompt = prompts[0] if n_prompts == 1 else prompts
    full = client.completions.create(model=SMOLLM, prompt=prompt, max_tokens=8, temperature=0)
    chunks = list(
        client.completions.create(
            model=SMOLLM,
            prompt=prompt,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    texts = {i: "" for i in range(n_prompts)}
    finishes: dict[int, str | None] = {}
    for c in chunks[:-1]:
        for ch in c.choices:
            texts[ch.index] += ch.text
            if ch.finish_reason:
                finishes[ch.index] = ch.finish_reason
    assert [texts[i] for i in range(n_prompts)] == [c.text for c in full.choices]
    assert finishes == {c.index: c.finish_reason for c in full.choices}
    assert chunks[-1].choices == []
    assert chunks[-1].usage.model_dump(
        include={"prompt_tokens", "completion_tokens", "total_tokens"}
    ) == full.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"})


def test_stop_and_sampling_fields(det_client: openai.OpenAI) -> None:
    client = det_client  # compares the tokens of repeated requests: deterministic mode
    prompt = "1, 2, 3, 4, 5,"
    base = client.completions.create(model=SMOLLM, prompt=prompt, max_tokens=12, temperature=0)
    text = base.choices[0].text
    assert "8" in text, text
    stopped = client.completions.create(model=SMOLLM, prompt=prompt, max_tokens=12, temperature=0, stop=["8"])
    assert stopped.choices[0].text == text[: text.index("8")]
    assert stopped.choices[0].finish_reason == "stop"
    a = client.completions.create(
        model=SMOLLM,
        prompt="A poem:",
        max_tokens=10,
        temperature=1.0,
        top_p=0.9,
        seed=5,
        presence_penalty=0.5,
        frequency_penalty=0.5,
    )
    b = client.completions.create(
        model=SMOLLM,
        prompt="A poem:",
        max_tokens=10,
        temperature=1.0,
        top_p=0.9,
        seed=5,
        presence_penalty=0.5,
        frequency_penalty=0.5,
    )
    assert a.choices[0].text == b.choices[0].text


def test_echo_and_logprobs(client: openai.OpenAI) -> None:
    prompt = "The sky is"
    r = client.completions.create(
        model=SMOLLM, prompt=prompt, max_tokens=4, temperature=0, echo=True, logprobs=2
    )
    c = r.choices[0]
    assert c.text.startswith(prompt)
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert "".join(lp.tokens) == c.text[len(prompt) :]
    assert lp.text_offset[0] == len(prompt)
    for tok, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert logprob <= 0
        assert len(top) == 2
        assert max(top, key=top.get) == tok  # greedy


def test_stream_with_echo(client: openai.OpenAI) -> None:
    full = client.completions.create(
        model=SMOLLM, prompt="The sky is", max_tokens=3, temperature=0, echo=True
    )
    chunks = list(
        client.completions.create(
            model=SMOLLM, prompt="The sky is", max_tokens=3, temperature=0, echo=True, stream=True
        )
    )
    assert chunks[0].choices[0].text == "The sky is"
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
