"""What both onnxruntime-genai runners share: a request's KV budget, sampling options, guidance,
and how the runtime's errors and finish reasons reach the scheduler."""

from __future__ import annotations

import json
import logging
import re
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...errors import ContextLengthExceededError, EngineError, InvalidRequestError
from ..base import Constraint, GenerationRequest, SamplingParams, SequenceFailure, TokenOutput

if TYPE_CHECKING:
    from .engine import OrtGenaiEngine

log = logging.getLogger(__name__)

_PATHISH = re.compile(r"(?:[A-Za-z]:)?[\\/][^\s'\"]+")


def scrub(text: str) -> str:
    """An onnxruntime-genai error message without filesystem paths, short enough for a client."""
    return _PATHISH.sub("<path>", text).strip()[:300]



def constraint_to_guidance(constraint: Constraint) -> tuple[str, str]:
    """An engine-neutral constraint as onnxruntime-genai guidance: ('json_schema', schema text)."""
    schema = constraint.schema if constraint.schema is not None else {"type": "object"}
    try:
        return "json_schema", json.dumps(schema)
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidRequestError("the JSON schema is not valid JSON", param="response_format") from exc



@dataclass
class Budget:
    max_new: int
    """Tokens this sequence may generate (request's max_tokens, capped by the context)."""
    session: int
    """Prompt + generated tokens."""
    ctx_limited: bool
    """True when the context, not max_tokens, bounds the sequence."""


def plan_budget(engine: OrtGenaiEngine, request: GenerationRequest) -> Budget:
    prompt = request.prompt_tokens
    n_ctx = engine.n_ctx
    if not 0 < len(prompt) < n_ctx:  # validation keeps such requests out
        raise EngineError(f"a prompt of {len(prompt)} tokens does not fit this runner")
    room = n_ctx - len(prompt)
    max_new = max(1, request.max_tokens)
    # The KV buffer is sized from the session; sliding-window models (Gemma 3) refuse one smaller
    # than their window, whatever the request needs.
    session = max(len(prompt) + min(max_new, room), min(engine.min_session, n_ctx))
    return Budget(min(max_new, room), session, max_new > room)


def seed(sp: SamplingParams) -> int:
    return secrets.randbits(32) if sp.seed is None else sp.seed % (1 << 63)



def is_grammar_error(exc: Exception) -> bool:
    return "grammar" in str(exc).lower()  # onnxruntime-genai: "Error creating grammar: ..."


def start_error(exc: Exception, guided: bool) -> InvalidRequestError | EngineError:
    """The error a client sees when onnxruntime-genai refuses to start a request."""
    if guided and is_grammar_error(exc):
        return InvalidRequestError(f"unsupported JSON schema: {scrub(str(exc))}", param="response_format")
    log.warning("onnxruntime-genai could not start a request: %s", exc)
    return EngineError("the inference engine could not start this request")


def apply_sampling(turn: Any, sp: SamplingParams) -> None:
    if sp.temperature <= 0.0:
        turn.set_do_sample(False)
        turn.set_temperature(0.0)
    else:
        turn.set_do_sample(True)
        turn.set_temperature(float(sp.temperature))
        turn.set_top_p(min(max(float(sp.top_p), 1e-6), 1.0))
        turn.set_top_k(max(int(sp.top_k), 0))
        if sp.seed is not None:  # only dynamic engines take one; unseeded turns use the engine's RNG
            turn.setseed(seed(sp))
    if sp.repeat_penalty > 0 and sp.repeat_penalty != 1.0:
        turn.set_repetition_penalty(float(sp.repeat_penalty))


def finish_outputs(
    request_id: str, reason: Any, budget: Budget, eos: int
) -> list[TokenOutput | SequenceFailure]:
    """What a finished turn means for the scheduler.

    EOS ends the sequence. Reaching max_tokens is the scheduler's to report (it counts tokens and
    has already finished the request when this arrives: the extra end marker is then ignored).
    Running out of context fails the sequence, as the llama.cpp engine does.
    """
    name = getattr(reason, "name", str(reason))
    if name == "CANCELLED":
        return [SequenceFailure(request_id, EngineError("the inference engine cancelled this request"))]
    if name == "FAILED":
        return [SequenceFailure(request_id, EngineError("the inference engine failed this request"))]
    if name in ("MAX_SESSION_TOKENS", "MAX_GENERATED_TOKENS") and budget.ctx_limited:
        return [SequenceFailure(request_id, ContextLengthExceededError(
            f"the sequence reached the context length ({budget.session} tokens)"))]
    return [TokenOutput(request_id, eos, b"", end_of_generation=True)]

