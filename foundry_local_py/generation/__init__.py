"""The generation core, free of HTTP: front-end-neutral asks, one validation step, one prompt
renderer, admission and events. The server's front-ends and the in-process SDK both use it."""

from .prompt import ToolPlan, prompt_tokens, tool_plan
from .request import ChatPrompt, GenerationAsk, SamplingAsk, ServedModel, TextPrompt
from .service import Generation, Generator, new_id
from .validate import ValidRequest, check_inputs_fit, check_limits, validate

__all__ = [
    "ChatPrompt",
    "Generation",
    "GenerationAsk",
    "Generator",
    "SamplingAsk",
    "ServedModel",
    "TextPrompt",
    "ToolPlan",
    "ValidRequest",
    "check_inputs_fit",
    "check_limits",
    "new_id",
    "prompt_tokens",
    "tool_plan",
    "validate",
]
