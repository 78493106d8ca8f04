"""llama.cpp engine (GGUF), on llama-cpp-python's low-level bindings.

We drive ``llama_decode`` ourselves instead of using ``llama_cpp.Llama``: one context holds
``max_batch`` sequences, and every :meth:`LlamaRunner.step` builds a single batch with one decode
token per generating sequence plus a chunk of prompt tokens of sequences still in prefill. That is
continuous batching with chunked prefill, as llama.cpp's own ``llama-server`` does it.

The package, one concern per module:

- :mod:`.engine`: the loaded model (:class:`LlamaCppEngine`): metadata, tokenizer, chat template,
  embeddings, LoRA adapter lifetimes, and the KV plan it is loaded with;
- :mod:`.runner`: the continuous-batching loop on one context (:class:`~.runner.LlamaRunner`):
  slots, chunked prefill, prefix reuse, adapter groups, deterministic mode;
- :mod:`.pool`: the shared KV pool's policy (admission room, kept sequences, the overflow rule);
- :mod:`.slot`: one running sequence's state and the batch geometry;
- :mod:`.sampling`: sampler chains, JSON-schema grammars and log-probabilities.
"""

from .engine import LlamaCppEngine, LlamaCppOptions, kv_geometry
from .sampling import constraint_to_gbnf

__all__ = ["LlamaCppEngine", "LlamaCppOptions", "constraint_to_gbnf", "kv_geometry"]
