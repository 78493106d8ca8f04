"""In-process llama.cpp decode speed: the ceiling for one stream on this machine.

A bare loop on llama-cpp-python's low-level bindings, independent of our engine: decode the
prompt, then one token at a time (``llama_decode`` + a greedy sampler), timing only the decode
steps. Nothing a server does can beat this for a single stream, so a server's single-stream rate
divided by it says how much the serving layer costs.
"""

from __future__ import annotations

import time
from pathlib import Path

QUESTION = "Write a short story about a lighthouse keeper."


def _prompt(model: object) -> str:
    """The question in the model's chat template when it has one (an instruct model given raw
    text may end at once), else as plain text to continue."""

    import llama_cpp

    template = llama_cpp.llama_model_chat_template(model, None)
    if not template:
        return "Once upon a time, a lighthouse keeper"
    from ..engines.chat_template import ChatTemplate

    return ChatTemplate(template.decode("utf-8", errors="replace")).render(
        [{"role": "user", "content": QUESTION}])


class DecodeCeiling:
    """A model and context kept loaded, so the ceiling can be measured again and again."""

    def __init__(self, gguf: Path, *, n_threads: int) -> None:
        import llama_cpp
        from llama_cpp import _logger

        _logger.set_verbose(False)
        llama_cpp.llama_backend_init()
        self._ll = llama_cpp
        model = llama_cpp.llama_model_load_from_file(str(gguf).encode(),
                                                     llama_cpp.llama_model_default_params())
        if not model:
            raise RuntimeError("could not load the model")
        self._model = model
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = 2048
        cparams.n_batch = 512
        cparams.n_threads = n_threads
        cparams.n_threads_batch = n_threads
        cparams.no_perf = True
        self._ctx = llama_cpp.llama_init_from_model(model, cparams)
        self._sampler = llama_cpp.llama_sampler_init_greedy()
        data = _prompt(model).encode()
        self._prompt = (llama_cpp.llama_token * 512)()
        self._n_prompt = llama_cpp.llama_tokenize(
            self._vocab, data, len(data), self._prompt, 512, False, True)

    def measure(self, n_tokens: int = 128) -> float:
        """One greedy decode of ``n_tokens`` after the prompt; tokens/s of the decode steps."""
        ll = self._ll
        ll.llama_memory_clear(ll.llama_get_memory(self._ctx), True)
        ll.llama_decode(self._ctx, ll.llama_batch_get_one(self._prompt, self._n_prompt))
        token = (ll.llama_token * 1)()
        count = 0
        start = time.perf_counter()
        for _ in range(n_tokens):
            token[0] = ll.llama_sampler_sample(self._sampler, self._ctx, -1)
            if ll.llama_vocab_is_eog(self._vocab, token[0]):
                break
            if ll.llama_decode(self._ctx, ll.llama_batch_get_one(token, 1)) != 0:
                break
            count += 1
        elapsed = time.perf_counter() - start
        return count / elapsed if count > 1 else 0.0

    def close(self) -> None:
        ll = self._ll
        ll.llama_sampler_free(self._sampler)
        ll.llama_free(self._ctx)
        ll.llama_model_free(self._model)


def llama_cpp_decode_tps(gguf: Path, *, n_threads: int, n_tokens: int = 128, repeats: int = 3) -> float:
    """Greedy decode tokens/s of raw ``llama_decode`` (prompt excluded), best of ``repeats``."""
    ceiling = DecodeCeiling(gguf, n_threads=n_threads)
    try:
        return max(ceiling.measure(n_tokens) for _ in range(repeats))
    finally:
        ceiling.close()
