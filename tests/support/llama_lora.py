"""llama.cpp through llama-cpp-python's low-level API, with LoRA adapters set on the context.

Greedy decoding from given token ids (the same ids transformers sees), so a comparison between the
two runtimes is not blurred by tokenizer or template differences.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import llama_cpp
import numpy as np
from llama_cpp._logger import set_verbose


class LlamaLora:
    def __init__(self, model_path: Path, *, n_ctx: int = 1024, n_threads: int = 1) -> None:
        set_verbose(False)  # llama.cpp's load and graph logs: errors only
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), mparams)
        assert self.model, "model failed to load"
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_ctx
        cparams.n_ubatch = n_ctx
        cparams.n_threads = n_threads
        cparams.n_threads_batch = n_threads
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        assert self.ctx, "context failed to initialise"
        vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        self.eos = llama_cpp.llama_vocab_eos(vocab)
        self.adapters: list[object] = []

    def load_adapter(self, path: Path) -> object:
        adapter = llama_cpp.llama_adapter_lora_init(self.model, str(path).encode())
        assert adapter, f"llama.cpp refused the adapter {path.name}"
        self.adapters.append(adapter)
        return adapter

    def use(self, adapter: object | None, scale: float = 1.0) -> None:
        """Set exactly this adapter (or none) on the context."""
        if adapter is None:
            rc = llama_cpp.llama_set_adapters_lora(self.ctx, None, 0, None)
        else:
            arr = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter)
            scales = (ctypes.c_float * 1)(scale)
            rc = llama_cpp.llama_set_adapters_lora(self.ctx, arr, 1, scales)
        assert rc == 0, f"llama_set_adapters_lora failed ({rc})"

    def _decode(self, tokens: list[int]) -> np.ndarray:
        arr = (llama_cpp.llama_token * len(tokens))(*tokens)
        batch = llama_cpp.llama_batch_get_one(arr, len(tokens))
        rc = llama_cpp.llama_decode(self.ctx, batch)
        assert rc == 0, f"llama_decode failed ({rc})"
        logits = llama_cpp.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(logits, shape=(self.n_vocab,)).copy()

    def logits(self, prompt: list[int]) -> np.ndarray:
        """Next-token logits after ``prompt`` (from an empty cache)."""
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        return self._decode(prompt)

    def greedy(self, prompt: list[int], max_tokens: int) -> list[int]:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        out: list[int] = []
        logits = self._decode(prompt)
        for _ in range(max_tokens):
            token = int(np.argmax(logits))
            out.append(token)
            if token == self.eos:
                break
            logits = self._decode([token])
        return out

    def close(self) -> None:
        for adapter in self.adapters:
            llama_cpp.llama_adapter_lora_free(adapter)
        self.adapters.clear()
        llama_cpp.llama_free(self.ctx)
        llama_cpp.llama_model_free(self.model)
