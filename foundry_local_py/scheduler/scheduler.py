"""Admission queue and decode loop for one loaded model.

One worker thread per model owns the engine's :class:`BatchRunner`: it admits waiting requests
while the runner has room (continuous batching when ``max_batch > 1``), steps every active
sequence, turns token bytes into text (:mod:`.output`), and hands events to each request's asyncio
queue. Routes only see :class:`RequestHandle` and its events, so the batching policy can change
without touching them.

Prefix caching lives in the engine: ``runner.add`` says how many prompt tokens it found cached, which
the scheduler reports (``on_admit``, usage's ``cached_tokens``, :meth:`Scheduler.slots`).

Admission by KV capacity: with a runner that has a shared KV pool (:class:`AdmitsByKv`), the
request at the head of the queue starts only when its prompt fits the pool's room (first come,
first served: the ones behind it wait too); one larger than the whole pool fails at once (400;
validation keeps them out). What happens when running sequences outgrow the pool is the runner's
one overflow rule (engines/llamacpp/pool.py: preempt the youngest, recompute it later).

Back-pressure: a full waiting queue refuses with 429; a request waiting longer than
``queue_timeout_s`` fails with 503. A cancelled request (client gone) leaves the runner at the next
step, which frees its slot within one token's time (prefill is chunked by the engine).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from ..engines.base import (
    AdmitsByKv,
    BatchRunner,
    Engine,
    GenerationRequest,
    ReportsKvUsage,
    SequenceEnd,
    SequenceFailure,
)
from ..errors import (
    ContextLengthExceededError,
    EngineError,
    FoundryError,
    QueueTimeoutError,
    RateLimitError,
    ServiceUnavailableError,
)
from .output import Delta, LogprobEntry, OutputProcessor

log = logging.getLogger(__name__)


# --- events a request's consumer sees -------------------------------------------------------


@dataclass
class TextEvent:
    text: str
    n_tokens: int
    t: float
    """time.monotonic() when the last of these tokens was produced."""
    logprobs: list[LogprobEntry] = field(default_factory=list)


@dataclass
class FinishEvent:
    reason: Literal["stop", "length", "cancelled"]
    prompt_tokens: int
    completion_tokens: int
    t: float
    cached_tokens: int = 0
    """Prompt tokens served from the prefix cache."""
    stop_sequence: str | None = None
    """The stop string that ended the text, when one did."""


@dataclass
class ErrorEvent:
    error: FoundryError
    t: float


StreamEvent = TextEvent | FinishEvent | ErrorEvent


@dataclass(frozen=True)
class SchedulerStats:
    running: int
    waiting: int
    max_batch: int
    completed: int
    cancelled: int
    kv_usage: float = 0.0
    """KV cache held by running sequences / capacity, as of the last step (0 when the runner
    does not report it)."""
    kv_tokens: int = 0
    """The KV cache's capacity in tokens (the shared pool's cells; 0 when not reported)."""


@dataclass(frozen=True)
class SlotState:
    """A running request, as ``GET /v1/slots`` shows it."""

    slot: int
    request_id: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    running_s: float


@dataclass(frozen=True)
class SlotsSnapshot:
    max_batch: int
    running: list[SlotState]
    waiting: list[tuple[str, float]]
    """(request id, seconds waited so far), oldest first."""
    kv: dict[str, Any] = field(default_factory=dict)
    """The KV pool's state as of the last step (capacity, used and cached tokens, ...)."""


class RequestHandle:
    """The consumer side of one request. Iterate it (async) for events; ``cancel()`` when gone."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> None:
        self.request = request
        self.loop = loop
        self.queue: asyncio.Queue[StreamEvent] = asyncio.Queue()
        self.submitted_at = time.monotonic()
        self.started_at: float | None = None
        self._cancelled = threading.Event()
        self.done = False

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        self._cancelled.set()

    async def events(self) -> AsyncIterator[StreamEvent]:
        """Yield events until the request finishes or fails. Cancels the request if abandoned."""
        try:
            while True:
                event = await self.queue.get()
                yield event
                if isinstance(event, (FinishEvent, ErrorEvent)):
                    self.done = True
                    return
        finally:
            if not self.done:
                self.cancel()


class _Sequence:
    __slots__ = ("cached_tokens", "handle", "processor", "slot")

    def __init__(self, handle: RequestHandle, slot: int, cached_tokens: int) -> None:
        self.handle = handle
        self.slot = slot
        self.cached_tokens = cached_tokens
        req = handle.request
        self.processor = OutputProcessor(max_tokens=req.max_tokens, stop=req.stop)

    def finish_event(self, reason: Literal["stop", "length", "cancelled"], t: float) -> FinishEvent:
        return FinishEvent(reason, len(self.handle.request.prompt_tokens),
                           self.processor.completion_tokens, t, self.cached_tokens,
                           self.processor.stop_sequence)


class Scheduler:
    """Per-model admission and decode loop (one worker thread)."""

    def __init__(
        self,
        engine: Engine,
        *,
        name: str,
        max_queue: int = 64,
        queue_timeout_s: float = 120.0,
        on_admit: Callable[[int, int], None] | None = None,
    ) -> None:
        """``on_admit(prompt_tokens, cached_tokens)`` is called (worker thread) for every
        request that starts decoding."""
        self.engine = engine
        self.name = name
        self._on_admit = on_admit
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self._cond = threading.Condition()
        self._waiting: collections.deque[RequestHandle] = collections.deque()
        self._active: dict[str, _Sequence] = {}
        self._accepting = True
        self._stopping = False
        self._max_batch = engine.info.max_batch
        self._completed = 0
        self._cancelled = 0
        self._runner_ready = threading.Event()
        self._runner_error: BaseException | None = None
        self._abort: ServiceUnavailableError | None = None
        self._thread = threading.Thread(target=self._run, name=f"scheduler-{name}", daemon=True)
        self._last_activity = time.monotonic()
        self._kv_usage = 0.0
        self._kv_report: dict[str, Any] = {}

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        self._runner_ready.wait()
        if self._runner_error is not None:
            raise EngineError("the engine could not start a decoding runner") from self._runner_error

    def stop(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Stop admitting; with ``drain`` let queued and running requests finish, else end them
        with a 503 error (an aborted stream must say so, not look like a normal end)."""
        with self._cond:
            self._accepting = False
            if not drain:
                self._abort = ServiceUnavailableError(
                    f"model '{self.name}' was unloaded while this request was being served")
                waiting = list(self._waiting)
                self._waiting.clear()
                self._send_many([(h, ErrorEvent(self._abort, time.monotonic())) for h in waiting])
                for seq in self._active.values():
                    seq.handle.cancel()
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def stopped(self) -> bool:
        """The worker thread has ended (after :meth:`stop`): nothing calls the engine any more."""
        return not self._thread.is_alive()

    def truncate_running(self) -> int:
        """Shutdown past its drain timeout: every running sequence ends at its next token with
        finish_reason 'length' (a normal end, not an error). Returns how many were running."""
        with self._cond:
            for seq in self._active.values():
                seq.processor.max_tokens = min(seq.processor.max_tokens,
                                               seq.processor.completion_tokens + 1)
            return len(self._active)

    @property
    def idle_since(self) -> float | None:
        """monotonic time since which nothing ran or waited; None while busy."""
        with self._cond:
            if self._active or self._waiting:
                return None
            return self._last_activity

    def stats(self) -> SchedulerStats:
        with self._cond:
            return SchedulerStats(
                running=len(self._active),
                waiting=len(self._waiting),
                max_batch=self._max_batch,
                completed=self._completed,
                cancelled=self._cancelled,
                kv_usage=self._kv_usage,
                kv_tokens=int(self._kv_report.get("capacity_tokens") or 0),
            )

    def lora_names(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The LoRA adapters of running and of waiting requests (names, sorted, once each)."""
        with self._cond:
            running = {r.name for seq in self._active.values() for r in seq.handle.request.lora}
            waiting = {r.name for h in self._waiting for r in h.request.lora}
        return tuple(sorted(running)), tuple(sorted(waiting))

    def slots(self) -> SlotsSnapshot:
        now = time.monotonic()
        with self._cond:
            running = [
                SlotState(seq.slot, rid, len(seq.handle.request.prompt_tokens), seq.cached_tokens,
                          seq.processor.completion_tokens, now - (seq.handle.started_at or now))
                for rid, seq in self._active.items()
            ]
            waiting = [(h.request_id, now - h.submitted_at) for h in self._waiting]
            return SlotsSnapshot(self._max_batch, sorted(running, key=lambda s: s.slot), waiting,
                                 dict(self._kv_report))

    # --- admission (event-loop side) ------------------------------------------------------

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue a request. Raises 429 when the queue is full, 503 when stopping."""
        handle = RequestHandle(request, asyncio.get_running_loop())
        with self._cond:
            if not self._accepting:
                raise ServiceUnavailableError("the model is shutting down")
            free_slots = self._max_batch - len(self._active)
            if len(self._waiting) - max(free_slots, 0) >= self.max_queue:
                retry = max(1, int(self.queue_timeout_s / 10))
                raise RateLimitError(
                    f"too many requests waiting for model '{self.name}'; retry later", retry_after=retry
                )
            self._waiting.append(handle)
            self._cond.notify_all()
        return handle

    # --- worker thread --------------------------------------------------------------------

    def _run(self) -> None:
        try:
            runner = self.engine.create_runner()
            self._max_batch = runner.max_batch
        except BaseException as exc:
            log.exception("runner for %s failed to start", self.name)
            self._runner_error = exc
            self._runner_ready.set()
            return
        self._runner_ready.set()
        try:
            self._loop(runner)
        except BaseException:
            log.exception("scheduler loop for %s crashed", self.name)
            self._fail_all(EngineError("the inference engine failed"))
        finally:
            try:
                runner.close()
            except Exception:
                log.exception("closing the runner of %s failed", self.name)

    def _loop(self, runner: BatchRunner) -> None:
        kv_reader = runner if isinstance(runner, ReportsKvUsage) else None
        pool = runner if isinstance(runner, AdmitsByKv) else None
        while True:
            admitted: list[RequestHandle] = []
            too_big: list[RequestHandle] = []
            kv_usage = _kv_usage(kv_reader)
            kv_report = _kv_report(pool)
            with self._cond:
                self._kv_usage = kv_usage
                self._kv_report = kv_report
                self._expire_waiting()
                while not self._active and not self._waiting:
                    if self._stopping:
                        return
                    self._cond.wait(timeout=1.0)
                    self._expire_waiting()
                room = pool.kv_room() if pool is not None and self._waiting else 0
                while self._waiting and len(self._active) + len(admitted) < runner.max_batch:
                    handle = self._waiting[0]
                    if handle.cancelled:
                        self._waiting.popleft()
                        self._cancelled += 1
                        continue
                    if pool is not None:
                        need = pool.kv_need(handle.request.prompt_tokens, handle.request.lora)
                        if need > pool.kv_capacity():
                            too_big.append(self._waiting.popleft())
                            continue
                        if need > room:
                            break  # first come, first served: it waits for room, and so do the rest
                        room -= need
                    admitted.append(self._waiting.popleft())
                if not admitted and not self._active and self._waiting:
                    self._cond.wait(timeout=0.01)  # nothing to step: do not spin
                self._last_activity = time.monotonic()
            for handle in too_big:
                self._send(handle, ErrorEvent(ContextLengthExceededError(
                    f"the prompt ({len(handle.request.prompt_tokens)} tokens) is larger than the "
                    f"model's KV cache ({pool.kv_capacity() if pool else 0} tokens)"), time.monotonic()))
            for handle in admitted:
                self._admit(runner, handle)
            self._drop_cancelled(runner)
            if not self._active:
                continue
            outputs = runner.step()
            self._dispatch(runner, outputs)

    def _admit(self, runner: BatchRunner, handle: RequestHandle) -> None:
        try:
            cached = runner.add(handle.request) or 0
        except FoundryError as exc:
            self._send(handle, ErrorEvent(exc, time.monotonic()))
            return
        except Exception as exc:
            log.exception("runner.add failed for %s", handle.request_id)
            self._send(handle, ErrorEvent(EngineError("the inference engine failed"), time.monotonic()))
            del exc
            return
        handle.started_at = time.monotonic()
        with self._cond:
            used = {seq.slot for seq in self._active.values()}
            slot = next(i for i in range(len(used) + 1) if i not in used)
            self._active[handle.request_id] = _Sequence(handle, slot, cached)
        if self._on_admit is not None:
            try:
                self._on_admit(len(handle.request.prompt_tokens), cached)
            except Exception:
                log.exception("on_admit callback failed")

    def _drop_cancelled(self, runner: BatchRunner) -> None:
        gone = [rid for rid, seq in self._active.items() if seq.handle.cancelled]
        for rid in gone:
            runner.remove(rid)
            with self._cond:
                seq = self._active.pop(rid)
                self._cancelled += 1
            now = time.monotonic()
            self._send(seq.handle, ErrorEvent(self._abort, now) if self._abort
                       else seq.finish_event("cancelled", now))

    def _dispatch(self, runner: BatchRunner, outputs: object) -> None:
        now = time.monotonic()
        batch: list[tuple[RequestHandle, StreamEvent]] = []
        assert isinstance(outputs, (list, tuple))
        for out in outputs:
            seq = self._active.get(out.request_id)
            if seq is None:
                continue
            if isinstance(out, SequenceFailure):
                err = out.error if isinstance(out.error, FoundryError) else EngineError(
                    "the inference engine failed"
                )
                self._finish(runner, out.request_id)
                batch.append((seq.handle, ErrorEvent(err, now)))
                continue
            if isinstance(out, SequenceEnd):
                rest = seq.processor.end(out.reason)
                if rest is not None:
                    batch.append((seq.handle, TextEvent(rest.text, rest.n_tokens, now, rest.logprobs)))
                self._finish(runner, out.request_id)
                batch.append((seq.handle, seq.finish_event(out.reason, now)))
                continue
            delta: Delta | None = seq.processor.feed(out)
            if delta is not None:
                batch.append((seq.handle, TextEvent(delta.text, delta.n_tokens, now, delta.logprobs)))
            reason = seq.processor.finish_reason
            if reason is not None:
                self._finish(runner, out.request_id)
                batch.append((seq.handle, seq.finish_event(reason, now)))
        if batch:
            self._send_many(batch)

    def _finish(self, runner: BatchRunner, request_id: str) -> None:
        runner.remove(request_id)
        with self._cond:
            self._active.pop(request_id, None)
            self._completed += 1

    def _expire_waiting(self) -> None:
        """Called with the lock held: fail requests that waited too long, forget cancelled ones."""
        if not self._waiting:
            return
        now = time.monotonic()
        keep: collections.deque[RequestHandle] = collections.deque()
        for handle in self._waiting:
            if handle.cancelled:
                self._cancelled += 1
            elif now - handle.submitted_at > self.queue_timeout_s:
                self._send(handle, ErrorEvent(
                    QueueTimeoutError(f"timed out waiting for model '{self.name}'"), now))
            else:
                keep.append(handle)
        self._waiting = keep

    def _fail_all(self, error: FoundryError) -> None:
        with self._cond:
            self._accepting = False
            handles = [s.handle for s in self._active.values()] + list(self._waiting)
            self._active.clear()
            self._waiting.clear()
        now = time.monotonic()
        self._send_many([(h, ErrorEvent(error, now)) for h in handles])

    @staticmethod
    def _send(handle: RequestHandle, event: StreamEvent) -> None:
        Scheduler._send_many([(handle, event)])

    @staticmethod
    def _send_many(batch: list[tuple[RequestHandle, StreamEvent]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestHandle, StreamEvent]]] = {}
        for handle, event in batch:
            by_loop.setdefault(handle.loop, []).append((handle, event))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
                loop.call_soon_threadsafe(_deliver, items)


def _kv_usage(runner: ReportsKvUsage | None) -> float:
    if runner is None:
        return 0.0
    try:
        return min(1.0, max(0.0, float(runner.kv_usage())))
    except Exception:
        log.exception("reading the KV cache usage failed")
        return 0.0


def _kv_report(runner: AdmitsByKv | None) -> dict[str, Any]:
    if runner is None:
        return {}
    try:
        return dict(runner.kv_report())
    except Exception:
        log.exception("reading the KV pool's state failed")
        return {}


def _deliver(items: list[tuple[RequestHandle, StreamEvent]]) -> None:
    for handle, event in items:
        handle.queue.put_nowait(event)
