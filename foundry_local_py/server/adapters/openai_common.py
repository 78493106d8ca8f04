"""What the OpenAI chat and text completion front-ends share: their sampling fields as an ask."""

from __future__ import annotations

from ...generation import SamplingAsk
from ...generation.request import LoraAsk
from ...protocol.common import SamplingFields, Usage
from ..serving import Outcome


def sampling_ask(fields: SamplingFields) -> SamplingAsk:
    return SamplingAsk(
        temperature=fields.temperature, top_p=fields.top_p, top_k=fields.top_k, min_p=fields.min_p,
        seed=fields.effective_seed(), presence_penalty=fields.presence_penalty,
        frequency_penalty=fields.frequency_penalty, repeat_penalty=fields.repeat_penalty,
        logit_bias=fields.logit_bias,
    )


def lora_asks(fields: SamplingFields) -> tuple[LoraAsk, ...]:
    return tuple(LoraAsk(item.id, item.scale) for item in fields.lora or ())


def usage_of(outcome: Outcome) -> Usage:
    return Usage.of(*outcome.usage())
