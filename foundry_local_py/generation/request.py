"""What a front-end asks for, before validation: one shape for every API.

A front-end (chat completions, completions, Responses, Anthropic Messages, the in-process SDK)
turns its wire request into a :class:`GenerationAsk`: the model, a prompt (a chat or raw text),
the sampling fields the client set (``None`` = not set), limits and output constraints, and the
names its API gives those fields (so a 400 names the field the client sent: ``max_output_tokens``
on the Responses API, ``max_tokens`` on chat completions). :func:`..validate.validate` turns an ask
into a :class:`~.validate.ValidRequest` against the loaded model, before anything queues.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, Protocol

from ..engines.base import Constraint, Engine
from ..engines.chat_format import ChatFormatter, ToolSpec
from ..scheduler.scheduler import Scheduler

if TYPE_CHECKING:
    from ..cache.adapters import AdapterRecord

ToolChoiceMode = Literal["auto", "none", "required"]


@dataclass(frozen=True)
class ChatPrompt:
    """A conversation, rendered by the model's chat template."""

    messages: list[dict[str, Any]]
    """OpenAI-style dicts: role, content (str or None), and optionally name, tool_calls
    (``[{"id", "type": "function", "function": {"name", "arguments"}}]``), tool_call_id."""
    tools: list[ToolSpec] = field(default_factory=list)
    tool_choice: ToolChoiceMode | str | None = None
    """auto / none / required, a tool's name (that tool is forced), or None (auto with tools)."""


@dataclass(frozen=True)
class TextPrompt:
    """A raw prompt: text (tokenized with the model's BOS) or token ids as given."""

    text: str | list[int]


Prompt = ChatPrompt | TextPrompt


@dataclass(frozen=True)
class SamplingAsk:
    """Sampling fields as the client set them; None = not set (the engine's default applies)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repeat_penalty: float | None = None
    logit_bias: Mapping[str, float] | None = None


NEUTRAL: Mapping[str, object] = MappingProxyType({
    "top_p": 1.0, "top_k": 0, "min_p": 0.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
    "repeat_penalty": 1.0,
})
"""Values that ask an engine for nothing: accepted even by engines that lack the field."""


@dataclass(frozen=True)
class LoraAsk:
    """A LoRA adapter a request names in its ``lora`` list: an index (as listed) or a name."""

    id: int | str
    scale: float = 1.0


@dataclass(frozen=True)
class GenerationAsk:
    model: str
    prompt: Prompt
    max_tokens: int | None = None
    """Completion budget; None: up to the context."""
    cap_to_context: bool = False
    """When prompt + max_tokens exceeds the context: False refuses it (a 400, OpenAI's rule);
    True generates up to the context instead (Anthropic's rule for its newer models, which then
    stop with ``model_context_window_exceeded``)."""
    sampling: SamplingAsk = field(default_factory=SamplingAsk)
    logprobs: int | None = None
    """None: no logprobs; 0: the chosen token's; k: plus the k most likely."""
    stop: list[str] = field(default_factory=list)
    response_format: Constraint | None = None
    n: int = 1
    ep: str | None = None
    ttl: int | None = None
    lora: tuple[LoraAsk, ...] = ()
    """Adapters from the request's ``lora`` list (besides one named in ``model``)."""
    params: Mapping[str, str] = field(default_factory=dict)
    """Wire names for error messages, keyed by the canonical ones used here: 'prompt' (default
    'messages' for chats, 'prompt' for text), 'max_tokens', 'response_format', 'stop',
    'logprobs', 'tool_choice', and the sampling field names."""

    def param(self, name: str) -> str:
        if name in self.params:
            return self.params[name]
        if name == "prompt":
            return "messages" if isinstance(self.prompt, ChatPrompt) else "prompt"
        return name


class ServedModel(Protocol):
    """What validation needs of a loaded model (the model manager's LoadedModel is one)."""

    @property
    def alias(self) -> str: ...

    @property
    def engine(self) -> Engine: ...

    @property
    def formatter(self) -> ChatFormatter | None: ...

    @property
    def scheduler(self) -> Scheduler: ...

    @property
    def adapter(self) -> AdapterRecord | None:
        """The LoRA adapter the request's model name chose (``ALIAS:ADAPTER``), or None."""

    def adapters(self) -> Sequence[AdapterRecord]:
        """The adapters a request's ``lora`` list may name for this model, in listing order."""

    def touch(self) -> None:
        """Mark the model used now (idle TTL and LRU eviction count from here)."""
