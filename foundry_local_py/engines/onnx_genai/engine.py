"""onnxruntime-genai engine: ONNX GenAI model folders (``genai_config.json``, ``model.onnx``, tokenizer).

Loading goes through ``og.Config``: the execution provider is chosen there (``clear_providers`` +
``append_provider``), and an overlay bounds the default KV buffer (``search.max_length``), sets the
static batch size and, optionally, the session's thread count. On the CPU the decoder graph is
handed over rewritten to compute logits for each row's last position only (:mod:`.graph`; a
prefill no longer multiplies every prompt position by the vocabulary matrix). A provider that
cannot start raises :class:`~foundry_local_py.errors.ModelLoadError`, so the loader can fall
back to another variant.

Decoding: :class:`~.lanes.EngineRunner` (``og.Engine`` lanes), or, when ``og.Engine`` cannot
serve a model (e.g. stateful execution providers that manage the KV cache),
:class:`~.generators.GeneratorRunner` (one ``og.Generator`` per sequence, stepped in turn).

Tokens are turned into bytes by one ``TokenizerStream`` per sequence, which returns only whole
characters (an empty string while a multi-byte character is incomplete), so no piece is broken
UTF-8. Chat templates are read from the model folder and rendered by the caller with
:mod:`..chat_template` (sandboxed); onnxruntime-genai's own template function is never used.

Every call to a runner, and ``create_runner`` itself, happens on the scheduler's worker thread:
``og.Engine`` refuses calls from any thread but the one that created it.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime_genai as og

from ...errors import EngineError, InvalidRequestError, ModelLoadError
from ..backends import ONNX_GENAI, ONNX_KEPT_BYTES, onnx_kv_values
from ..base import ChatTemplateSpec, Constraint, EngineInfo
from .common import constraint_to_guidance, is_grammar_error, scrub
from .generators import GeneratorRunner
from .graph import last_position_logits
from .lanes import EngineRunner, probe_batch_invariance, probe_mixed_lengths, probe_static_batch

log = logging.getLogger(__name__)

MAX_CONFIG_BYTES = 16 * 1024 * 1024
"""Largest JSON / template file read from a model folder (they are untrusted input)."""

# Our short provider names -> (onnxruntime-genai's name for append_provider, ORT provider, device).
OG_PROVIDERS: dict[str, tuple[str | None, str, str]] = {
    "cpu": (None, "CPUExecutionProvider", "cpu"),
    "cuda": ("cuda", "CUDAExecutionProvider", "gpu"),
    "dml": ("dml", "DmlExecutionProvider", "gpu"),
    "webgpu": ("WebGPU", "WebGpuExecutionProvider", "gpu"),
    "qnn": ("QNN", "QNNExecutionProvider", "npu"),
    "openvino": ("OpenVINO", "OpenVINOExecutionProvider", "gpu"),
}


@dataclass
class OrtGenaiOptions:
    execution_provider: str = "cpu"
    """'cpu', 'cuda', 'dml', 'webgpu', 'qnn' or 'openvino'."""
    max_batch: int = 4
    n_ctx: int | None = None
    """Per-sequence context. None: the model's context length capped at the backend's default."""
    n_threads: int | None = None
    """intra-op threads of the decoder session. None: onnxruntime's default (the physical cores)."""
    provider_options: dict[str, str] = field(default_factory=dict)
    """Extra options for the execution provider (``Config.set_provider_option``)."""
    runner: Literal["auto", "engine", "generator"] = "auto"
    """'auto': og.Engine lanes, og.Generator when the engine cannot serve the model."""
    kept_bytes: int = ONNX_KEPT_BYTES
    """KV memory of finished sequences' generators kept for prefix reuse (0: off)."""
    allow_batch_dependent_outputs: bool = False
    """Batch sequences even when :func:`~.lanes.probe_batch_invariance` finds that batching
    changes a row's logits (otherwise such a model decodes one sequence at a time)."""



def _last_position_graph(path: Path, decoder: dict[str, Any]) -> tuple[str, bytes] | None:
    """The decoder graph rewritten to compute logits for the last position only
    (:mod:`.graph`), as (file name, serialized graph) for ``og.Config.add_model_data``; None for
    a decoder that is not one ONNX file in the folder, or a graph the rewrite does not know."""
    filename = decoder.get("filename")
    if not isinstance(filename, str) or "pipeline" in decoder or Path(filename).name != filename:
        return None
    model_file = path / filename
    if not model_file.is_file():
        return None
    logits = (decoder.get("outputs") or {}).get("logits", "logits")
    graph = last_position_logits(model_file, str(logits))
    return None if graph is None else (filename, graph)


def _bos_to_add(path: Path, model_cfg: dict[str, Any]) -> int | None:
    """The BOS id when ``tokenizer_config.json`` says ``add_bos_token: true``, else None."""
    if not (_read_json(path / "tokenizer_config.json") or {}).get("add_bos_token"):
        return None
    bos = model_cfg.get("bos_token_id")
    if isinstance(bos, list):
        bos = bos[0] if bos else None
    return int(bos) if isinstance(bos, int) else None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        if not path.is_file():
            return None
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ModelLoadError(f"the model's {path.name} is too large")
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"the model's {path.name} could not be read ({type(exc).__name__})") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"the model's {path.name} is not a JSON object")
    return data


def _token_text(value: Any) -> str:
    """bos_token / eos_token in tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return ""


def read_chat_template(path: Path) -> ChatTemplateSpec | None:
    """The chat template a Hugging Face style model folder carries, or None.

    Looks at ``chat_template.jinja`` (transformers 5), then ``tokenizer_config.json``'s
    ``chat_template`` (a string, or a list of named templates: 'default' wins), then
    ``chat_template.json``. BOS / EOS strings come from ``tokenizer_config.json``.
    """
    tok_cfg = _read_json(path / "tokenizer_config.json") or {}
    source: Any = None
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        if jinja.stat().st_size > MAX_CONFIG_BYTES:
            raise ModelLoadError("the model's chat template is too large")
        try:
            source = jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelLoadError("the model's chat template could not be read") from exc
    if not source:
        source = tok_cfg.get("chat_template")
    if not source:
        source = (_read_json(path / "chat_template.json") or {}).get("chat_template")
    if isinstance(source, list):
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default") or next((t for t in named.values() if isinstance(t, str)), None)
    if not isinstance(source, str) or not source.strip():
        return None
    return ChatTemplateSpec(
        source=source,
        bos_token=_token_text(tok_cfg.get("bos_token")),
        eos_token=_token_text(tok_cfg.get("eos_token")),
    )



class OrtGenaiEngine:
    """An ONNX GenAI model folder loaded with onnxruntime-genai."""

    def __init__(self, path: Path, options: OrtGenaiOptions | None = None) -> None:
        self.options = opts = options or OrtGenaiOptions()
        self.path = path
        if opts.max_batch < 1:
            raise ModelLoadError("max_batch must be at least 1")
        provider = opts.execution_provider.lower()
        if provider not in OG_PROVIDERS:
            raise ModelLoadError(
                f"unknown execution provider '{opts.execution_provider}' "
                f"(known: {', '.join(sorted(OG_PROVIDERS))})"
            )
        genai_config = _read_json(path / "genai_config.json")
        if genai_config is None:
            raise ModelLoadError("the model folder has no genai_config.json (not an ONNX GenAI model)")
        model_cfg = genai_config.get("model") or {}
        search_cfg = genai_config.get("search") or {}
        n_ctx_train = int(model_cfg.get("context_length") or search_cfg.get("max_length") or 2048)
        n_ctx = opts.n_ctx or min(n_ctx_train, int(search_cfg.get("max_length") or n_ctx_train),
                                  ONNX_GENAI.default_context)
        n_ctx = min(n_ctx, n_ctx_train)
        self.n_ctx = n_ctx
        self._dynamic = isinstance((genai_config.get("engine") or {}).get("dynamic_batching"), dict)

        og_name, ort_name, device = OG_PROVIDERS[provider]
        self._model = self._load_model(path, model_cfg, og_name, provider, n_ctx)
        try:
            self._tokenizer = og.Tokenizer(self._model)
            self._tokenizer_plain = og.Tokenizer(self._model)
            self._tokenizer_plain.update_options(add_special_tokens="false")
        except Exception as exc:
            raise ModelLoadError(f"the model's tokenizer could not be loaded: {scrub(str(exc))}") from exc
        self._tok_lock = threading.Lock()
        self.eos_token_ids = frozenset(int(t) for t in self._tokenizer.eos_token_ids)
        self._eos = min(self.eos_token_ids) if self.eos_token_ids else -1
        self.n_vocab = int(model_cfg.get("vocab_size") or 0)
        self._bos_id = _bos_to_add(path, model_cfg)
        window = ((model_cfg.get("decoder") or {}).get("sliding_window") or {}).get("window_size")
        self.min_session = int(window) if isinstance(window, int) else 0
        """Smallest per-request KV buffer the model accepts (its sliding window, if any)."""
        self._template = read_chat_template(path)
        device_type = str(getattr(self._model, "device_type", "") or "").lower()
        if device_type == "cpu":
            device = "cpu"
        try:
            kv_values = onnx_kv_values(model_cfg.get("decoder") or {})
        except (ValueError, TypeError):
            kv_values = 0  # unknown: no prefix reuse (its budget could not be kept)
        self.kv_bytes_per_token = kv_values * (4 if device == "cpu" else 2)
        """KV bytes one token takes in every layer (fp32 on the CPU, fp16 elsewhere)."""
        batching, why = self._batching()
        self.info = EngineInfo(
            engine="onnxruntime-genai",
            model_path=path,
            device=device,
            execution_provider=ort_name,
            n_ctx=n_ctx,
            n_ctx_train=n_ctx_train,
            n_vocab=self.n_vocab,
            max_batch=opts.max_batch,
            capabilities=replace(ONNX_GENAI.capabilities, batching=batching, batching_reason=why),
            has_chat_template=self._template is not None,
            n_threads=opts.n_threads,
        )
        self._closed = False
        self._static_batch: int | None = None

    def _batching(self) -> tuple[bool, str]:
        """Whether sequences may share a batch, and why not: only where the runtime runs a batch of
        prompts of different lengths (:func:`~.lanes.probe_mixed_lengths`) and a batched row's
        logits are bitwise those of the row alone (issue 17: 4-bit MatMulNBits on AVX2 CPUs gives
        batched rows that differ, and greedy outputs that depend on their neighbours), unless the
        settings allow batch-dependent outputs (a runtime that fails batches is never batched)."""
        if self.options.max_batch <= 1:
            return True, ""
        mixed = probe_mixed_lengths(self)
        if mixed == "fails":
            why = "the runtime fails a batch of prompts of different lengths for this model"
        elif self.options.allow_batch_dependent_outputs or (mixed == "same" and probe_batch_invariance(self)):
            return True, ""
        else:
            why = ("on this machine the runtime computes a batched row differently from the row alone, "
                   "so batching would change outputs (allow_batch_dependent_outputs batches anyway)")
        log.warning("%s: its sequences are decoded one at a time: %s", self.path.name, why)
        return False, why

    def _load_model(self, path: Path, model_cfg: dict[str, Any], og_name: str | None, provider: str,
                    n_ctx: int) -> Any:
        """og.Model of the folder; on the CPU its decoder rewritten to compute logits for the last
        position only (:mod:`.graph`) unless that graph does not load."""
        config = self._make_config(path, og_name, provider, n_ctx)
        # CPU only: the rewrite is measured and tested there; GPU providers bind the logits
        # output themselves (IO binding, graph capture) and no GPU was available to test it.
        rewritten = _last_position_graph(path, model_cfg.get("decoder") or {}) if og_name is None else None
        self.last_position_logits = False
        """The decoder computes the LM head for each row's last position only (:mod:`.graph`)."""
        try:
            if rewritten is not None:
                try:
                    # og.Config borrows the buffer (a freed one crashes og.Model): kept for the
                    # engine's life, with the config
                    self._graph_data, self._graph_config = rewritten[1], config
                    config.add_model_data(rewritten[0], self._graph_data)
                    model = og.Model(config)
                    self.last_position_logits = True
                    return model
                except Exception as exc:  # load the model as it is
                    log.warning("%s did not load with its logits for the last position only (%s); "
                                "trying the graph unchanged", path.name, scrub(str(exc)))
                    config = self._make_config(path, og_name, provider, n_ctx)
            return og.Model(config)
        except Exception as exc:
            if og_name is not None:
                raise ModelLoadError(
                    f"the {provider} execution provider could not be initialised: {scrub(str(exc))}"
                ) from exc
            raise ModelLoadError(f"the ONNX model could not be loaded: {scrub(str(exc))}") from exc

    def _make_config(self, path: Path, og_name: str | None, provider: str, n_ctx: int) -> Any:
        opts = self.options
        try:
            config = og.Config(str(path))
        except Exception as exc:
            raise ModelLoadError(f"the model's genai_config.json is invalid: {scrub(str(exc))}") from exc
        overlay: dict[str, Any] = {"search": {"max_length": n_ctx}}
        batching = "dynamic_batching" if self._dynamic else "static_batching"
        overlay["engine"] = {batching: {"max_batch_size": opts.max_batch}}
        if opts.n_threads:
            overlay["model"] = {"decoder": {"session_options": {"intra_op_num_threads": opts.n_threads}}}
        try:
            config.overlay(json.dumps(overlay))
            config.clear_providers()
            if og_name is not None:
                config.append_provider(og_name)
                for key, value in opts.provider_options.items():
                    config.set_provider_option(og_name, key, value)
        except Exception as exc:
            raise ModelLoadError(
                f"the {provider} execution provider could not be configured: {scrub(str(exc))}"
            ) from exc
        return config

    # --- Engine protocol --------------------------------------------------------------------

    def chat_template(self) -> ChatTemplateSpec | None:
        return self._template

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        tokenizer = self._tokenizer if add_special else self._tokenizer_plain
        try:
            with self._tok_lock:
                ids = tokenizer.encode(text)
        except Exception as exc:
            raise EngineError("tokenization failed") from exc
        out = [int(t) for t in ids]
        # tokenizer_config.json may ask for BOS that onnxruntime-genai's tokenizer does not add
        # (a Gemma converted from GGUF: without it the model ends at once).
        if add_special and self._bos_id is not None and (not out or out[0] != self._bos_id):
            out.insert(0, self._bos_id)
        return out

    def detokenize(self, tokens: Sequence[int]) -> bytes:
        if not tokens:
            return b""
        with self._tok_lock:
            text = self._tokenizer.decode(np.asarray(tokens, dtype=np.int32))
        return str(text).encode("utf-8")

    def create_stream(self) -> Any:
        """A TokenizerStream: token ids in, whole characters out."""
        with self._tok_lock:
            return self._tokenizer.create_stream()

    def is_eos(self, token: int) -> bool:
        return token in self.eos_token_ids

    @property
    def eos_token(self) -> int:
        return self._eos

    def validate_constraint(self, constraint: Constraint) -> None:
        """Compile the guidance grammar once (any thread): 400 when it does not compile."""
        kind, data = constraint_to_guidance(constraint)
        try:
            params = og.GeneratorParams(self._model)
            params.set_search_options(max_length=2)
            params.set_guidance(kind, data)
            og.Generator(self._model, params)
        except Exception as exc:
            if is_grammar_error(exc):
                raise InvalidRequestError(
                    f"unsupported JSON schema: {scrub(str(exc))}", param="response_format"
                ) from exc
            # This model cannot take a probe generator: the grammar is compiled when the request starts.
            log.debug("guidance pre-check skipped: %s", exc)

    def create_runner(self) -> EngineRunner | GeneratorRunner:
        if self.options.runner != "generator":
            try:
                return EngineRunner(self)
            except Exception as exc:
                if self.options.runner == "engine":
                    raise ModelLoadError(
                        f"onnxruntime-genai's engine cannot serve this model: {scrub(str(exc))}"
                    ) from exc
                log.info("og.Engine unavailable for this model (%s); using og.Generator", exc)
        return GeneratorRunner(self)

    def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        raise InvalidRequestError(
            "this model runs on onnxruntime-genai, which does not expose embeddings", param="model"
        )

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            del self._tokenizer, self._tokenizer_plain
            del self._model

    @property
    def model(self) -> Any:
        return self._model

    def static_batch_size(self) -> int:
        """How many requests one static og.Engine decodes together (measured once per model).

        The static scheduler of onnxruntime-genai 0.18 starts at most 4 requests in a batch
        whatever ``engine.static_batching.max_batch_size`` says (``get_capabilities`` reports
        the configured value); the others wait in the engine until that whole batch is done.
        Lanes are therefore never given more than this: a request beyond it would get no token
        for a whole batch's time. Measured with one tiny probe batch on a throwaway engine.
        """
        if self._static_batch is None:
            self._static_batch = probe_static_batch(self, self.options.max_batch)
            log.debug("og.Engine static batch size: %d", self._static_batch)
        return self._static_batch

    @property
    def dynamic_batching(self) -> bool:
        """True for paged-attention models, whose og.Engine batches continuously by itself."""
        return self._dynamic

