"""engines.prompt_cache: longest-prefix lookup, subsumption, byte-bounded LRU; config.auto_parallel."""

from __future__ import annotations

import numpy as np

from foundry_local_py.config import KV_TOKEN_BUDGET, auto_parallel
from foundry_local_py.engines.prompt_cache import PromptCache, as_tokens, common_prefix


def test_common_prefix() -> None:
    assert common_prefix(as_tokens([1, 2, 3]), as_tokens([1, 2, 4])) == 2
    assert common_prefix(as_tokens([1, 2]), as_tokens([1, 2, 3])) == 2
    assert common_prefix(as_tokens([]), as_tokens([1])) == 0
    assert common_prefix(as_tokens([5]), as_tokens([1])) == 0


def test_lookup_finds_the_longest_prefix_above_the_floor() -> None:
    cache = PromptCache(1000)
    cache.put([1, 2, 3, 4], lambda: b"a" * 10)
    cache.put([1, 2, 9, 9, 9], lambda: b"b" * 10)
    hit = cache.lookup(as_tokens([1, 2, 3, 4, 5]), 0)
    assert hit is not None and hit[0].state == b"a" * 10 and hit[1] == 4
    hit = cache.lookup(as_tokens([1, 2, 9, 7]), 0)
    assert hit is not None and hit[0].state == b"b" * 10 and hit[1] == 3
    assert cache.lookup(as_tokens([1, 2, 3, 4, 5]), 4) is None  # not better than what we have
    assert cache.lookup(as_tokens([7, 2, 3]), 0) is None


def test_an_extension_replaces_its_prefix_and_a_prefix_of_an_entry_is_not_stored() -> None:
    cache = PromptCache(1000)
    cache.put([1, 2, 3], lambda: b"x" * 10)
    cache.put([1, 2, 3, 4, 5], lambda: b"y" * 20)
    assert len(cache) == 1 and cache.bytes == 20
    cache.put([1, 2], lambda: b"z" * 5)
    assert len(cache) == 1 and cache.bytes == 20


def test_bounded_in_bytes_least_recently_used_goes_first() -> None:
    cache = PromptCache(30)
    cache.put([1, 1], lambda: b"a" * 10)
    cache.put([2, 2], lambda: b"b" * 10)
    cache.put([3, 3], lambda: b"c" * 10)
    assert cache.lookup(np.array([1, 1, 5]), 0) is not None  # touch [1, 1]
    cache.put([4, 4], lambda: b"d" * 10)
    assert cache.bytes <= 30 and len(cache) == 3
    assert cache.lookup(np.array([2, 2, 5]), 0) is None  # the least recently used was dropped
    assert cache.lookup(np.array([1, 1, 5]), 0) is not None
    cache.put([9], lambda: b"e" * 31)  # larger than the whole budget: not stored
    assert cache.lookup(np.array([9, 1]), 0) is None


def test_auto_parallel_from_cores_and_context() -> None:
    assert auto_parallel(4096, cores=2) == 8
    assert auto_parallel(4096, cores=1) == 4
    assert auto_parallel(2048, cores=16) == 16
    assert auto_parallel(KV_TOKEN_BUDGET, cores=8) == 1
    assert auto_parallel(8192, cores=2) == KV_TOKEN_BUDGET // 8192
