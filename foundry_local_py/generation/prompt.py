"""One renderer for every front-end: a chat (with tools) or a raw prompt -> prompt token ids.

Chat completions, the token counter, the Responses API and the Messages API all render through
:func:`prompt_tokens`, so a count always equals the ``usage`` the same request reports.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..engines.base import Constraint
from ..engines.chat_format import ParsedToolCall, ToolSpec, parse_tool_calls, tool_call_constraint
from ..errors import InvalidRequestError
from .request import ChatPrompt, GenerationAsk, ServedModel, TextPrompt


@dataclass(frozen=True)
class ToolPlan:
    """What a chat asks of tools: those offered to the model, and those it must call."""

    tools: list[ToolSpec] = field(default_factory=list)
    """Offered (empty when tool_choice is none)."""
    forced: list[ToolSpec] = field(default_factory=list)
    """One of these must be called (tool_choice required or named): the output is constrained."""

    @property
    def mode(self) -> str:
        if self.forced:
            return "forced"
        return "auto" if self.tools else "none"

    def constraint(self) -> Constraint | None:
        return tool_call_constraint(self.forced) if self.forced else None

    def parse(self, text: str) -> tuple[str | None, list[ParsedToolCall]]:
        """(content, tool calls) of a finished reply; (text, []) when tools are off."""
        if self.mode == "none":
            return text, []
        return parse_tool_calls(text, self.forced or self.tools)


NO_TOOLS = ToolPlan()


def tool_plan(ask: GenerationAsk) -> ToolPlan:
    prompt = ask.prompt
    if not isinstance(prompt, ChatPrompt):
        return NO_TOOLS
    tools, choice = prompt.tools, prompt.tool_choice
    param = ask.param("tool_choice")
    if choice is not None and not tools and choice != "none":
        raise InvalidRequestError("tool_choice needs tools", param=param)
    if choice is None:
        choice = "auto" if tools else "none"
    if choice == "none":
        return NO_TOOLS
    if choice == "auto":
        return ToolPlan(tools)
    if choice == "required":
        return ToolPlan(tools, tools)
    named = [t for t in tools if t.name == choice]
    if not named:
        raise InvalidRequestError(f"tool_choice names '{choice}', which is not among the tools", param=param)
    return ToolPlan(tools, named)


def prompt_tokens(ask: GenerationAsk, model: ServedModel, plan: ToolPlan) -> list[int]:
    """Render and tokenize the ask's prompt (blocking: call it off the event loop)."""
    engine = model.engine
    prompt = ask.prompt
    if isinstance(prompt, TextPrompt):
        if isinstance(prompt.text, str):
            return engine.tokenize(prompt.text, add_special=True)
        if any(t >= engine.info.n_vocab for t in prompt.text):
            raise InvalidRequestError("prompt has token ids outside the vocabulary",
                                      param=ask.param("prompt"))
        return list(prompt.text)
    formatter = model.formatter
    if formatter is None:
        raise InvalidRequestError(
            f"model '{ask.model}' has no chat template (a base model); use /v1/completions",
            param="model", code="model_not_chat",
        )
    text = formatter.render(prompt.messages, tools=plan.tools or None)
    bos = formatter.template.bos_token
    # A template that writes the BOS itself must not get a second one from the tokenizer.
    return engine.tokenize(text, add_special=not (bos and text.startswith(bos)))
