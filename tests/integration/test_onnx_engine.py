"""The onnxruntime-genai engine on a real converted model (SmolLM2-135M-Instruct, int4, CPU).

Covers the engine protocol end to end: loading, chat template, greedy coherence, the runner under
the real Scheduler (4 concurrent requests), cancellation freeing a slot, max_tokens and stop strings,
UTF-8 safety, seeded sampling, JSON-schema guidance and provider failures.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime_genai")

from foundry_local_py.engines.base import (
    Constraint,
    GenerationRequest,
    SamplingParams,
    SequenceFailure,
    TokenOutput,
)
from foundry_local_py.engines.chat_template import ChatTemplate
from foundry_local_py.engines.onnx_genai import OG_PROVIDERS, OrtGenaiEngine, OrtGenaiOptions
from foundry_local_py.errors import (
    ContextLengthExceededError,
    EngineError,
    InvalidRequestError,
    ModelLoadError,
)
from foundry_local_py.scheduler.scheduler import (
    ErrorEvent,
    FinishEvent,
    RequestHandle,
    Scheduler,
    TextEvent,
)
from tests.support.runners import drive_alone

pytestmark = [pytest.mark.onnx, pytest.mark.slow]

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="session")
def onnx_model_dir(request: pytest.FixtureRequest) -> Path:
    """SmolLM2-135M int4 ONNX GenAI folder, built once per session by the conversion pipeline
    (the shared ``smollm2_onnx_int4`` fixture). FOUNDRY_TEST_ONNX_MODEL may point at an already
    converted folder, for quick local runs."""
    prebuilt = os.environ.get("FOUNDRY_TEST_ONNX_MODEL")
    if prebuilt:
        return Path(prebuilt)
    path: Path = request.getfixturevalue("smollm2_onnx_int4")
    return path


@pytest.fixture(scope="module")
def engine(onnx_model_dir: Path) -> Iterator[OrtGenaiEngine]:
    eng = OrtGenaiEngine(onnx_model_dir, OrtGenaiOptions(max_batch=4))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def template(engine: OrtGenaiEngine) -> ChatTemplate:
    spec = engine.chat_template()
    assert spec is not None
    return ChatTemplate(spec.source, bos_token=spec.bos_token, eos_token=spec.eos_token)


def chat_ids(engine: OrtGenaiEngine, template: ChatTemplate, text: str) -> list[int]:
    return engine.tokenize(template.render([{"role": "user", "content": text}]), add_special=False)


def run_alone(
    runner, rid: str, prompt: list[int], max_tokens: int, sampling: SamplingParams = GREEDY
) -> tuple[list[bytes], bool]:
    """One request through a runner, as the scheduler would drive it: (its pieces, ended by EOS)."""
    outputs, ended, _ = drive_alone(runner, GenerationRequest(rid, prompt, max_tokens, sampling))
    return [out.piece for out in outputs], ended


async def collect(handle: RequestHandle) -> tuple[str, FinishEvent]:
    parts: list[str] = []
    async for event in handle.events():
        if isinstance(event, TextEvent):
            parts.append(event.text)
        elif isinstance(event, ErrorEvent):
            raise AssertionError(f"request failed: {event.error.message}")
        elif isinstance(event, FinishEvent):
            return "".join(parts), event
    raise AssertionError("the event stream ended without a finish event")


def started_scheduler(engine: OrtGenaiEngine, name: str) -> Scheduler:
    sched = Scheduler(engine, name=name, queue_timeout_s=60)
    sched.start()
    return sched


# --- loading -----------------------------------------------------------------------------------


def test_engine_loads_the_converted_model(engine: OrtGenaiEngine) -> None:
    info = engine.info
    assert info.engine == "onnxruntime-genai"
    assert info.execution_provider == "CPUExecutionProvider"
    assert info.device == "cpu"
    assert info.max_batch == 4
    assert info.n_vocab > 1000
    assert 0 < info.n_ctx <= info.n_ctx_train
    assert info.has_chat_template and info.capabilities.constraints
    assert not info.capabilities.logprobs
    spec = engine.chat_template()
    assert spec is not None and "<|im_start|>" in spec.source
    assert spec.eos_token == "<|im_end|>"
    text = "Hello, 世界 😀 café"
    ids = engine.tokenize(text, add_special=False)
    assert ids and all(0 <= t < info.n_vocab for t in ids)
    assert engine.detokenize(ids).decode("utf-8") == text


def test_greedy_generation_is_coherent_and_deterministic(
    engine: OrtGenaiEngine, template: ChatTemplate
) -> None:
    prompt = chat_ids(engine, template, "What is the capital of France?")
    texts = []
    for _ in range(2):
        runner = engine.create_runner()
        try:
            pieces, _ = run_alone(runner, "a", prompt, 32)
        finally:
            runner.close()
        texts.append(b"".join(pieces).decode("utf-8"))
    assert texts[0] == texts[1]
    assert "Paris" in texts[0]


def test_prompt_checks(engine: OrtGenaiEngine) -> None:
    runner = engine.create_runner()
    try:
        # Validation keeps these out (generation/validate.py); a runner handed one refuses it.
        with pytest.raises(EngineError):
            runner.add(GenerationRequest("empty", [], 8, GREEDY))
        with pytest.raises(EngineError):
            runner.add(GenerationRequest("long", [42] * engine.info.n_ctx, 8, GREEDY))
        assert runner.step() == []
    finally:
        runner.close()


def test_kv_usage_estimate(engine: OrtGenaiEngine, template: ChatTemplate) -> None:
    """What foundry_local_kv_cache_usage_ratio reports for ONNX models (docs/operations.md): the KV
    reserved by running requests, each sized for its prompt + allowed output when it starts, over
    n_ctx x slots; 0 when idle."""
    runner = engine.create_runner()
    try:
        assert runner.kv_usage() == 0
        prompt = chat_ids(engine, template, "Say hello.")
        one = max(len(prompt) + 20, min(engine.min_session, engine.n_ctx)) / (engine.n_ctx * runner.max_batch)
        runner.add(GenerationRequest("a", prompt, 20, GREEDY))
        assert runner.kv_usage() == pytest.approx(one)
        runner.add(GenerationRequest("b", prompt, 20, GREEDY))
        assert runner.kv_usage() == pytest.approx(2 * one)
        runner.step()
        runner.remove("a")
        runner.remove("b")
        assert runner.kv_usage() == 0
    finally:
        runner.close()


# --- the runner under the real scheduler -------------------------------------------------------

QUESTIONS = [
    "What is the capital of France?",
    "Name three colors.",
    "Write one sentence about the sea.",
    "What is 2+2? Explain briefly.",
]


def test_four_concurrent_requests_get_their_own_answers(
    engine: OrtGenaiEngine, template: ChatTemplate
) -> None:
    prompts = [chat_ids(engine, template, q) for q in QUESTIONS]

    async def scenario() -> tuple[list[str], list[str]]:
        sched = started_scheduler(engine, "onnx-concurrent")
        try:
            alone = []
            for i, p in enumerate(prompts):
                text, fin = await collect(sched.submit(GenerationRequest(f"s{i}", p, 40, GREEDY)))
                assert fin.reason in ("stop", "length")
                alone.append(text)
            handles = [sched.submit(GenerationRequest(f"c{i}", p, 40, GREEDY)) for i, p in enumerate(prompts)]
            results = await asyncio.gather(*(collect(h) for h in handles))
            assert sched.stats().completed == 2 * len(prompts)
            return alone, [text for text, _ in results]
        finally:
            sched.stop(drain=False, timeout=30)

    alone, together = asyncio.run(scenario())
    assert len(set(alone)) == len(alone), "the four questions should get four different answers"
    for i, text in enumerate(together):
        assert text.strip(), f"request {i} produced nothing"
    # Batched decoding is exact (MatMulNBits rows do not depend on the batch: see
    # test_batch_invariance.py), so each answer is the one its request gets alone.
    assert together == alone


def test_cancelling_frees_the_slot_in_the_runner(engine: OrtGenaiEngine, template: ChatTemplate) -> None:
    from foundry_local_py.engines.onnx_genai.lanes import GATHER_S

    eng2 = OrtGenaiEngine(engine.path, OrtGenaiOptions(max_batch=2))
    runner = eng2.create_runner()
    try:
        runner._crowded_at = time.monotonic()  # traffic: lanes only (no prefix-reuse generator)
        story = chat_ids(engine, template, "Write a long story about a dragon.")
        runner.add(GenerationRequest("a", story, 300, GREEDY))
        runner.add(GenerationRequest("b", story, 300, GREEDY))
        for _ in range(4):
            assert {o.request_id for o in runner.step()} == {"a", "b"}
        runner.remove("a")
        runner.add(GenerationRequest("c", chat_ids(engine, template, "Say hello."), 20, GREEDY))
        time.sleep(GATHER_S)  # a lane that is not full waits this long for company, no longer
        seen: list[set[str]] = []
        for _ in range(3):
            seen.append({o.request_id for o in runner.step()})
        assert all("a" not in s for s in seen), "a removed request must not produce tokens"
        assert all("b" in s for s in seen), "the running request keeps going"
        assert "c" in seen[0], "the new request starts at once, not after the running batch"
        runner.remove("b")
        runner.remove("c")
        # The removed requests have left onnxruntime-genai's engines too: nothing is pending there.
        assert all(lane.idle() for lane in runner._lanes)
        assert runner.step() == []
    finally:
        runner.close()
        eng2.close()


def test_cancel_through_the_scheduler_admits_the_next_request(
    engine: OrtGenaiEngine, template: ChatTemplate
) -> None:
    eng1 = OrtGenaiEngine(engine.path, OrtGenaiOptions(max_batch=1))
    long_prompt = chat_ids(engine, template, "Write a long story about a dragon.")
    short_prompt = chat_ids(engine, template, "What is the capital of France?")

    async def scenario() -> None:
        sched = started_scheduler(eng1, "onnx-cancel")
        try:
            first = sched.submit(GenerationRequest("long", long_prompt, 1000, GREEDY))
            events = first.events()
            assert isinstance(await anext(events), TextEvent)
            second = sched.submit(GenerationRequest("next", short_prompt, 40, GREEDY))
            await asyncio.sleep(0.2)
            assert sched.stats().waiting == 1, "with max_batch=1 the second request waits"
            first.cancel()
            fin = None
            async for event in events:
                if isinstance(event, FinishEvent):
                    fin = event
            assert fin is not None and fin.reason == "cancelled"
            assert fin.completion_tokens < 1000
            text, fin2 = await asyncio.wait_for(collect(second), timeout=60)
            assert "Paris" in text and fin2.reason in ("stop", "length")
            assert sched.stats().cancelled == 1
        finally:
            sched.stop(drain=False, timeout=30)

    try:
        asyncio.run(scenario())
    finally:
        eng1.close()


def test_max_tokens_and_stop_strings_via_the_scheduler(
    engine: OrtGenaiEngine, template: ChatTemplate
) -> None:
    prompt = chat_ids(engine, template, "What is the capital of France?")

    async def scenario() -> None:
        sched = started_scheduler(engine, "onnx-limits")
        try:
            full, fin = await collect(sched.submit(GenerationRequest("full", prompt, 40, GREEDY)))
            assert fin.reason == "length" and fin.completion_tokens == 40 and "Paris" in full
            text, fin = await collect(sched.submit(GenerationRequest("len", prompt, 5, GREEDY)))
            assert fin.reason == "length" and fin.completion_tokens == 5
            assert full.startswith(text) and 0 < len(text) < len(full)
            req = GenerationRequest("stop", prompt, 40, GREEDY, stop=["Paris"])
            text, fin = await collect(sched.submit(req))
            assert fin.reason == "stop"
            assert text == full[: full.index("Paris")]
        finally:
            sched.stop(drain=False, timeout=30)

    asyncio.run(scenario())


# --- text safety -------------------------------------------------------------------------------


def test_token_stream_never_splits_a_character(engine: OrtGenaiEngine, template: ChatTemplate) -> None:
    # Tokenizer level: these characters span several byte-level tokens each.
    text = "日本語 😀 café"
    stream = engine.create_stream()
    pieces = [str(stream.decode(t)).encode("utf-8") for t in engine.tokenize(text, add_special=False)]
    assert b"" in pieces, "the sample should contain a character split across tokens"
    assert b"".join(pieces).decode("utf-8") == text
    # Generation level: every piece the runner emits is valid UTF-8 on its own.
    runner = engine.create_runner()
    try:
        pieces, _ = run_alone(runner, "u", chat_ids(engine, template, "Write an emoji."), 24)
    finally:
        runner.close()
    for piece in pieces:
        piece.decode("utf-8")  # strict: raises on a partial character
    out = b"".join(pieces).decode("utf-8")
    assert "\ufffd" not in out
    assert any(ord(ch) > 127 for ch in out), out


# --- sampling and constraints -------------------------------------------------------------------


def test_seeded_sampling_is_reproducible(engine: OrtGenaiEngine, template: ChatTemplate) -> None:
    prompt = chat_ids(engine, template, "Write a haiku about the sea.")
    runner = engine.create_runner()
    try:
        def sample(seed: int | None) -> bytes:
            sp = SamplingParams(temperature=1.0, top_p=0.95, top_k=50, seed=seed)
            return b"".join(run_alone(runner, f"s{seed}", prompt, 24, sp)[0])

        first, again = sample(7), sample(7)
        assert first == again
        others = {sample(8), sample(9), sample(None)}
        assert others - {first}, "different seeds should give different samples"
    finally:
        runner.close()


def test_json_schema_constraint(engine: OrtGenaiEngine, template: ChatTemplate) -> None:
    with pytest.raises(InvalidRequestError):
        engine.validate_constraint(Constraint("json_schema", {"type": "frobnicate"}))
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    constraint = Constraint("json_schema", schema)
    engine.validate_constraint(constraint)
    runner = engine.create_runner()
    try:
        prompt = chat_ids(engine, template, "Is the sky blue? Answer in JSON.")
        sp = SamplingParams(temperature=0.0, constraint=constraint)
        pieces, ended = run_alone(runner, "j", prompt, 40, sp)
    finally:
        runner.close()
    assert ended
    assert json.loads(b"".join(pieces).decode("utf-8"))["answer"] in ("yes", "no")


def test_generator_fallback_runner_matches_the_engine(
    engine: OrtGenaiEngine, template: ChatTemplate
) -> None:
    gen_engine = OrtGenaiEngine(engine.path, OrtGenaiOptions(max_batch=2, runner="generator"))
    prompt = chat_ids(engine, template, "Name three colors.")
    try:
        runner = gen_engine.create_runner()
        assert type(runner).__name__ == "GeneratorRunner"
        try:
            via_generator, _ = run_alone(runner, "g", prompt, 40)
            runner.add(GenerationRequest("x", prompt, 40, GREEDY))
            runner.add(GenerationRequest("y", prompt, 40, GREEDY))
            outs = runner.step()
            assert {o.request_id for o in outs} == {"x", "y"}
            runner.remove("x")
            assert {o.request_id for o in runner.step()} == {"y"}
        finally:
            runner.close()
        runner = engine.create_runner()
        try:
            via_engine, _ = run_alone(runner, "e", prompt, 40)
        finally:
            runner.close()
        assert via_generator == via_engine
    finally:
        gen_engine.close()


def test_running_out_of_context_fails_the_sequence(engine: OrtGenaiEngine) -> None:
    small = OrtGenaiEngine(engine.path, OrtGenaiOptions(max_batch=1, n_ctx=24))
    prompt = engine.tokenize("Once upon a time there was")
    outs: list[TokenOutput | SequenceFailure] = []
    try:
        assert small.info.n_ctx == 24
        runner = small.create_runner()
        try:
            runner.add(GenerationRequest("ctx", prompt, 100, GREEDY))
            while not any(isinstance(o, SequenceFailure) or o.end_of_generation for o in outs):
                step = runner.step()
                assert step, "a sequence in the runner must make progress or end"
                outs.extend(step)
        finally:
            runner.close()
    finally:
        small.close()
    tokens = [o for o in outs if isinstance(o, TokenOutput) and not o.end_of_generation]
    assert len(tokens) <= 24 - len(prompt)
    last = outs[-1]
    if isinstance(last, SequenceFailure):
        assert isinstance(last.error, ContextLengthExceededError)
        assert len(tokens) == 24 - len(prompt)
    else:  # the model ended by itself before the context ran out
        assert last.end_of_generation


# --- provider and folder errors ----------------------------------------------------------------


@pytest.mark.parametrize("provider", ["dml", "qnn", "webgpu", "openvino"])
def test_unavailable_provider_raises_model_load_error(onnx_model_dir: Path, provider: str) -> None:
    import onnxruntime

    if OG_PROVIDERS[provider][1] in onnxruntime.get_available_providers():
        pytest.skip(f"{provider} is available here")
    with pytest.raises(ModelLoadError) as err:
        OrtGenaiEngine(onnx_model_dir, OrtGenaiOptions(execution_provider=provider))
    assert provider in err.value.message
    assert str(onnx_model_dir) not in err.value.message


def test_unknown_provider_and_non_model_folder(onnx_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError):
        OrtGenaiEngine(onnx_model_dir, OrtGenaiOptions(execution_provider="bogus"))
    with pytest.raises(ModelLoadError) as err:
        OrtGenaiEngine(tmp_path, OrtGenaiOptions())
    assert str(tmp_path) not in err.value.message


def test_converted_gemma_generates_from_a_short_prompt(gemma3_onnx_int8: Path) -> None:
    """Gemma 3 converted from GGUF: prompts start with BOS (tokenizer_config asks for it; the
    og tokenizer does not add it) and a short request still gets a KV buffer as large as the
    sliding window (onnxruntime-genai refuses a smaller one). Either bug: no tokens at all."""
    eng = OrtGenaiEngine(gemma3_onnx_int8, OrtGenaiOptions(max_batch=1))
    try:
        tokens = eng.tokenize("Once upon a time, a lighthouse keeper")
        assert tokens[0] == eng._bos_id is not None
        assert len(tokens) + 8 < eng.min_session  # short enough to have hit the window bug
        runner = eng.create_runner()
        runner.add(GenerationRequest("g", tokens, 8, GREEDY))
        pieces: list[bytes] = []
        for _ in range(20):
            for out in runner.step():
                assert isinstance(out, TokenOutput), out
                pieces.append(out.piece)
            if len(pieces) >= 8:
                break
        runner.close()
        assert len(pieces) >= 8 and b"".join(pieces).decode("utf-8").strip()
    finally:
        eng.close()


@pytest.mark.parametrize("variant", ["smollm2_onnx_int8", "gemma3_onnx_int8"])
def test_last_position_logits_rewrite_keeps_the_logits(variant: str, request: pytest.FixtureRequest) -> None:
    """The engine loads the decoder with the LM head computed for the last position only
    (engines/onnx_genai/graph.py): a prompt's next-token logits are bitwise those of the graph as
    converted (8-bit heads compute a row the same whatever the rows beside it), and so are the
    greedy tokens after it."""
    import numpy as np
    import onnxruntime_genai as og

    path: Path = request.getfixturevalue(variant)
    eng = OrtGenaiEngine(path, OrtGenaiOptions(max_batch=1))
    plain = og.Model(str(path))
    try:
        assert eng.last_position_logits
        prompt = np.asarray(eng.tokenize("Write two sentences about the sea and the wind."), dtype=np.int32)
        length = max(len(prompt) + 16, eng.min_session)

        def greedy(model: og.Model) -> tuple[np.ndarray, list[int]]:
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=length, do_sample=False)
            gen = og.Generator(model, params)
            gen.append_tokens(prompt)
            first = np.array(gen.get_logits())[0, -1].copy()
            tokens = []
            for _ in range(16):
                gen.generate_next_token()
                tokens.append(int(gen.get_next_tokens()[0]))
            return first, tokens

        ours, plain_out = greedy(eng.model), greedy(plain)
        assert np.array_equal(ours[0], plain_out[0])
        assert ours[1] == plain_out[1]
    finally:
        del plain
        eng.close()


def test_batch_probe_runs_on_a_sliding_window_model(
    gemma3_onnx_int8: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The load-time batch probe sizes its generators for the sliding window (Gemma 3 refuses a
    KV buffer smaller than 512): before, the probe failed there and the model was decoded one
    sequence at a time for no reason."""
    import logging

    with caplog.at_level(logging.INFO, logger="foundry_local_py.engines.onnx_genai.lanes"):
        eng = OrtGenaiEngine(gemma3_onnx_int8, OrtGenaiOptions(max_batch=2))
    try:
        assert eng.min_session > 0
        assert not [r for r in caplog.records if "could not compare" in r.getMessage()]
    finally:
        eng.close()
