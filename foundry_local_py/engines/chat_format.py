"""Chat prompts and tool calls: how a chat becomes a prompt and how a reply becomes tool calls.

Model quirks live here, not in the routes. A model whose template knows about tools gets them
through the template (Hugging Face convention: ``tools`` and ``tool_calls`` variables). A model
whose template does not (SmolLM2's, for one) gets a system-prompt section describing the tools and
asking for ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``; past tool calls are written
back the same way. When a tool call is forced (``tool_choice`` required or named) the output is
constrained by a JSON schema, so even a tiny model produces a well-formed call.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

from .base import ChatTemplateSpec, Constraint
from .chat_template import ChatTemplate

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
_TOOL_CALL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str | None
    parameters: dict[str, Any]

    def openai_dict(self) -> dict[str, Any]:
        fn: dict[str, Any] = {"name": self.name, "parameters": self.parameters}
        if self.description:
            fn["description"] = self.description
        return {"type": "function", "function": fn}


@dataclass(frozen=True)
class ParsedToolCall:
    id: str
    name: str
    arguments: str  # JSON text


def new_tool_call_id() -> str:
    return "call_" + secrets.token_hex(12)


class ChatFormatter:
    """Renders chats for one model. Built once per loaded model from its template."""

    def __init__(self, spec: ChatTemplateSpec, *, timeout_s: float = 2.0) -> None:
        self.template = ChatTemplate(spec.source, bos_token=spec.bos_token, eos_token=spec.eos_token)
        self.timeout_s = timeout_s
        self.native_tools = "tools" in spec.source and "tool_calls" in spec.source

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[ToolSpec] | None = None,
    ) -> str:
        """The prompt text (``add_generation_prompt``) for OpenAI-style ``messages``."""
        if tools and self.native_tools:
            msgs = [_native_message(m) for m in messages]
            return self.template.render(
                msgs, tools=[t.openai_dict() for t in tools], timeout_s=self.timeout_s
            )
        msgs = [_plain_message(m) for m in messages]
        if tools:
            msgs = _inject_tool_prompt(msgs, tools)
        return self.template.render(msgs, timeout_s=self.timeout_s)


def _native_message(m: dict[str, Any]) -> dict[str, Any]:
    out = dict(m)
    if out.get("content") is None:
        out["content"] = ""
    if out.get("tool_calls"):
        calls = []
        for call in out["tool_calls"]:
            fn = dict(call.get("function", {}))
            fn["arguments"] = _maybe_json(fn.get("arguments", "{}"))
            calls.append({**call, "function": fn})
        out["tool_calls"] = calls
    return out


def _plain_message(m: dict[str, Any]) -> dict[str, Any]:
    """For templates without tool support: tool calls written back as text, content always str."""
    role = m["role"]
    content = m.get("content") or ""
    if role == "developer":
        role = "system"
    if m.get("tool_calls"):
        blocks = []
        for call in m["tool_calls"]:
            fn = call.get("function", {})
            payload = {"name": fn.get("name"), "arguments": _maybe_json(fn.get("arguments", "{}"))}
            blocks.append(f"{TOOL_CALL_OPEN}{json.dumps(payload)}{TOOL_CALL_CLOSE}")
        content = (content + "\n" if content else "") + "\n".join(blocks)
    if role == "tool":
        content = f"<tool_response>\n{content}\n</tool_response>"
    return {"role": role, "content": content}


def _inject_tool_prompt(messages: list[dict[str, Any]], tools: list[ToolSpec]) -> list[dict[str, Any]]:
    lines = [
        "You can call functions. The available functions, as JSON schemas:",
        *(json.dumps(t.openai_dict()["function"]) for t in tools),
        "To call a function, reply with only "
        f'{TOOL_CALL_OPEN}{{"name": <function name>, "arguments": <arguments object>}}{TOOL_CALL_CLOSE}.',
        "Otherwise, answer normally.",
    ]
    section = "\n".join(lines)
    if messages and messages[0]["role"] == "system":
        first = dict(messages[0])
        first["content"] = f"{first['content']}\n\n{section}" if first["content"] else section
        return [first, *messages[1:]]
    return [{"role": "system", "content": section}, *messages]


def _maybe_json(text: Any) -> Any:
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


# --- forcing and parsing tool calls -----------------------------------------------------------


def tool_call_constraint(tools: list[ToolSpec]) -> Constraint:
    """A JSON-schema constraint whose only valid outputs are a call of one of ``tools``.

    Extra keys are shut out (on the call, and on the arguments unless the tool's schema says
    otherwise): some grammar engines (llguidance) allow them by default, and a small model then
    wanders into invented properties until it runs out of tokens.
    """
    options = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t.name},
                "arguments": _closed(t.parameters or {"type": "object"}),
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return Constraint(kind="json_schema", schema=schema)


def _closed(schema: dict[str, Any]) -> dict[str, Any]:
    if schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema:
        return {**schema, "additionalProperties": False}
    return schema


def parse_tool_calls(text: str, tools: list[ToolSpec]) -> tuple[str | None, list[ParsedToolCall]]:
    """Find tool calls in a reply: ``<tool_call>`` blocks, or a reply that is one call object.

    Returns the remaining content (None when nothing but calls) and the calls. Calls to unknown
    functions or with unparseable arguments are left as content.
    """
    names = {t.name for t in tools}
    calls: list[ParsedToolCall] = []
    stripped = text.strip()
    if TOOL_CALL_OPEN in text:
        for block in _TOOL_CALL_BLOCK.findall(text):
            call = _call_from_json(block, names)
            if call is not None:
                calls.append(call)
        if calls:
            rest = _TOOL_CALL_BLOCK.sub("", text).strip()
            return (rest or None), calls
        return text, []
    if stripped.startswith("{"):
        call = _call_from_json(stripped, names)
        if call is not None:
            return None, [call]
    return text, []


def _call_from_json(text: str, names: set[str]) -> ParsedToolCall | None:
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ParsedToolCall(new_tool_call_id(), obj["name"], json.dumps(args))


def could_become_tool_call(text: str) -> bool:
    """While streaming in 'auto' mode: can this prefix still turn out to be a tool call?"""
    s = text.lstrip()
    if not s:
        return True
    return s.startswith("{") or TOOL_CALL_OPEN.startswith(s[: len(TOOL_CALL_OPEN)]) or s.startswith(
        TOOL_CALL_OPEN
    )
