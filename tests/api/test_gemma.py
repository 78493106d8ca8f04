"""gemma3-270m, the second catalog entry: a base model without a chat template (completions only)."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.support.serving import GEMMA, assert_openai_error

pytestmark = pytest.mark.slow


def test_completions(client: openai.OpenAI, gemma: str) -> None:
    r = client.completions.create(model=gemma, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.model == GEMMA
    assert r.choices[0].text.strip()
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 0
    chunks = list(
        client.completions.create(
            model=gemma, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text


def test_chat_is_refused(http: httpx.Client, gemma: str) -> None:
    r = http.post(
        "/v1/chat/completions",
        json={"model": gemma, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    )
    err = assert_openai_error(r, 400, param="model", code="model_not_chat")
    assert "/v1/completions" in err["message"]
    with pytest.raises(openai.BadRequestError):
        openai.OpenAI(
            base_url=str(http.base_url) + "/v1", api_key="x", max_retries=0
        ).chat.completions.create(model=gemma, messages=[{"role": "user", "content": "hi"}], max_tokens=4)


def test_listed_and_loaded(http: httpx.Client, gemma: str) -> None:
    card = http.get(f"/v1/models/{gemma}").json()
    assert card["loaded"] is True and card["owned_by"] == "google"
    assert any(m["id"] == gemma for m in http.get("/v1/models").json()["data"])


def test_both_models_serve_side_by_side(client: openai.OpenAI, gemma: str) -> None:
    a = client.completions.create(model=gemma, prompt="Paris is", max_tokens=3, temperature=0)
    b = client.completions.create(model="smollm2-135m", prompt="Paris is", max_tokens=3, temperature=0)
    assert a.model == gemma and b.model == "smollm2-135m"
    assert a.usage.completion_tokens == b.usage.completion_tokens == 3


def test_alias_resolves_on_a_fresh_cache(server_factory) -> None:  # type: ignore[no-untyped-def]
    """The installed [gemma] packages make the alias usable before anything assembled the file."""
    proc = server_factory("--no-preload")
    r = httpx.post(
        proc.url("/v1/completions"),
        timeout=180,
        json={"model": GEMMA, "prompt": "The capital of France is", "max_tokens": 2},
    )
    assert r.status_code == 200, r.text
