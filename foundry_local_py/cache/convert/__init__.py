"""Local conversions: GGUF -> ONNX GenAI (onnxruntime-genai's model builder, via transformers) and
GGUF -> GGUF re-quantization (llama.cpp), each measured for fidelity against its source.

Importing this package is cheap: torch, transformers and the builder load only in the conversion
worker process.
"""

from .build import (
    build_variant,
    conversion_log_path,
    describe_fidelity,
    missing_dependencies,
    tool_versions,
)
from .fidelity import DEFAULT_THRESHOLD, measure, reference_text

__all__ = [
    "DEFAULT_THRESHOLD",
    "build_variant",
    "conversion_log_path",
    "describe_fidelity",
    "measure",
    "missing_dependencies",
    "reference_text",
    "tool_versions",
]
