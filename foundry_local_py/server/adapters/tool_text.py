"""Streamed text when tools are offered: what the Responses and Messages front-ends share.

While a reply may still turn out to be a tool call (tool_choice auto) it is held back; a forced
call is held back whole. At the end the held text is parsed into calls by the request's
:class:`~...generation.ToolPlan` (the same parser as the non-streaming path).
"""

from __future__ import annotations

from ...engines.chat_format import ParsedToolCall, could_become_tool_call
from ...generation import ToolPlan


class ToolAwareText:
    def __init__(self, plan: ToolPlan, *, parallel: bool = True) -> None:
        self.plan = plan
        self.parallel = parallel
        self.buffering = plan.mode != "none"
        self.held = ""

    def feed(self, text: str) -> str:
        """The part of ``text`` that can be shown now ('' while it may be a tool call)."""
        if not self.buffering:
            return text
        self.held += text
        if self.plan.mode == "auto" and not could_become_tool_call(self.held):
            self.buffering = False
            out, self.held = self.held, ""
            return out
        return ""

    def finish(self) -> tuple[str, list[ParsedToolCall]]:
        """(text still to show, tool calls) once the reply is complete."""
        held, self.held = self.held, ""
        if not self.buffering or not held:
            return held, []
        return self.parse(held)

    def parse(self, text: str) -> tuple[str, list[ParsedToolCall]]:
        """(content, calls) of a whole reply; one call only when parallel calls are off."""
        content, calls = self.plan.parse(text)
        if not self.parallel:
            calls = calls[:1]
        return content or "", calls
