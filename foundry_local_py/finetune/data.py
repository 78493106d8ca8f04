"""Chat fine-tuning data: the OpenAI format, one ``{"messages": [...]}`` object per JSONL line.

Each message has a ``role`` (``system``, ``user`` or ``assistant``) and a string ``content``; an
assistant message may carry ``"weight": 0`` (OpenAI's flag) to be shown to the model but not
trained on. Every example must hold at least one assistant message with weight 1, which is what
the loss is computed on. A bad line is reported with its line number; nothing else is read into
memory than the examples themselves.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidRequestError

ROLES = ("system", "user", "assistant")
MAX_ERRORS_SHOWN = 5


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    train: bool = True  # only meaningful for assistant messages

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class Example:
    line: int
    messages: tuple[Message, ...]


def load_chat_jsonl(path: Path) -> list[Example]:
    """Read and validate a chat fine-tuning JSONL file; raise one error listing the bad lines."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise InvalidRequestError(f"training data file '{path.name}' does not exist") from exc
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(f"training data file '{path.name}' is not UTF-8 text") from exc
    except OSError as exc:
        raise InvalidRequestError(f"cannot read training data file '{path.name}': {exc.strerror}") from exc
    return parse_chat_jsonl(text, source=path.name)


def parse_chat_jsonl(text: str, *, source: str = "data") -> list[Example]:
    examples: list[Example] = []
    errors: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            examples.append(parse_example(raw, number))
        except ValueError as exc:
            errors.append(f"line {number}: {exc}")
    if errors:
        shown = "; ".join(errors[:MAX_ERRORS_SHOWN])
        more = f" (and {len(errors) - MAX_ERRORS_SHOWN} more)" if len(errors) > MAX_ERRORS_SHOWN else ""
        raise InvalidRequestError(f"{source}: {len(errors)} bad line(s): {shown}{more}")
    if not examples:
        raise InvalidRequestError(f"{source}: no examples (expected one JSON object per line)")
    return examples


def parse_example(raw: str, line: int) -> Example:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError("expected a JSON object with a 'messages' list")
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    unknown = sorted(set(obj) - {"messages", "tools", "parallel_tool_calls", "functions"})
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(repr(k) for k in unknown)}")
    if "tools" in obj or "functions" in obj:
        raise ValueError("tool definitions are not supported for training yet")
    parsed = tuple(_message(m, i) for i, m in enumerate(messages))
    if not any(m.role == "assistant" and m.train for m in parsed):
        raise ValueError("no assistant message to learn from (need at least one with weight 1)")
    if parsed[-1].role != "assistant":
        raise ValueError("the last message must be the assistant's")
    for i, m in enumerate(parsed):
        if m.role == "system" and i != 0:
            raise ValueError(f"messages[{i}]: a system message may only come first")
    return Example(line=line, messages=parsed)


def _message(m: Any, i: int) -> Message:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise ValueError(f"{where} must be an object with 'role' and 'content'")
    role = m.get("role")
    if role not in ROLES:
        raise ValueError(f"{where}: role must be one of {', '.join(ROLES)} (got {role!r})")
    if "tool_calls" in m or "function_call" in m:
        raise ValueError(f"{where}: tool calls are not supported for training yet")
    unknown = sorted(set(m) - {"role", "content", "weight", "name"})
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(repr(k) for k in unknown)}")
    content = m.get("content")
    if not isinstance(content, str):
        raise ValueError(f"{where}: content must be a string")
    if role == "assistant" and not content:
        raise ValueError(f"{where}: an assistant message needs content")
    weight = m.get("weight", 1)
    if weight not in (0, 1) or isinstance(weight, bool):
        raise ValueError(f"{where}: weight must be 0 or 1")
    if weight == 0 and role != "assistant":
        raise ValueError(f"{where}: weight applies to assistant messages only")
    return Message(role=role, content=content, train=weight == 1)
