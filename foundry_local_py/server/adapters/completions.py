"""POST /v1/completions: raw prompts (a string, a list of strings, or token ids).

Several prompts become several asks decoded together; their choices carry the prompt's index.
Streams interleave chunks of all choices, each tagged with its index, as OpenAI does.
"""

from __future__ import annotations

from typing import Any

from ...config import Settings
from ...errors import InvalidRequestError
from ...generation import Generation, GenerationAsk, TextPrompt
from ...protocol.completions import Completion, CompletionChoice, CompletionLogprobs, CompletionRequest
from ...scheduler.output import LogprobEntry
from ...scheduler.scheduler import FinishEvent, TextEvent
from ..serving import DONE, ChoiceOutcome, FastChunk, FrontEnd, Outcome, chunk_json, frame
from .openai_common import lora_asks, sampling_ask, usage_of

MAX_PROMPTS = 16


class CompletionFrontEnd(FrontEnd[CompletionRequest]):
    endpoint = "/v1/completions"
    request_type = CompletionRequest
    id_prefix = "cmpl"

    @classmethod
    def asks(cls, req: CompletionRequest, settings: Settings) -> list[GenerationAsk]:
        if req.suffix:
            raise InvalidRequestError("suffix (fill-in-the-middle) is not supported", param="suffix")
        if req.best_of is not None and req.best_of != 1:
            raise InvalidRequestError("only best_of=1 is supported", param="best_of")
        prompts = req.prompts()
        if len(prompts) > MAX_PROMPTS:
            raise InvalidRequestError(f"at most {MAX_PROMPTS} prompts per request", param="prompt")
        sampling = sampling_ask(req)
        return [
            GenerationAsk(model=req.model, prompt=TextPrompt(p), max_tokens=req.max_tokens,
                          sampling=sampling, logprobs=req.logprobs, stop=req.stop_list(), n=req.n,
                          ep=req.ep, ttl=req.ttl, lora=lora_asks(req),
                          params={"top_logprobs": "logprobs"})
            for p in prompts
        ]

    def __init__(self, req: CompletionRequest, gen: Generation) -> None:
        super().__init__(req, gen)
        engine = gen.model.engine
        self.echo = [
            (p if isinstance(p, str) else engine.detokenize(p).decode("utf-8", errors="replace"))
            if req.echo else ""
            for p in req.prompts()
        ]
        self.offsets = [len(e) for e in self.echo]
        self._fast: list[FastChunk] = []

    def _chunk(self, index: int, text: str, finish: Any = None,
               logprobs: CompletionLogprobs | None = None) -> bytes:
        return frame(chunk_json(Completion(
            id=self.gen.id, created=self.created, model=self.req.model,
            choices=[CompletionChoice(index=index, text=text, finish_reason=finish, logprobs=logprobs)],
        )))

    def stream_start(self) -> list[bytes]:
        self._fast = [FastChunk(Completion(
            id=self.gen.id, created=self.created, model=self.req.model,
            choices=[CompletionChoice(index=i, text="\x00TEXT\x00", finish_reason=None)],
        )) for i in range(len(self.echo))]
        return [self._chunk(i, e) for i, e in enumerate(self.echo) if e]

    def stream_text(self, index: int, event: TextEvent) -> bytes | None:
        lp = None
        if self.req.logprobs is not None:
            lp = _logprobs(event.logprobs, self.offsets[index])
        self.offsets[index] += len(event.text)
        if lp:
            return self._chunk(index, event.text, logprobs=lp)
        return self._fast[index].event(event.text) if event.text else None

    def stream_finish(self, index: int, event: FinishEvent, choice: ChoiceOutcome) -> list[bytes]:
        return [self._chunk(index, "", finish=event.reason)]

    def stream_end(self, outcome: Outcome) -> list[bytes]:
        if not self.req.include_usage():
            return [DONE]
        usage = Completion(id=self.gen.id, created=self.created, model=self.req.model, choices=[],
                           usage=usage_of(outcome))
        return [frame(chunk_json(usage)), DONE]

    def body(self, outcome: Outcome) -> dict[str, Any]:
        return Completion(
            id=self.gen.id, created=self.created, model=self.req.model,
            choices=[
                CompletionChoice(
                    index=i, text=self.echo[i] + c.text, finish_reason=c.finish_reason,
                    logprobs=(_logprobs(c.logprobs, len(self.echo[i]))
                              if self.req.logprobs is not None else None),
                )
                for i, c in enumerate(outcome.choices)
            ],
            usage=usage_of(outcome),
        ).model_dump(mode="json")


def _logprobs(entries: list[LogprobEntry], offset: int) -> CompletionLogprobs:
    out = CompletionLogprobs()
    for e in entries:
        out.tokens.append(e.token)
        out.token_logprobs.append(e.logprob)
        out.top_logprobs.append({t: lp for (t, _raw, lp) in e.top} if e.top else None)
        out.text_offset.append(offset)
        offset += len(e.token)
    return out
