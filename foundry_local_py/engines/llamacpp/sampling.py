"""Sampling for the llama.cpp runner.

Sampling uses llama.cpp's sampler chains (one per sequence): logit bias, penalties, grammar
(structured output), top-k, top-p, min-p, temperature, seeded dist / greedy.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import llama_grammar

from ...errors import InvalidRequestError
from ..base import Constraint, SamplingParams, TokenLogprobs, TopCandidate

_DEFAULT_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: a random seed


def constraint_to_gbnf(constraint: Constraint) -> str:
    """Compile an engine-neutral constraint to a llama.cpp GBNF grammar (400 on bad schemas)."""
    if constraint.kind == "json_object" and constraint.schema is None:
        return llama_grammar.JSON_GBNF
    schema = constraint.schema if constraint.schema is not None else {"type": "object"}
    try:
        return llama_grammar.json_schema_to_gbnf(json.dumps(schema))
    except RecursionError as exc:
        raise InvalidRequestError("the JSON schema nests too deeply", param="response_format") from exc
    except Exception as exc:
        raise InvalidRequestError(
            f"unsupported JSON schema: {type(exc).__name__}: {str(exc)[:200]}", param="response_format"
        ) from exc


def make_sampler(sp: SamplingParams, n_vocab: int, vocab_ptr: Any) -> Any:
    """A llama.cpp sampler chain for one sequence (freed by the runner when it ends)."""
    params = llama_cpp.llama_sampler_chain_default_params()
    chain = llama_cpp.llama_sampler_chain_init(params)
    add = llama_cpp.llama_sampler_chain_add
    if sp.logit_bias:
        arr = (llama_cpp.llama_logit_bias * len(sp.logit_bias))()
        for i, (tok, bias) in enumerate(sp.logit_bias.items()):
            arr[i].token = tok  # type: ignore[assignment]
            arr[i].bias = bias
        add(chain, llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(sp.logit_bias), arr))
    if sp.repeat_penalty != 1.0 or sp.frequency_penalty or sp.presence_penalty:
        add(chain, llama_cpp.llama_sampler_init_penalties(
            n_vocab, 64, sp.repeat_penalty, sp.frequency_penalty, sp.presence_penalty))
    if sp.constraint is not None:
        grammar = constraint_to_gbnf(sp.constraint)
        g = llama_cpp.llama_sampler_init_grammar(vocab_ptr, grammar.encode(), b"root")
        if not g:
            llama_cpp.llama_sampler_free(chain)
            raise InvalidRequestError(
                "the response schema could not be compiled", param="response_format"
            )
        add(chain, g)
    if sp.temperature <= 0.0:
        add(chain, llama_cpp.llama_sampler_init_greedy())
        return chain
    if sp.top_k > 0:
        add(chain, llama_cpp.llama_sampler_init_top_k(sp.top_k))
    if sp.top_p < 1.0:
        add(chain, llama_cpp.llama_sampler_init_top_p(sp.top_p, 1))
    if sp.min_p > 0.0:
        add(chain, llama_cpp.llama_sampler_init_min_p(sp.min_p, 1))
    add(chain, llama_cpp.llama_sampler_init_temp(sp.temperature))
    seed = _DEFAULT_SEED if sp.seed is None else sp.seed % 0xFFFFFFFF
    add(chain, llama_cpp.llama_sampler_init_dist(seed))
    return chain


def top_logprobs(ptr: Any, n_vocab: int, k: int,
                 piece: Callable[[int], bytes]) -> Callable[[int], TokenLogprobs]:
    """From one row of logits (``ptr``): a function giving the chosen token's log-probability and
    the ``k`` most likely candidates."""
    logits = np.ctypeslib.as_array(ptr, shape=(n_vocab,)).astype(np.float64)
    m = logits.max()
    logp = logits - (m + np.log(np.exp(logits - m).sum()))
    top: tuple[TopCandidate, ...] = ()
    if k > 0:
        ids = np.argpartition(-logp, k)[:k]
        ids = ids[np.argsort(-logp[ids])]
        top = tuple(TopCandidate(int(t), piece(int(t)), float(logp[t])) for t in ids)

    def for_token(token: int) -> TokenLogprobs:
        return TokenLogprobs(float(logp[token]), top)

    return for_token

