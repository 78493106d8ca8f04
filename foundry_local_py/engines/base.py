"""The engine protocol: what every inference backend provides to the scheduler.

An :class:`Engine` is a loaded model. It tokenizes, renders chats, and hands out a
:class:`BatchRunner` that lives on one worker thread (the scheduler's) and advances every active
sequence by one token per :meth:`BatchRunner.step`. A runner with ``max_batch == 1`` serves one
request at a time; a runner with a larger ``max_batch`` does continuous batching. The scheduler,
routes and metrics do not care which.

Text handling that is the same for every engine (incremental UTF-8 decoding, stop strings,
``max_tokens``) lives in the scheduler, not here: engines emit raw token bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from .backends import Capabilities

ConstraintKind = Literal["json_object", "json_schema"]


@dataclass(frozen=True)
class Constraint:
    """Structured-output constraint, engine-neutral. Engines compile it (GBNF, guidance, ...)."""

    kind: ConstraintKind
    schema: dict[str, Any] | None = None


@dataclass
class SamplingParams:
    """Sampling settings. Defaults follow llama.cpp / Ollama, not OpenAI's temperature=1."""

    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    top_logprobs: int | None = None
    """None: no logprobs. 0: the chosen token's logprob only. k: plus the k most likely."""
    constraint: Constraint | None = None


@dataclass(frozen=True)
class LoraRef:
    """One LoRA adapter a sequence runs with: a validated GGUF LoRA file and its scale."""

    name: str
    path: Path
    sha256: str
    """Identity of the file's content: KV computed under an adapter set is keyed by it."""
    scale: float = 1.0


LoraSet = tuple[LoraRef, ...]
"""A sequence's adapters, sorted by (sha256, scale); empty for the base model."""


def lora_key(lora: LoraSet) -> tuple[tuple[str, float], ...]:
    """What decides whether KV computed under one adapter set may serve another: equal keys only."""
    return tuple((r.sha256, r.scale) for r in lora)


@dataclass
class GenerationRequest:
    request_id: str
    prompt_tokens: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    lora: LoraSet = ()
    """LoRA adapters applied to this sequence (engines whose capabilities include lora_adapters)."""


@dataclass(frozen=True)
class TopCandidate:
    token_id: int
    piece: bytes
    logprob: float


@dataclass(frozen=True)
class TokenLogprobs:
    logprob: float
    top: tuple[TopCandidate, ...] = ()


@dataclass
class TokenOutput:
    """One step's result for one sequence."""

    request_id: str
    token_id: int
    piece: bytes
    """The token's bytes (may be a partial UTF-8 character). Empty for end-of-generation."""
    end_of_generation: bool = False
    logprobs: TokenLogprobs | None = None


@dataclass
class SequenceFailure:
    """A sequence the runner had to drop (e.g. its KV cache slot ran out)."""

    request_id: str
    error: Exception


@dataclass
class SequenceEnd:
    """A sequence the runner ended normally before the model did: ``length`` when the KV pool
    has no cell left for it and nothing else can make room (the pool's overflow rule)."""

    request_id: str
    reason: Literal["length"] = "length"


@dataclass(frozen=True)
class EngineInfo:
    engine: str
    """'llama.cpp' or 'onnxruntime-genai'."""
    model_path: Path
    device: str
    """'cpu', 'gpu', 'npu'."""
    execution_provider: str
    """'CPUExecutionProvider', 'CUDAExecutionProvider', ... or 'cpu' / 'cuda' for llama.cpp."""
    n_ctx: int
    """Longest sequence (prompt + completion) one request may use."""
    n_ctx_train: int
    n_vocab: int
    max_batch: int
    capabilities: Capabilities
    """What this loaded model honours (its backend's record, narrowed by the model itself)."""
    has_chat_template: bool
    n_threads: int | None = None
    n_embd: int | None = None


@runtime_checkable
class BatchRunner(Protocol):
    """Decoding state of one engine. Every call comes from the scheduler's single worker thread."""

    max_batch: int

    def add(self, request: GenerationRequest) -> int:
        """Start a sequence; returns how many of its prompt tokens were already in the engine's
        cache (prefix caching; 0 without). May raise :class:`~foundry_local_py.errors.FoundryError`."""

    def remove(self, request_id: str) -> None:
        """Drop a sequence (finished, cancelled or stopped by a stop string) and free its slot."""

    def step(self) -> Sequence[TokenOutput | SequenceFailure | SequenceEnd]:
        """Advance every active sequence by at most one token (prefill included)."""

    def close(self) -> None:
        """Free the runner's resources."""


@runtime_checkable
class ReportsKvUsage(Protocol):
    """A runner that can say how full its KV cache is (optional; read by the scheduler)."""

    def kv_usage(self) -> float:
        """KV cache held by running sequences / the runner's capacity (0 to 1). Cheap: the
        scheduler reads it once per step, on its worker thread."""


@runtime_checkable
class ServesLora(Protocol):
    """An engine that holds LoRA adapters (loaded on a sequence's first use, freed by these)."""

    def loaded_loras(self) -> list[str]:
        """Names of the adapters held in memory now."""

    def preload_lora(self, ref: LoraRef) -> None:
        """Load ``ref`` now (not on its first request); 400 when the engine cannot."""

    def unload_lora(self, name: str) -> int:
        """Free the adapters called ``name`` not in use (those in use go when their requests
        end); returns how many were held."""

    def expire_loras(self, idle_s: float) -> int:
        """Free adapters unused for ``idle_s`` seconds; returns how many were freed."""


@runtime_checkable
class AdmitsByKv(Protocol):
    """A runner with a shared KV pool (optional): the scheduler admits a request only when its
    prompt fits (:meth:`kv_need` <= :meth:`kv_room`); one larger than :meth:`kv_capacity` can
    never run."""

    def kv_capacity(self) -> int:
        """Cells in the whole pool."""

    def kv_need(self, prompt_tokens: Sequence[int], lora: LoraSet = ()) -> int:
        """Cells the prompt would take now (its tokens less a prefix the pool holds under the
        same adapter set)."""

    def kv_room(self) -> int:
        """Cells new requests may take now (0 while a preempted sequence waits to resume)."""

    def kv_report(self) -> dict[str, Any]:
        """Pool state for /v1/slots: capacity, cells used by running / idle sequences, ..."""


@dataclass(frozen=True)
class ChatTemplateSpec:
    """The chat template a model file carries, with the special tokens it refers to."""

    source: str
    bos_token: str = ""
    eos_token: str = ""


@runtime_checkable
class Engine(Protocol):
    """A loaded model."""

    info: EngineInfo

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        """Token ids for ``text``; ``add_special`` adds BOS where the model wants it."""

    def detokenize(self, tokens: Sequence[int]) -> bytes: ...

    def chat_template(self) -> ChatTemplateSpec | None:
        """The model's own chat template (untrusted input: render it sandboxed)."""

    def validate_constraint(self, constraint: Constraint) -> None:
        """Raise InvalidRequestError when the engine cannot compile the constraint."""

    def create_runner(self) -> BatchRunner:
        """Called once, on the thread that will make every later call to the runner."""

    def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        """L2-normalised, mean-pooled embeddings (engines whose capabilities include embeddings).
        Inputs were checked against the context by the caller."""

    def close(self) -> None: ...
