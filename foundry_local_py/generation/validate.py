"""The one validation step: a :class:`GenerationAsk` becomes a :class:`ValidRequest` or a 400.

Every rule lives here, once, for every front-end:

1. limits that need no model (``n``, stop strings, logit-bias size, top_logprobs): :func:`check_limits`;
2. what the loaded model's engine declares it can do (:class:`~..engines.backends.Capabilities`):
   a sampling field set to a value that asks for something the engine does not honour, logprobs,
   structured output, is a 400 naming the field, never silently dropped;
3. logit-bias keys are token ids inside the vocabulary;
4. the prompt is rendered and tokenized by the one renderer (:mod:`.prompt`);
5. context: :func:`completion_budget` (the rule below);
6. a structured-output constraint is compiled once by the engine;
7. LoRA adapters (one named in ``model`` as ``ALIAS:ADAPTER``, and the ``lora`` list): the engine
   must declare ``lora_adapters`` (else a 400 naming ``lora`` / ``model``), each ``lora`` entry
   names an adapter of this model by index or name (404 otherwise); the set, sorted, is part of
   the request (KV computed under one set is never reused under another).

The context rule: a prompt of ``n_ctx`` tokens or more is a 400 ``context_length_exceeded``
quoting both counts; when the client sets ``max_tokens`` and prompt + max_tokens exceeds the
context, that is a 400 too (OpenAI's behaviour) unless the ask says ``cap_to_context`` (then
the budget is what the context leaves: Anthropic's); without ``max_tokens`` a request may generate
up to the context and then finishes with ``length``.
"""

from __future__ import annotations

from dataclasses import dataclass

import anyio

from ..config import Settings
from ..engines.backends import Capabilities
from ..engines.base import Constraint, GenerationRequest, LoraRef, LoraSet, SamplingParams
from ..errors import ContextLengthExceededError, InvalidRequestError, NotFoundError
from .prompt import ToolPlan, prompt_tokens, tool_plan
from .request import NEUTRAL, GenerationAsk, ServedModel


@dataclass(frozen=True)
class ValidRequest:
    """A request that passed every check: what the scheduler runs, and how to read its output."""

    model: ServedModel
    request: GenerationRequest
    tools: ToolPlan

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.prompt_tokens)

    @property
    def adapter_label(self) -> str:
        """The adapters it runs with, for metrics ('' for the base model)."""
        return "+".join(r.name for r in self.request.lora)


def check_limits(ask: GenerationAsk, settings: Settings) -> None:
    """Model-independent checks: cheap, before any model is touched."""
    if ask.n != 1:
        raise InvalidRequestError("only n=1 is supported", param="n")
    stop = ask.param("stop")
    if len(ask.stop) > settings.max_stop_sequences:
        raise InvalidRequestError(f"at most {settings.max_stop_sequences} stop sequences are allowed",
                                  param=stop)
    if any(len(s) > settings.max_stop_length for s in ask.stop):
        raise InvalidRequestError(f"stop sequences must be at most {settings.max_stop_length} characters",
                                  param=stop)
    bias = ask.sampling.logit_bias
    if bias and len(bias) > settings.max_logit_bias:
        raise InvalidRequestError(f"logit_bias may have at most {settings.max_logit_bias} entries",
                                  param=ask.param("logit_bias"))
    if ask.logprobs is not None and ask.logprobs > settings.max_top_logprobs:
        param = ask.param("top_logprobs")
        raise InvalidRequestError(f"{param} must be at most {settings.max_top_logprobs}", param=param)


def check_capabilities(ask: GenerationAsk, model: ServedModel, plan: ToolPlan) -> None:
    """400 for anything the model's engine does not declare it honours."""
    info = model.engine.info
    caps: Capabilities = info.capabilities
    who = f"model '{model.alias}' ({info.engine})"
    for name, value in vars(ask.sampling).items():
        if value is None or name in caps.sampling:
            continue
        if name == "logit_bias" and not value:
            continue
        if name in NEUTRAL and value == NEUTRAL[name]:
            continue
        raise InvalidRequestError(f"{name} is not supported by {who}", param=ask.param(name))
    if ask.logprobs is not None and not caps.logprobs:
        raise InvalidRequestError(f"{who} does not return logprobs", param=ask.param("logprobs"))
    if plan.forced and not caps.constraints:
        raise InvalidRequestError(f"{who} cannot force tool calls", param=ask.param("tool_choice"))
    if ask.response_format is not None and not caps.constraints:
        raise InvalidRequestError(f"{who} does not support structured output",
                                  param=ask.param("response_format"))


def lora_set(ask: GenerationAsk, model: ServedModel) -> LoraSet:
    """The adapters the request runs with (rule 7 of the module doc)."""
    named = model.adapter
    if named is None and not ask.lora:
        return ()
    info = model.engine.info
    if not info.capabilities.lora_adapters:
        param = ask.param("lora") if ask.lora else ask.param("model")
        raise InvalidRequestError(f"LoRA adapters are not supported by model '{model.alias}' "
                                  f"({info.engine})", param=param)
    refs: list[LoraRef] = []
    if named is not None:
        refs.append(LoraRef(named.name, named.path, named.sha256, 1.0))
    listed = list(model.adapters()) if ask.lora else []
    for i, item in enumerate(ask.lora):
        param = f"{ask.param('lora')}[{i}].id"
        if isinstance(item.id, int):
            if item.id >= len(listed):
                raise NotFoundError(f"model '{model.alias}' has {len(listed)} adapters; there is no "
                                    f"adapter {item.id}", param=param, code="adapter_not_found")
            record = listed[item.id]
        else:
            found = [r for r in listed if r.name.lower() == item.id.lower()]
            if not found:
                raise NotFoundError(f"no adapter named '{item.id}' is registered for model "
                                    f"'{model.alias}'", param=param, code="adapter_not_found")
            record = found[0]
        if item.scale == 0.0:
            continue  # llama.cpp's server: scale 0 turns the adapter off
        refs.append(LoraRef(record.name, record.path, record.sha256, item.scale))
    if len({r.sha256 for r in refs}) != len(refs):
        raise InvalidRequestError("the same adapter is named twice", param=ask.param("lora"))
    return tuple(sorted(refs, key=lambda r: (r.sha256, r.scale)))


def completion_budget(ask: GenerationAsk, n_prompt: int, n_ctx: int) -> int:
    """max_tokens for the engine under the context rule (module docstring)."""
    if n_prompt >= n_ctx:
        raise ContextLengthExceededError(
            f"This model's maximum context length is {n_ctx} tokens. However, your prompt has "
            f"{n_prompt} tokens. Please reduce the length of the prompt.",
            param=ask.param("prompt"),
        )
    requested = ask.max_tokens
    if requested is not None and n_prompt + requested > n_ctx and ask.cap_to_context:
        return n_ctx - n_prompt
    if requested is not None and n_prompt + requested > n_ctx:
        raise ContextLengthExceededError(
            f"This model's maximum context length is {n_ctx} tokens. However, you requested "
            f"{n_prompt + requested} tokens ({n_prompt} in the prompt, {requested} for the "
            f"completion). Please reduce the prompt or {ask.param('max_tokens')}.",
            param=ask.param("max_tokens"),
        )
    return requested if requested is not None else n_ctx - n_prompt


def check_inputs_fit(lengths: list[int], n_ctx: int, param: str) -> None:
    """Embedding inputs: each must fit the context (same error, same rule as prompts)."""
    for n in lengths:
        if n > n_ctx:
            raise ContextLengthExceededError(
                f"This model's maximum context length is {n_ctx} tokens. However, an input has "
                f"{n} tokens. Please reduce the length of the input.", param=param)


def sampling_params(ask: GenerationAsk, n_vocab: int, constraint: Constraint | None) -> SamplingParams:
    s = ask.sampling
    bias: dict[int, float] = {}
    for key, value in (s.logit_bias or {}).items():
        try:
            tok = int(key)
        except ValueError:
            raise InvalidRequestError(f"logit_bias key '{key[:32]}' is not a token id",
                                      param=ask.param("logit_bias")) from None
        if not 0 <= tok < n_vocab:
            raise InvalidRequestError(f"logit_bias token id {tok} is outside the vocabulary",
                                      param=ask.param("logit_bias"))
        bias[tok] = value
    d = SamplingParams()
    return SamplingParams(
        temperature=d.temperature if s.temperature is None else s.temperature,
        top_p=d.top_p if s.top_p is None else s.top_p,
        top_k=d.top_k if s.top_k is None else s.top_k,
        min_p=d.min_p if s.min_p is None else s.min_p,
        seed=s.seed,
        presence_penalty=s.presence_penalty or 0.0,
        frequency_penalty=s.frequency_penalty or 0.0,
        repeat_penalty=d.repeat_penalty if s.repeat_penalty is None else s.repeat_penalty,
        logit_bias=bias,
        top_logprobs=ask.logprobs,
        constraint=constraint,
    )


async def validate(ask: GenerationAsk, model: ServedModel, request_id: str) -> ValidRequest:
    """Every model-dependent check, then the request the scheduler runs (see the module doc).
    Call :func:`check_limits` first (it needs no model)."""
    plan = tool_plan(ask)
    check_capabilities(ask, model, plan)
    lora = lora_set(ask, model)
    engine = model.engine
    constraint = plan.constraint() or ask.response_format
    sampling = sampling_params(ask, engine.info.n_vocab, constraint)
    tokens = await anyio.to_thread.run_sync(prompt_tokens, ask, model, plan)
    max_tokens = completion_budget(ask, len(tokens), engine.info.n_ctx)
    if constraint is not None:
        await anyio.to_thread.run_sync(engine.validate_constraint, constraint)
    return ValidRequest(model, GenerationRequest(request_id, tokens, max_tokens, sampling, list(ask.stop),
                                                 lora), plan)
