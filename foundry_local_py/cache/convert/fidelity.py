"""How closely a converted model follows its source, measured on a fixed text.

The text (``reference.txt``, shipped in this package: original prose in a few registers, so no
model has memorised it) is tokenized ONCE, with the source model's tokenizer, and the same token
ids are fed to both models. Each model yields, at every position, its most likely next token and
the log-probability it gave the token that actually follows. From those:

- top-1 agreement: the share of positions where both models pick the same most likely token;
- perplexity: ``exp(mean(-log p(next token)))`` for each model, and the converted model's change
  relative to the source in percent.

A conversion whose agreement is below the threshold is recorded as *degraded*: it stays usable by
name, but hardware selection does not pick it on its own.

Scorers exist for GGUF files (llama.cpp), ONNX GenAI folders (onnxruntime-genai) and Hugging Face
checkpoint folders (transformers). All imports are lazy: this module is imported by the core.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ConversionError
from ..manifest import Fidelity

DEFAULT_THRESHOLD = 0.90
"""Default minimum top-1 agreement; below it a conversion is marked degraded."""
MAX_TOKENS = 512


def reference_text() -> str:
    return (resources.files(__package__) / "reference.txt").read_text(encoding="utf-8")


@dataclass(frozen=True)
class TokenScores:
    """Per position ``i`` (predicting token ``i + 1``): the argmax token and the target's logprob."""

    argmax: np.ndarray
    target_logprob: np.ndarray
    n_vocab: int


def scores_from_logits(logits: np.ndarray, ids: list[int]) -> TokenScores:
    """``logits``: (n, vocab) for the n input ids; position n-1 has no target and is dropped."""
    n = len(ids)
    if logits.ndim != 2 or logits.shape[0] < n:
        raise ConversionError("the model returned logits of an unexpected shape")
    logits = np.asarray(logits[: n - 1], dtype=np.float64)
    targets = np.asarray(ids[1:], dtype=np.int64)
    peak = logits.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(logits - peak).sum(axis=1)) + peak[:, 0]
    target_logprob = logits[np.arange(n - 1), targets] - log_norm
    return TokenScores(
        argmax=logits.argmax(axis=1), target_logprob=target_logprob, n_vocab=int(logits.shape[1])
    )


def compare(source: TokenScores, converted: TokenScores, *, threshold: float) -> Fidelity:
    if source.argmax.shape != converted.argmax.shape:
        raise ConversionError("the source and converted models scored different numbers of tokens")
    n = int(source.argmax.shape[0])
    if n == 0:
        raise ConversionError("the reference text is too short to measure fidelity")
    agreement = float(np.mean(source.argmax == converted.argmax))
    ppl_source = math.exp(-float(np.mean(source.target_logprob)))
    ppl_converted = math.exp(-float(np.mean(converted.target_logprob)))
    return Fidelity(
        top1_agreement=round(agreement, 4),
        perplexity_source=round(ppl_source, 4),
        perplexity_converted=round(ppl_converted, 4),
        perplexity_delta_pct=round((ppl_converted - ppl_source) / ppl_source * 100.0, 2),
        n_tokens=n,
        threshold=threshold,
        degraded=agreement < threshold,
    )


# --- model kinds -----------------------------------------------------------------------------


def model_kind(path: Path) -> str:
    """'gguf' (a file), 'onnx' (a folder with genai_config.json) or 'hf' (a folder with config.json)."""
    if path.is_file() and path.suffix.lower() == ".gguf":
        return "gguf"
    if path.is_dir() and (path / "genai_config.json").is_file():
        return "onnx"
    if path.is_dir() and (path / "config.json").is_file():
        return "hf"
    raise ConversionError("unrecognised model format: expected a GGUF file or an ONNX/HF folder")


def tokenize(path: Path, text: str, *, max_tokens: int = MAX_TOKENS) -> list[int]:
    """Token ids for ``text`` with the model's own tokenizer (BOS as the model wants it)."""
    kind = model_kind(path)
    if kind == "gguf":
        from llama_cpp import Llama

        llm = Llama(str(path), vocab_only=True, verbose=False)
        try:
            ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        finally:
            llm.close()
    elif kind == "onnx":
        import onnxruntime_genai as og

        model = og.Model(str(path))
        ids = [int(t) for t in og.Tokenizer(model).encode(text)]
    else:
        from transformers import AutoTokenizer

        ids = list(AutoTokenizer.from_pretrained(str(path))(text)["input_ids"])
    if len(ids) < 2:
        raise ConversionError("the reference text tokenized to fewer than two tokens")
    return ids[:max_tokens]


def score(path: Path, ids: list[int], *, n_threads: int | None = None) -> TokenScores:
    """Score ``ids`` with the model at ``path`` (one forward pass over the whole text)."""
    kind = model_kind(path)
    if kind == "gguf":
        return scores_from_logits(_llama_logits(path, ids, n_threads), ids)
    if kind == "onnx":
        return scores_from_logits(_onnx_logits(path, ids), ids)
    return scores_from_logits(_hf_logits(path, ids), ids)


def _llama_logits(path: Path, ids: list[int], n_threads: int | None) -> np.ndarray:
    from llama_cpp import Llama

    n = len(ids)
    llm = Llama(
        str(path),
        n_ctx=max(n, 64),
        n_batch=n,
        n_ubatch=n,
        logits_all=True,
        n_gpu_layers=0,
        n_threads=n_threads or os.cpu_count() or 1,
        verbose=False,
    )
    try:
        llm.eval(ids)
        return np.array(llm.scores[:n], dtype=np.float32)
    finally:
        llm.close()


def _onnx_logits(path: Path, ids: list[int]) -> np.ndarray:
    import onnxruntime_genai as og

    model = og.Model(str(path))
    params = og.GeneratorParams(model)
    # Sliding-window models (Gemma 3) need a KV cache at least as long as their window.
    context = _onnx_context_length(path)
    params.set_search_options(max_length=min(max(len(ids) + 1, 1024), max(context, len(ids) + 1)))
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray(ids, dtype=np.int32))
    logits: Any = generator.get_output("logits")
    out = np.asarray(logits, dtype=np.float32)
    return out.reshape(out.shape[-2], out.shape[-1])


def _onnx_context_length(path: Path) -> int:
    try:
        config = json.loads((path / "genai_config.json").read_text(encoding="utf-8"))
        return int(config["model"]["context_length"])
    except (OSError, ValueError, KeyError, TypeError):
        return 1024


def _hf_logits(path: Path, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids], dtype=torch.long)).logits[0]
    return np.asarray(logits.float().numpy())


def measure(
    source: Path,
    converted: Path,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    text: str | None = None,
    max_tokens: int = MAX_TOKENS,
) -> Fidelity:
    """Fidelity of ``converted`` against ``source`` on the reference text (or ``text``)."""
    ids = tokenize(source, reference_text() if text is None else text, max_tokens=max_tokens)
    source_scores = score(source, ids)
    converted_scores = score(converted, ids)
    if source_scores.n_vocab != converted_scores.n_vocab:
        raise ConversionError("the converted model's vocabulary differs from its source's")
    return compare(source_scores, converted_scores, threshold=threshold)
