"""onnxruntime-genai engine (see :mod:`.engine`): the model and tokenizer, og.Engine lanes
(:mod:`.lanes`), og.Generator sequences and prefix reuse (:mod:`.generators`)."""

from .common import constraint_to_guidance
from .engine import OG_PROVIDERS, OrtGenaiEngine, OrtGenaiOptions, read_chat_template

__all__ = ["OG_PROVIDERS", "OrtGenaiEngine", "OrtGenaiOptions", "constraint_to_guidance",
           "read_chat_template"]
