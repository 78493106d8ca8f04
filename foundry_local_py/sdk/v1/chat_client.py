"""``model.get_chat_client()``: OpenAI-shaped chat completions, computed in this process.

``complete_chat`` returns ``openai.types.chat.ChatCompletion``; ``complete_streaming_chat`` yields
``ChatCompletionChunk`` objects as tokens are decoded. Both run through the server's own layers
(:mod:`.inproc`), so threads chatting at once share the model's batch.
"""

from __future__ import annotations

import json
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

from ...errors import FoundryError
from .exception import FoundryLocalException

if TYPE_CHECKING:
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    from .manager import FoundryLocalManager


class ChatClientSettings:
    """Request settings, with Foundry Local's names (``random_seed``, ``top_k``; a
    ``response_format`` of type ``json_schema`` whose schema is a JSON string; a ``tool_choice``
    of ``{"type": "auto" | "none" | "required" | "function", "name": ...}``). OpenAI-shaped
    ``response_format`` and ``tool_choice`` values are accepted too."""

    def __init__(  # noqa: PLR0917 - Foundry Local's positional order
        self,
        frequency_penalty: float | None = None,
        max_tokens: int | None = None,
        n: int | None = None,
        temperature: float | None = None,
        presence_penalty: float | None = None,
        random_seed: int | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        response_format: dict[str, Any] | None = None,
        tool_choice: dict[str, Any] | str | None = None,
    ) -> None:
        self.frequency_penalty = frequency_penalty
        self.max_tokens = max_tokens
        self.n = n
        self.temperature = temperature
        self.presence_penalty = presence_penalty
        self.random_seed = random_seed
        self.top_k = top_k
        self.top_p = top_p
        self.response_format = response_format
        self.tool_choice = tool_choice

    def to_request(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: v for k, v in {
            "frequency_penalty": self.frequency_penalty, "max_tokens": self.max_tokens, "n": self.n,
            "temperature": self.temperature, "presence_penalty": self.presence_penalty,
            "seed": self.random_seed, "top_k": self.top_k, "top_p": self.top_p,
        }.items() if v is not None}
        if self.response_format is not None:
            out["response_format"] = _response_format(self.response_format)
        if self.tool_choice is not None:
            out["tool_choice"] = _tool_choice(self.tool_choice)
        return out


def _response_format(value: dict[str, Any]) -> dict[str, Any]:
    kind = value.get("type")
    schema = value.get("json_schema")
    if kind == "json_schema" and isinstance(schema, str):  # Foundry Local: the schema as a string
        try:
            parsed = json.loads(schema)
        except ValueError as exc:
            raise ValueError('ResponseFormat "json_schema" must be a valid JSON schema string.') from exc
        return {"type": "json_schema", "json_schema": {"name": "response", "schema": parsed}}
    if kind == "lark_grammar":
        raise ValueError("lark_grammar response formats are not supported here; use json_schema")
    return value


def _tool_choice(value: dict[str, Any] | str) -> Any:
    if isinstance(value, str):
        return value
    kind = value.get("type")
    if kind in ("auto", "none", "required") and "function" not in value:
        return kind
    if kind == "function" and isinstance(value.get("name"), str):  # Foundry Local's shape
        return {"type": "function", "function": {"name": value["name"]}}
    return value


class ChatClient:
    def __init__(self, model_id: str, manager: FoundryLocalManager) -> None:
        self.model_id = model_id
        self.settings = ChatClientSettings()
        self._manager = manager

    @staticmethod
    def _validate(messages: list[Any], tools: list[dict[str, Any]] | None) -> None:
        if not messages:
            raise ValueError("messages must be a non-empty list.")
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict):
                raise ValueError(f"messages[{i}] must be a dict, got {type(msg).__name__}.")
            if "role" not in msg:
                raise ValueError(f"messages[{i}] is missing required key 'role'.")
        if tools is not None and not isinstance(tools, list):
            raise ValueError("tools must be a list if provided.")

    def _request(self, messages: list[Any], tools: list[dict[str, Any]] | None, stream: bool) -> Any:
        from ...protocol.chat import ChatCompletionRequest
        from .inproc import wire_request

        self._validate(messages, tools)
        data: dict[str, Any] = {"model": self.model_id, "messages": messages, **self.settings.to_request()}
        if tools:
            data["tools"] = tools
        if stream:
            data["stream"] = True
        try:
            return wire_request(ChatCompletionRequest, data)
        except FoundryError as exc:
            raise FoundryLocalException(f"Error during chat completion: {exc.message}") from exc

    def complete_chat(self, messages: list[Any], tools: list[dict[str, Any]] | None = None
                      ) -> ChatCompletion:
        """One chat completion (``openai.types.chat.ChatCompletion``)."""
        from openai.types.chat import ChatCompletion

        from ...server.adapters.chat import ChatFrontEnd
        from .inproc import run

        req = self._request(messages, tools, stream=False)
        m = self._manager
        body = m._runtime.call(run(m._core, ChatFrontEnd, req))
        assert isinstance(body, dict)
        return ChatCompletion.model_validate(body)

    def complete_streaming_chat(self, messages: list[Any], tools: list[dict[str, Any]] | None = None
                                ) -> Generator[ChatCompletionChunk, None, None]:
        """Chunks as tokens are decoded (``openai.types.chat.ChatCompletionChunk``). Leaving
        the loop early cancels the generation."""
        req = self._request(messages, tools, stream=True)  # errors in the messages raise here
        return self._chunks(req)

    def _chunks(self, req: Any) -> Generator[ChatCompletionChunk, None, None]:
        from openai.types.chat import ChatCompletionChunk

        from ...server.adapters.chat import ChatFrontEnd
        from .inproc import run, sse_payloads

        m = self._manager
        stream = m._runtime.call(run(m._core, ChatFrontEnd, req))
        assert not isinstance(stream, dict)
        try:
            for frame in m._runtime.iterate(stream):
                for payload in sse_payloads(frame):
                    yield ChatCompletionChunk.model_validate(payload)
        except FoundryError as exc:
            raise FoundryLocalException(f"Error during streaming chat completion: {exc.message}") from exc
