"""POST /v1/embeddings: mean-pooled, normalised embeddings from the loaded model."""

from __future__ import annotations

import base64
import struct

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse

from ..errors import FoundryError, InvalidRequestError
from ..protocol.embeddings import Embedding, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage
from .errors import request_id
from .serving import Recorder, ServingContext

ENDPOINT = "/v1/embeddings"
MAX_INPUTS = 256


class EmbeddingServing:
    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def create(self, req: EmbeddingRequest, raw: Request) -> JSONResponse:
        inputs = req.inputs()
        if len(inputs) > MAX_INPUTS:
            raise InvalidRequestError(f"at most {MAX_INPUTS} inputs per request", param="input")
        lm = await self.ctx.manager.get(req.model)
        recorder = Recorder(self.ctx.metrics, lm.alias, ENDPOINT, request_id(raw))
        try:
            info = lm.engine.info
            if not info.supports_embeddings:
                raise InvalidRequestError(
                    f"model '{req.model}' ({info.engine}) does not produce embeddings", param="model")
            if req.dimensions is not None and req.dimensions != info.n_embd:
                raise InvalidRequestError(
                    f"this model's embeddings have {info.n_embd} dimensions", param="dimensions")
            n_vocab = info.n_vocab

            def run() -> tuple[list[list[float]], int]:
                tokens = []
                for item in inputs:
                    if isinstance(item, str):
                        tokens.append(lm.engine.tokenize(item, add_special=True))
                    elif any(t >= n_vocab for t in item):
                        raise InvalidRequestError("input has token ids outside the vocabulary",
                                                  param="input")
                    else:
                        tokens.append(list(item))
                return lm.engine.embed(tokens), sum(len(t) for t in tokens)

            lm.touch()
            vectors, n_tokens = await anyio.to_thread.run_sync(run)
            recorder.on_finish(n_tokens, 0)
            data = [Embedding(index=i, embedding=_encode(v, req.encoding_format))
                    for i, v in enumerate(vectors)]
            body = EmbeddingResponse(data=data, model=req.model,
                                     usage=EmbeddingUsage(prompt_tokens=n_tokens, total_tokens=n_tokens))
            recorder.close("200")
            return JSONResponse(body.model_dump(mode="json"))
        except FoundryError as exc:
            recorder.close(str(exc.status))
            raise


def _encode(vector: list[float], fmt: str) -> list[float] | str:
    if fmt == "base64":  # little-endian float32, as OpenAI sends it
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector
