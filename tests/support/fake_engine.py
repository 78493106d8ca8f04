"""A fake engine implementing engines.base.Engine / BatchRunner, for fast unit tests of the
scheduler and the HTTP layer. Never the only proof: tests/api and tests/reliability run the real model.

Tokens are bytes (id = byte value, n_vocab 256). Every sequence emits ``script.pieces`` in order
(one piece per step), then end-of-generation. ``script.fail_at`` makes step N of a sequence a
SequenceFailure; ``script.add_error`` makes ``add`` raise; ``script.step_delay`` slows steps down.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from foundry_local_py.engines.backends import Capabilities
from foundry_local_py.engines.base import (
    ChatTemplateSpec,
    Constraint,
    EngineInfo,
    GenerationRequest,
    SequenceFailure,
    TokenOutput,
)
from foundry_local_py.errors import EngineError, InvalidRequestError

TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>"


@dataclass
class Script:
    pieces: list[bytes] = field(default_factory=lambda: [b"Hello", b",", b" world", b"!"])
    fail_at: int | None = None
    add_error: Exception | None = None
    step_error: Exception | None = None
    step_delay: float = 0.0
    loop_forever: bool = False
    """Cycle through ``pieces`` instead of ending (for long-running sequences)."""


@dataclass
class RunnerStats:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    peak_active: int = 0
    steps: int = 0


class FakeRunner:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.max_batch = engine.info.max_batch
        self._seqs: dict[str, int] = {}  # request id -> next piece index
        self.thread = threading.current_thread()

    def add(self, request: GenerationRequest) -> int:
        assert threading.current_thread() is self.thread, "runner used from two threads"
        if self.engine.script.add_error is not None:
            raise self.engine.script.add_error
        assert len(self._seqs) < self.max_batch, "more sequences than max_batch"
        self._seqs[request.request_id] = 0
        self.engine.stats.added.append(request.request_id)
        self.engine.stats.peak_active = max(self.engine.stats.peak_active, len(self._seqs))
        return 0

    def remove(self, request_id: str) -> None:
        if self._seqs.pop(request_id, None) is not None:
            self.engine.stats.removed.append(request_id)

    def step(self) -> Sequence[TokenOutput | SequenceFailure]:
        script = self.engine.script
        self.engine.stats.steps += 1
        if script.step_delay:
            time.sleep(script.step_delay)
        if script.step_error is not None:
            raise script.step_error
        out: list[TokenOutput | SequenceFailure] = []
        for rid, i in list(self._seqs.items()):
            self._seqs[rid] = i + 1
            if script.fail_at is not None and i == script.fail_at:
                out.append(SequenceFailure(rid, EngineError("the fake engine failed")))
            elif i < len(script.pieces) or script.loop_forever:
                piece = script.pieces[i % len(script.pieces)]
                out.append(TokenOutput(rid, piece[0] if piece else 0, piece))
            else:
                out.append(TokenOutput(rid, 0, b"", end_of_generation=True))
        return out

    def close(self) -> None:
        self.engine.closed_runners += 1


FAKE_CAPABILITIES = Capabilities(sampling=frozenset({"temperature", "top_p", "seed"}))
"""The fake engine honours few sampling fields: the HTTP layer must refuse the others."""


class FakeEngine:
    def __init__(
        self, script: Script | None = None, *, max_batch: int = 2, n_ctx: int = 256, chat: bool = True
    ) -> None:
        self.script = script or Script()
        self.stats = RunnerStats()
        self.closed = False
        self.closed_runners = 0
        self._chat = chat
        self.info = EngineInfo(
            engine="fake",
            model_path=Path("fake.gguf"),
            device="cpu",
            execution_provider="cpu",
            n_ctx=n_ctx,
            n_ctx_train=n_ctx,
            n_vocab=256,
            max_batch=max_batch,
            capabilities=FAKE_CAPABILITIES,
            has_chat_template=chat,
        )

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, tokens: Sequence[int]) -> bytes:
        return bytes(tokens)

    def chat_template(self) -> ChatTemplateSpec | None:
        return ChatTemplateSpec(TEMPLATE) if self._chat else None

    def validate_constraint(self, constraint: Constraint) -> None:
        raise InvalidRequestError("the fake engine has no grammar support", param="response_format")

    def create_runner(self) -> FakeRunner:
        return FakeRunner(self)

    def close(self) -> None:
        self.closed = True
