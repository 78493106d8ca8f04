"""Checkpoint -> ONNX GenAI folder with onnxruntime-genai's model builder, called as a library.

A GGUF source is first turned into a Hugging Face checkpoint (float32, dequantized) with
transformers' GGUF loader; the builder then reads that folder. Sharp edges handled here (found
with transformers 5.23, onnxruntime-genai 0.18, gguf 0.19):

- transformers marks a GGUF-loaded model as quantized, so ``save_pretrained`` refuses: the weights
  are already dequantized, so the quantizer and its config are dropped before saving;
- the loaded config carries no ``architectures``, which the builder dispatches on;
- the builder's Gemma 3 path reads ``rope_theta`` / ``rope_local_base_freq`` and a flat
  ``rope_parameters``, while transformers 5 nests them per layer type: they are flattened on the
  config object the builder loaded;
- ``gguf.GGUFReader`` parses a GGUF's metadata (a 262k-entry vocabulary for Gemma) element by
  element, and transformers opens the file three times (config, tokenizer, weights): one parsed
  reader is shared while loading, which halves the time;
- ``python -m onnxruntime_genai.models.builder`` is never run (its ``-h`` crashes on Python 3.11);
  the builder imports ``onnx_ir``, an undeclared dependency listed in our ``[convert]`` extra.

Heavy imports (torch, transformers, the builder) happen inside the functions: this module runs in
the conversion worker process only.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ...errors import ConversionError

log = logging.getLogger(__name__)

PRECISIONS = ("int4", "int8", "fp16", "bf16", "fp32")
EXECUTION_PROVIDERS = ("cpu", "cuda", "dml", "webgpu")

Report = Callable[[str], None]


@contextlib.contextmanager
def shared_gguf_reader() -> Iterator[None]:
    """While active, ``gguf.GGUFReader(path)`` returns one parsed reader per (path, mode)."""
    import gguf

    original = gguf.GGUFReader
    readers: dict[tuple[str, str], Any] = {}

    def reader(path: Any, mode: Any = "r") -> Any:
        key = (str(path), str(mode))
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = reader  # type: ignore[assignment,misc]
    try:
        yield
    finally:
        gguf.GGUFReader = original  # type: ignore[misc]
        readers.clear()


def gguf_to_hf(gguf_path: Path, out_dir: Path) -> str:
    """Write a float32 Hugging Face checkpoint (weights, config, tokenizer) of a GGUF file.

    Returns the architecture name (e.g. ``LlamaForCausalLM``).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    with shared_gguf_reader():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    clear_quantization_marks(model)
    architecture = type(model).__name__
    model.config.architectures = [architecture]
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    del model
    return architecture


def clear_quantization_marks(model: Any) -> None:
    """transformers 5 keeps a GGUF model flagged as quantized although its tensors are float."""
    for param in model.parameters():
        if not param.dtype.is_floating_point:
            raise ConversionError("the checkpoint still holds quantized tensors after loading the GGUF")
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def flatten_rope_config(config: Any) -> None:
    """Gemma 3: nested per-layer-type RoPE settings -> the flat fields the builder reads."""
    architectures = getattr(config, "architectures", None) or []
    if not any(a.startswith("Gemma3") for a in architectures):
        return
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict) or "full_attention" not in params:
        return
    full = dict(params["full_attention"])
    local = dict(params.get("sliding_attention") or {})
    config.rope_theta = full.get("rope_theta", getattr(config, "rope_theta", 1_000_000.0))
    config.rope_local_base_freq = local.get("rope_theta", 10_000.0)
    config.rope_parameters = full


def build_onnx(
    checkpoint: Path,
    out_dir: Path,
    *,
    precision: str,
    execution_provider: str,
    work_dir: Path,
    model_name: str = "model",
    extra_options: dict[str, str] | None = None,
) -> None:
    """Run the model builder on a Hugging Face checkpoint folder."""
    if precision not in PRECISIONS:
        choices = ", ".join(PRECISIONS)
        raise ConversionError(f"unsupported ONNX precision '{precision}' (choose from {choices})")
    if execution_provider not in EXECUTION_PROVIDERS:
        raise ConversionError(f"unsupported execution provider '{execution_provider}'")
    # The builder logs every MatMul it quantizes at INFO.
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    from onnxruntime_genai.models import builder

    options = [f"{k}={v}" for k, v in (extra_options or {}).items()]
    cache_dir = work_dir / "builder-cache"
    kwargs = builder.parse_extra_options(
        model_name, str(checkpoint), str(out_dir), precision, execution_provider, str(cache_dir), options
    )
    flatten_rope_config(kwargs["hf_details"]["hf_config"])
    builder.create_model(
        model_name, str(checkpoint), str(out_dir), precision, execution_provider, str(cache_dir), **kwargs
    )
    if not (out_dir / "genai_config.json").is_file():
        raise ConversionError("the model builder produced no genai_config.json")
