"""Continuous batching over ``og.Engine`` lanes.

``og.Engine`` takes requests and turns and runs them with ``engine.run(event_buffer)``. On CPU,
and for every model built without paged attention, it batches *statically*: a batch is formed from
the requests waiting when it starts, a request added while it runs waits until the whole batch is
done, and a cancelled request's row is not reused before then. A serving loop cannot accept that
head-of-line blocking, so :class:`EngineRunner` keeps several engines ("lanes") on one model: the
requests the scheduler admits between two steps start together in one lane (batched), a request
admitted later starts in another (idle or new) lane, and every step runs each busy lane once. A
lane that is not full starts 20 ms after its first request (:data:`GATHER_S`), so requests
arriving a moment apart share it: without that, the first of 8 requests sent together started a
lane alone and c=8 decoded in 3 lanes (42 ms a step) instead of 2 (29 ms), and c=4 aggregate was
30-45% lower (measured on SmolLM2 int4 and int8). A lane takes at most as many requests as the
static scheduler starts in one batch (4 in onnxruntime-genai 0.18, whatever ``max_batch_size``
says; measured once per model by
:meth:`~.engine.OrtGenaiEngine.static_batch_size`): a fifth would wait in the engine for the whole
batch. Removing a request cancels and closes it in its lane at once: it produces no further token
and its place in the runner's ``max_batch`` goes to the next request immediately. Engines are cheap
(they share the model's sessions); their KV buffers are sized per request by
``RequestOptions.set_max_session_tokens``.

Some requests go to a :class:`~.generators.GeneratorRunner` inside this runner (same protocol,
same ``max_batch``): seeded sampling requests (the static engine refuses per-request seeds), and
greedy requests that come one at a time, for prefix reuse (og.Engine requests keep no KV between
requests): when nothing else runs and no two sequences ran together in the last 30 s. Under
concurrency lanes batch: a generator beside a lane costs a model run of its own every step (20% of
c=4 throughput, measured).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import onnxruntime_genai as og

from ...errors import EngineError
from ..base import GenerationRequest, SequenceFailure, TokenOutput
from .common import (
    Budget,
    apply_sampling,
    constraint_to_guidance,
    finish_outputs,
    plan_budget,
    scrub,
    start_error,
)
from .generators import GeneratorRunner

if TYPE_CHECKING:
    from .engine import OrtGenaiEngine

log = logging.getLogger(__name__)

GATHER_S = 0.02
"""A lane that is not full starts this long after its first request, so requests arriving
together share it: a static lane takes no one once started, and every lane costs a model run of
its own each step."""

QUIET_S = 30.0
"""Requests go to reusable generators only after this long without two sequences running
together: one user, or an agent loop, at a time. A burst after a shorter pause is taken as the
traffic it is (a generator beside a lane costs a model run of its own every step)."""

_FLAG_TOKEN = int(og.EngineEventFlags.TOKEN.value)
_FLAG_FINISHED = int(og.EngineEventFlags.TURN_FINISHED.value)
_FLAG_FAILED = int(og.EngineEventFlags.FAILED.value)


def _probe_prompt(owner: OrtGenaiEngine, text: str) -> np.ndarray:
    """A probe's prompt: ``text``'s tokens (the EOS token for a tokenizer that gives none)."""
    return np.asarray(owner.tokenize(text, add_special=False) or [max(owner.eos_token, 0)], dtype=np.int32)


def _probe_length(owner: OrtGenaiEngine, tokens: int) -> int:
    """A probe sequence's KV buffer: ``tokens``, but at least the model's sliding window (Gemma 3
    refuses a smaller one) and at most its context."""
    return min(owner.n_ctx, max(tokens, owner.min_session))


def _static_turns(owner: OrtGenaiEngine, prompts: list[np.ndarray], max_new: int,
                  runs: int) -> list[tuple[list[int], int]]:
    """Greedy turns of ``prompts`` added together to a fresh og.Engine, run at most ``runs`` times:
    each request's (tokens, the OR of its events' flags)."""
    engine = og.Engine(owner.model)
    buffer = engine.create_event_buffer(4 * len(prompts) + 16)
    requests: list[Any] = []
    seen: dict[int, tuple[list[int], int]] = {}
    try:
        for prompt in prompts:
            options = og.RequestOptions()
            options.set_max_session_tokens(_probe_length(owner, len(prompt) + max_new + 1))
            request = engine.create_request(options=options)
            requests.append(request)
            seen[id(request)] = ([], 0)
            turn = og.TurnOptions(request)
            turn.set_max_generated_tokens(max_new)
            turn.set_do_sample(False)
            request.begin_turn(prompt, turn)
        for _ in range(runs):
            if not engine.has_pending_requests():
                break
            events = engine.run(buffer)
            for i in range(len(events)):
                tokens, flags = seen[id(events[i].request)]
                event_flags = int(events[i].flags.value)
                if event_flags & _FLAG_TOKEN and events[i].token is not None:
                    tokens.append(int(events[i].token))
                seen[id(events[i].request)] = (tokens, flags | event_flags)
        return [seen[id(r)] for r in requests]
    finally:
        for request in requests:
            with contextlib.suppress(Exception):
                request.close()


def probe_static_batch(owner: OrtGenaiEngine, wanted: int) -> int:
    """Requests a fresh static og.Engine starts in its first batch when ``wanted`` wait (<= wanted)."""
    if wanted <= 1:
        return 1
    try:
        turns = _static_turns(owner, [_probe_prompt(owner, "Hi")] * wanted, max_new=1, runs=1)
    except Exception as exc:  # the probe is an optimisation: without it, lanes of max_batch
        log.info("could not measure og.Engine's static batch size (%s)", exc)
        return wanted
    started = sum(1 for _, flags in turns if flags & (_FLAG_TOKEN | _FLAG_FINISHED))
    return max(1, min(wanted, started))


def probe_batch_invariance(owner: OrtGenaiEngine) -> bool:
    """Whether a decode step computes a row the same, bit for bit, alone and batched: one greedy
    step of a short prompt in a batch of 1 and, the same prompt twice, in a batch of 2 (one
    og.Generator each; the prompt's prefill and one decode step, ~0.2 s for a 135M model on 2
    cores). A probe that cannot run counts as not invariant: outputs must not depend on
    neighbours unless that is shown not to happen."""
    prompt = _probe_prompt(owner, "The quick brown fox jumps over the lazy dog.")
    try:
        rows = []
        for batch in (1, 2):
            params = og.GeneratorParams(owner.model)
            params.set_search_options(max_length=_probe_length(owner, len(prompt) + 2), batch_size=batch,
                                      do_sample=False)
            generator = og.Generator(owner.model, params)
            generator.append_tokens(np.tile(prompt, (batch, 1)))
            generator.generate_next_token()
            rows.append(np.array(generator.get_logits())[0])
            del generator
    except Exception as exc:
        log.info("could not compare batched and lone rows (%s): decoding one sequence at a time", exc)
        return False
    return bool(np.array_equal(rows[0], rows[1]))


def probe_mixed_lengths(owner: OrtGenaiEngine) -> Literal["same", "differs", "fails"]:
    """Whether a static og.Engine batch of two prompts of different lengths runs, and gives each
    row the first tokens it gets alone. onnxruntime-genai right-pads such a batch; for Gemma 3
    (sliding-window attention) the runtime fails it ("seqlens_k ... is too small for
    sequence_length"), which no setting should turn into failed requests."""
    prompts = [_probe_prompt(owner, t)
               for t in ("Hi.", "The quick brown fox jumps over the lazy dog, and then it runs away.")]

    def first_tokens(batch: list[np.ndarray]) -> list[list[int]]:
        turns = _static_turns(owner, batch, max_new=2, runs=8)
        if any(flags & _FLAG_FAILED for _, flags in turns):
            raise EngineError("the runtime failed the batch")
        return [tokens for tokens, _ in turns]

    try:
        alone = [first_tokens([p])[0] for p in prompts]
    except Exception as exc:  # not the batch's fault: let the other probe decide
        log.info("could not run the prompts of the mixed-length probe alone (%s)", exc)
        return "same"
    try:
        together = first_tokens(prompts)
    except Exception as exc:
        log.info("a static batch of prompts of different lengths failed (%s)", scrub(str(exc)))
        return "fails"
    return "same" if together == alone else "differs"


@dataclass(eq=False)
class _Seq:
    request_id: str
    request: Any
    """og.Request"""
    turn_id: int
    stream: Any
    """og.TokenizerStream"""
    lane: _Lane
    budget: Budget
    finished: bool = False


@dataclass(eq=False)
class _Lane:
    engine: Any
    """og.Engine: one static batch at a time."""
    buffer: Any
    members: dict[int, _Seq] = field(default_factory=dict)
    """By id() of the og.Request."""
    started: bool = False
    """Its batch has run: requests added now would wait for the whole batch to finish."""
    opened_at: float = 0.0
    """When its first request came (monotonic seconds)."""

    def idle(self) -> bool:
        return not self.members and not self.engine.has_pending_requests()


class EngineRunner:
    """Continuous batching over og.Engine lanes (see the module docstring)."""

    def __init__(self, owner: OrtGenaiEngine) -> None:
        self.owner = owner
        self.max_batch = owner.options.max_batch
        self._continuous = owner.dynamic_batching
        """Paged-attention models: one engine admits new requests into its running batch."""
        self._lanes: list[_Lane] = [self._new_lane()]  # fails here, on this thread, if unsupported
        if not owner.info.capabilities.batching:
            self.lane_size = 1  # batched rows would differ from rows alone (Capabilities.batching)
        else:
            self.lane_size = self.max_batch if self._continuous else owner.static_batch_size()
        """Most requests one lane takes: more would wait in the engine for the whole batch."""
        self._by_request: dict[str, _Seq] = {}
        self._solo = GeneratorRunner(owner)
        """Requests the static engine cannot take (per-request seeds), and prefix reuse."""
        self._crowded_at = -QUIET_S
        """When two or more sequences last ran together (monotonic seconds)."""

    def _new_lane(self) -> _Lane:
        engine = og.Engine(self.owner.model)
        return _Lane(engine, engine.create_event_buffer(4 * self.max_batch + 16))

    def _open_lane(self) -> _Lane:
        for lane in self._lanes:
            if (self._continuous or not lane.started) and len(lane.members) < self.lane_size:
                return lane
        for lane in self._lanes:
            if lane.idle():
                lane.started = False
                return lane
        lane = self._new_lane()
        self._lanes.append(lane)
        return lane

    # --- protocol -----------------------------------------------------------------------

    def kv_usage(self) -> float:
        """An estimate: onnxruntime-genai does not report its KV use. Each running request's KV
        buffer is sized for its whole session (prompt + the tokens it may generate) when it
        starts, so the reserved tokens over n_ctx x slots is what this returns (an upper bound on
        the cells written so far)."""
        reserved = sum(seq.budget.session for seq in self._by_request.values()) + self._solo.reserved()
        return reserved / (self.owner.n_ctx * self.max_batch)

    def add(self, request: GenerationRequest) -> int:
        if request.request_id in self._by_request or self._solo.has(request.request_id):
            raise EngineError("duplicate request id")
        sp = request.sampling
        if not self._continuous and sp.temperature > 0.0 and sp.seed is not None:
            # "A per-turn seed requires an Engine configured for dynamic batching"
            return self._solo.add(request)
        now = time.monotonic()
        if self._by_request or self._solo.active():
            self._crowded_at = now
        elif self._solo.reuses(request) and now - self._crowded_at >= QUIET_S:
            # One request at a time: a generator decodes as fast as a lane, and can reuse a kept
            # prefix (and leave its own for the next request). Under concurrency, lanes batch
            # requests: a generator beside a lane would cost a model run of its own every step.
            return self._solo.add(request)
        budget = plan_budget(self.owner, request)
        guidance = constraint_to_guidance(sp.constraint) if sp.constraint is not None else None
        lane = self._open_lane()
        if not lane.members:
            lane.opened_at = now
        og_request = None
        try:
            options = og.RequestOptions()
            options.set_max_session_tokens(budget.session)
            og_request = lane.engine.create_request(options=options)
            turn = og.TurnOptions(og_request)
            turn.set_max_generated_tokens(budget.max_new)
            apply_sampling(turn, sp)
            if guidance is not None:
                turn.set_guidance(*guidance)
            turn_id = og_request.begin_turn(np.asarray(request.prompt_tokens, dtype=np.int32), turn)
        except Exception as exc:
            if og_request is not None:
                og_request.close()
            raise start_error(exc, guidance is not None) from exc
        seq = _Seq(request.request_id, og_request, int(turn_id), self.owner.create_stream(), lane, budget)
        lane.members[id(og_request)] = seq
        self._by_request[request.request_id] = seq
        return 0  # og.Engine keeps no KV between requests

    def remove(self, request_id: str) -> None:
        seq = self._by_request.pop(request_id, None)
        if seq is None:
            self._solo.remove(request_id)
            return
        seq.lane.members.pop(id(seq.request), None)
        try:
            if not seq.finished:
                seq.request.cancel_turn(seq.turn_id)
            seq.request.close()  # leaves the engine now: no more events, its row is released
        except Exception:
            log.exception("closing an onnxruntime-genai request failed")

    def step(self) -> list[TokenOutput | SequenceFailure]:
        outputs: list[TokenOutput | SequenceFailure] = []
        now = time.monotonic()
        gathering: float | None = None
        ran = False
        for lane in self._lanes:
            if not lane.members and not lane.engine.has_pending_requests():
                continue
            if (not lane.started and not self._continuous and len(lane.members) < self.lane_size
                    and now - lane.opened_at < GATHER_S):
                wait = lane.opened_at + GATHER_S - now
                gathering = wait if gathering is None else min(gathering, wait)
                continue
            lane.started = ran = True
            try:
                events = lane.engine.run(lane.buffer)
            except Exception as exc:
                log.error("og.Engine.run failed: %s", exc)
                for seq in list(lane.members.values()):
                    if not seq.finished:
                        seq.finished = True
                        outputs.append(SequenceFailure(seq.request_id, EngineError(
                            "the inference engine could not decode this batch")))
                continue
            for i in range(len(events)):
                self._translate(lane, events[i], outputs)
        self._prune()
        if self._solo.active():
            outputs.extend(self._solo.step())
        elif gathering is not None and not ran:
            time.sleep(min(gathering, 0.002))  # nothing else to run: the scheduler admits arrivals
        return outputs

    def close(self) -> None:
        for request_id in list(self._by_request):
            self.remove(request_id)
        self._solo.close()
        self._lanes.clear()

    # --- helpers ------------------------------------------------------------------------

    def _translate(self, lane: _Lane, event: Any, out: list[TokenOutput | SequenceFailure]) -> None:
        seq = lane.members.get(id(event.request))
        if seq is None or seq.request is not event.request or seq.finished:
            return
        flags = int(event.flags.value)
        rid = seq.request_id
        if flags & _FLAG_FAILED:
            seq.finished = True
            code = getattr(event.error_code, "name", "unknown").lower()
            error = EngineError(f"the inference engine failed this request ({code})")
            out.append(SequenceFailure(rid, error))
            return
        if flags & _FLAG_TOKEN and event.token is not None:
            token = int(event.token)
            if self.owner.is_eos(token):
                seq.finished = True
                out.append(TokenOutput(rid, token, b"", end_of_generation=True))
                return
            out.append(TokenOutput(rid, token, str(seq.stream.decode(token)).encode("utf-8")))
        if flags & _FLAG_FINISHED:
            seq.finished = True
            out.extend(finish_outputs(seq.request_id, event.finish_reason, seq.budget, self.owner.eos_token))

    def _prune(self) -> None:
        """Keep one idle lane for the next batch; drop the other idle ones (their buffers)."""
        idle = [lane for lane in self._lanes if lane.idle()]
        for lane in idle[1:]:
            self._lanes.remove(lane)

