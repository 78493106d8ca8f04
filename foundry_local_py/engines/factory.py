"""Build an engine for a model format. Engines import their heavy runtime lazily."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelLoadError
from .base import Engine


@dataclass(frozen=True)
class EngineOptions:
    n_threads: int
    max_batch: int
    n_ctx: int | None = None
    execution_provider: str = "cpu"
    """'cpu', 'cuda', 'dml', ... (lower-case short names)."""
    prompt_cache_bytes: int = 256 << 20


def load_engine(fmt: str, path: Path, options: EngineOptions) -> Engine:
    if fmt == "gguf":
        from .llamacpp import LlamaCppEngine, LlamaCppOptions

        return LlamaCppEngine(
            path,
            LlamaCppOptions(
                n_threads=options.n_threads,
                n_ctx=options.n_ctx,
                max_batch=options.max_batch,
                n_gpu_layers=0 if options.execution_provider == "cpu" else -1,
                prompt_cache_bytes=options.prompt_cache_bytes,
            ),
        )
    if fmt == "onnx":
        try:
            from .onnx_genai import OrtGenaiEngine, OrtGenaiOptions
        except ImportError as exc:
            raise ModelLoadError(
                "onnxruntime-genai is not installed; install foundry-local-py[onnx]"
            ) from exc
        return OrtGenaiEngine(
            path,
            OrtGenaiOptions(
                execution_provider=options.execution_provider,
                max_batch=options.max_batch,
                n_ctx=options.n_ctx,
                n_threads=options.n_threads,
            ),
        )
    raise ModelLoadError(f"unsupported model format '{fmt}'")
