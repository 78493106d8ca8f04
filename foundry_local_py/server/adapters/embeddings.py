"""POST /v1/embeddings: mean-pooled, normalised embeddings from the loaded model.

Embeddings do not decode, so they skip the scheduler; they share the serving core's request
accounting and the generation core's model resolution and context rule.
"""

from __future__ import annotations

import base64
import struct

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse

from ...errors import InvalidRequestError
from ...generation import check_inputs_fit
from ...protocol.embeddings import Embedding, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage
from ..body import parse_body
from ..serving import ServingCore

ENDPOINT = "/v1/embeddings"
MAX_INPUTS = 256


async def create_embeddings(core: ServingCore, raw: Request) -> JSONResponse:
    recorder = core.recorder(raw, ENDPOINT)
    try:
        req = await parse_body(raw, EmbeddingRequest, core.settings)
        inputs = req.inputs()
        if len(inputs) > MAX_INPUTS:
            raise InvalidRequestError(f"at most {MAX_INPUTS} inputs per request", param="input")
        async with core.generator.models.hold(req.model) as lm:  # loaded until embedded
            recorder.bind(lm.alias)
            info = lm.engine.info
            if lm.adapter is not None:
                raise InvalidRequestError(
                    f"embeddings are computed by the base model; name '{lm.alias}' instead of an adapter",
                    param="model")
            if not info.capabilities.embeddings:
                raise InvalidRequestError(
                    f"model '{req.model}' ({info.engine}) does not produce embeddings", param="model")
            if req.dimensions is not None and req.dimensions != info.n_embd:
                raise InvalidRequestError(f"this model's embeddings have {info.n_embd} dimensions",
                                          param="dimensions")

            def run() -> tuple[list[list[float]], int]:
                tokens = []
                for item in inputs:
                    if isinstance(item, str):
                        tokens.append(lm.engine.tokenize(item, add_special=True))
                    elif any(t >= info.n_vocab for t in item):
                        raise InvalidRequestError("input has token ids outside the vocabulary", param="input")
                    else:
                        tokens.append(list(item))
                check_inputs_fit([len(t) for t in tokens], info.n_ctx, "input")
                return lm.engine.embed(tokens), sum(len(t) for t in tokens)

            vectors, n_tokens = await anyio.to_thread.run_sync(run)
        recorder.on_finish(n_tokens, 0)
        data = [Embedding(index=i, embedding=_encode(v, req.encoding_format)) for i, v in enumerate(vectors)]
        body = EmbeddingResponse(data=data, model=req.model,
                                 usage=EmbeddingUsage(prompt_tokens=n_tokens, total_tokens=n_tokens))
        recorder.close("200")
        return JSONResponse(body.model_dump(mode="json"))
    except BaseException as exc:
        recorder.close_for(exc)
        raise


def _encode(vector: list[float], fmt: str) -> list[float] | str:
    if fmt == "base64":  # little-endian float32, as OpenAI sends it
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector
