"""GGUF -> GGUF re-quantization with llama.cpp's quantizer (``llama_model_quantize``).

The target type comes from the variant's precision: ``q4_0``, ``q8_0``, ``q3_k_m``, ``f16`` ... map
to llama.cpp's ``LLAMA_FTYPE_MOSTLY_<PRECISION>`` (``f32`` to ``LLAMA_FTYPE_ALL_F32``).
``allow_requantize`` is set, since the sources we ship are already quantized: re-quantizing can
only lose information (a 4-bit source turned into 8-bit is larger, not better), which the fidelity
measurement then shows.
"""

from __future__ import annotations

import ctypes
import os
import re
from pathlib import Path

from ...errors import ConversionError


def ftype_for(precision: str) -> int:
    """llama.cpp's ftype constant for a precision name, e.g. 'q4_0' -> LLAMA_FTYPE_MOSTLY_Q4_0."""
    import llama_cpp

    key = precision.strip().lower()
    if not re.fullmatch(r"[a-z0-9_]{2,16}", key):
        raise ConversionError(f"unsupported GGUF precision '{precision}'")
    if key == "f32":
        return int(llama_cpp.LLAMA_FTYPE_ALL_F32)
    value = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{key.upper()}", None)
    if not isinstance(value, int):
        raise ConversionError(f"unsupported GGUF precision '{precision}' (llama.cpp has no such type)")
    return value


def quantize(source: Path, target: Path, *, precision: str, n_threads: int | None = None) -> None:
    """Write ``target`` as a re-quantized copy of the GGUF ``source``."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype_for(precision)
    params.allow_requantize = True
    params.nthread = n_threads or os.cpu_count() or 1
    target.parent.mkdir(parents=True, exist_ok=True)
    rc = llama_cpp.llama_model_quantize(
        str(source).encode("utf-8"), str(target).encode("utf-8"), ctypes.byref(params)
    )
    if rc != 0 or not target.is_file() or target.stat().st_size == 0:
        raise ConversionError(f"llama.cpp could not quantize the model to {precision} (code {rc})")
