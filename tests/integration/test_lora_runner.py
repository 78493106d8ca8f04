"""The llama.cpp runner with LoRA adapters, driven directly (real SmolLM2 GGUF, real GGUF LoRA files):
one adapter set per decode with the base's batching intact, KV never reused across adapter sets,
and adapter lifetimes (LRU beyond max_loras, TTL, unload while in use)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from foundry_local_py.cache.store import sha256_file
from foundry_local_py.engines.base import GenerationRequest, LoraRef, SamplingParams, TokenOutput
from foundry_local_py.engines.llamacpp import LlamaCppEngine, LlamaCppOptions
from tests.support.hub_catalog import smol_gguf_path
from tests.support.lora import write_lora

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def refs(tmp_path_factory: pytest.TempPathFactory) -> tuple[LoraRef, LoraRef]:
    d = tmp_path_factory.mktemp("loras")
    a, b = write_lora(d / "a.gguf", seed=0), write_lora(d / "b.gguf", seed=1)
    return LoraRef("a", a, sha256_file(a)), LoraRef("b", b, sha256_file(b))


@pytest.fixture(scope="module")
def engine() -> Iterator[LlamaCppEngine]:
    # Deterministic mode: outputs are compared with the same request alone, and only per-slot
    # streams promise that (in the shared pool a neighbour's cells change the attention's sums).
    e = LlamaCppEngine(smol_gguf_path(), LlamaCppOptions(n_threads=1, max_batch=4, n_ctx=1024, max_loras=1,
                                                         deterministic=True))
    yield e
    e.close()


PROMPT = "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n"


class Driver:
    def __init__(self, engine: LlamaCppEngine) -> None:
        self.engine = engine
        self.runner = engine.create_runner()
        self.prompt = engine.tokenize(PROMPT)
        self.out: dict[str, list[int]] = {}
        self.n = 0

    def add(self, lora: tuple[LoraRef, ...] = ()) -> str:
        rid = f"r{self.n}"
        self.n += 1
        self.out[rid] = []
        greedy = SamplingParams(temperature=0)
        self.runner.add(GenerationRequest(rid, list(self.prompt), 16, greedy, [], lora))
        return rid

    def step(self, limit: int = 16) -> set[str]:
        done = set()
        for o in self.runner.step():
            assert isinstance(o, TokenOutput), o
            self.out[o.request_id].append(o.token_id)
            if o.end_of_generation or len(self.out[o.request_id]) >= limit:
                self.runner.remove(o.request_id)
                done.add(o.request_id)
        return done

    def run(self, *rids: str) -> list[list[int]]:
        live = set(rids)
        while live:
            live -= self.step()
        return [self.out[r] for r in rids]


def test_groups_kv_keys_and_adapter_lifetimes(engine: LlamaCppEngine, refs: tuple[LoraRef, LoraRef]) -> None:
    a, b = refs
    d = Driver(engine)
    try:
        (base,) = d.run(d.add())
        (alone_a,) = d.run(d.add((a,)))
        (alone_b,) = d.run(d.add((b,)))
        assert len({tuple(base), tuple(alone_a), tuple(alone_b)}) == 3
        # the same prompt under another adapter set right after: its cached KV is not reused
        assert d.run(d.add(), d.add((a,)), d.add((b,)), d.add((a,))) == [base, alone_a, alone_b, alone_a]
        assert len(engine.loaded_loras()) == 1  # max_loras=1: the least recently used idle one went
        # unloaded while in use: the running sequence finishes with it; a new request loads a copy
        first = d.add((a,))
        d.step()
        d.step()
        assert engine.unload_lora("a") == 1 and engine.loaded_loras() == []
        second = d.add((a,))
        assert d.run(first, second) == [alone_a, alone_a]
        assert engine.loaded_loras() == ["a"]
        assert engine.expire_loras(0.0) == 1 and engine.loaded_loras() == []
        assert d.run(d.add()) == [base]
    finally:
        d.runner.close()
