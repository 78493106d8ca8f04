"""onnxruntime-genai engine: ONNX GenAI model folders (``genai_config.json``, ``model.onnx``, tokenizer).

Loading goes through ``og.Config``: the execution provider is chosen there (``clear_providers`` +
``append_provider``), and an overlay bounds the default KV buffer (``search.max_length``), sets the
static batch size and, optionally, the session's thread count. A provider that cannot start raises
:class:`~foundry_local_py.errors.ModelLoadError`, so the loader can fall back to another variant.

Decoding uses ``og.Engine`` (requests, turns, ``engine.run(event_buffer)``). On CPU, and for every
model built without paged attention, that engine batches *statically*: a batch is formed from the
requests waiting when it starts, and a request added while it runs waits until the whole batch is
done, and a cancelled request's row is not reused before then. A serving loop cannot accept that
head-of-line blocking, so :class:`_EngineRunner` keeps several engines ("lanes") on one model: the
requests the scheduler admits between two steps start together in one lane (batched), a request
admitted later starts at once in another (idle or new) lane, and every step runs each busy lane
once. A lane takes at most as many requests as the static scheduler starts in one batch (4 in
onnxruntime-genai 0.18, whatever ``max_batch_size`` says; measured once per model by
:meth:`OrtGenaiEngine.static_batch_size`): a fifth would wait in the engine for the whole batch.
Removing a request cancels and closes it in its lane at once: it produces no further token
and its place in the runner's ``max_batch`` goes to the next request immediately. Engines are cheap
(they share the model's sessions); their KV buffers are sized per request by
``RequestOptions.set_max_session_tokens``.

When ``og.Engine`` cannot serve a model (e.g. stateful execution providers that manage the KV
cache), :class:`_GeneratorRunner` falls back to one ``og.Generator`` per sequence, stepped in turn.
The static engine also refuses per-request seeds, so seeded sampling requests go to such a
generator inside the engine runner (same protocol, same ``max_batch``).

Prefix reuse (og.Engine requests keep no KV between requests): a greedy request that arrives when
nothing else runs, and no two sequences ran together in the last 30 s, also goes to a generator,
which decodes alone as fast as a lane (under concurrency lanes batch: a generator beside a lane
costs a model run of its own every step, 20% of c=4 throughput measured). When it ends
the generator is kept (``prompt_cache_mib`` of KV per model, default 64); a later greedy prompt
sharing 16 or more tokens with a kept one rewinds that generator to the shared prefix and
prefills only the rest. The rest is always at least 2 tokens: onnxruntime's kernels compute a
prefill of two or more rows row for row alike, but a one-row prefill takes the decode kernels,
which round differently. So a reused prefix gives bitwise the logits of a fresh prefill, and the
same tokens as alone (``tests/integration/test_batch_invariance.py``).

Tokens are turned into bytes by one ``TokenizerStream`` per sequence, which returns only whole
characters (an empty string while a multi-byte character is incomplete), so no piece is broken
UTF-8. Chat templates are read from the model folder and rendered by the caller with
:mod:`.chat_template` (sandboxed); onnxruntime-genai's own template function is never used.

Every call to a runner, and ``create_runner`` itself, happens on the scheduler's worker thread:
``og.Engine`` refuses calls from any thread but the one that created it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime_genai as og

from ..errors import ContextLengthExceededError, EngineError, InvalidRequestError, ModelLoadError
from .backends import ONNX_GENAI, ONNX_KEPT_BYTES
from .base import (
    ChatTemplateSpec,
    Constraint,
    EngineInfo,
    GenerationRequest,
    SamplingParams,
    SequenceFailure,
    TokenOutput,
)
from .prompt_cache import common_prefix

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

MIN_REUSE = 16
"""Prompt tokens a kept generator must share with a new prompt to serve it."""
MIN_FRESH = 2
"""Prompt tokens always computed anew on a reused generator: a one-row prefill takes the decode
kernels, whose roundings differ from those of a prefill of two or more rows (which give each row
bitwise the same result whatever rows surround it)."""
CAPACITY_STEP = 256
"""A reusable generator's KV buffer is sized up to a multiple of this, so a later prompt that
extends its own fits in it."""
QUIET_S = 30.0
"""Requests go to reusable generators only after this long without two sequences running
together: one user, or an agent loop, at a time. A burst after a shorter pause is taken as the
traffic it is (a generator beside a lane costs a model run of its own every step)."""

_FLAG_TOKEN = int(og.EngineEventFlags.TOKEN.value)
_FLAG_FINISHED = int(og.EngineEventFlags.TURN_FINISHED.value)
_FLAG_FAILED = int(og.EngineEventFlags.FAILED.value)
_PATHISH = re.compile(r"(?:[A-Za-z]:)?[\\/][^\s'\"]+")


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


def _scrub(text: str) -> str:
    """An onnxruntime-genai error message without filesystem paths, short enough for a client."""
    return _PATHISH.sub("<path>", text).strip()[:300]


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


def constraint_to_guidance(constraint: Constraint) -> tuple[str, str]:
    """An engine-neutral constraint as onnxruntime-genai guidance: ('json_schema', schema text)."""
    schema = constraint.schema if constraint.schema is not None else {"type": "object"}
    try:
        return "json_schema", json.dumps(schema)
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidRequestError("the JSON schema is not valid JSON", param="response_format") from exc


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
        config = self._make_config(path, og_name, provider, n_ctx)
        try:
            self._model = og.Model(config)
        except Exception as exc:
            if og_name is not None:
                raise ModelLoadError(
                    f"the {provider} execution provider could not be initialised: {_scrub(str(exc))}"
                ) from exc
            raise ModelLoadError(f"the ONNX model could not be loaded: {_scrub(str(exc))}") from exc
        try:
            self._tokenizer = og.Tokenizer(self._model)
            self._tokenizer_plain = og.Tokenizer(self._model)
            self._tokenizer_plain.update_options(add_special_tokens="false")
        except Exception as exc:
            raise ModelLoadError(f"the model's tokenizer could not be loaded: {_scrub(str(exc))}") from exc
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
        decoder = model_cfg.get("decoder") or {}
        kv_width = 2 * int(decoder.get("num_hidden_layers") or 0) * int(
            decoder.get("num_key_value_heads") or 0) * int(decoder.get("head_size") or 0)
        self.kv_bytes_per_token = kv_width * (4 if device == "cpu" else 2)
        """KV bytes one token takes in every layer (fp32 on the CPU, fp16 elsewhere)."""
        self.info = EngineInfo(
            engine="onnxruntime-genai",
            model_path=path,
            device=device,
            execution_provider=ort_name,
            n_ctx=n_ctx,
            n_ctx_train=n_ctx_train,
            n_vocab=self.n_vocab,
            max_batch=opts.max_batch,
            capabilities=ONNX_GENAI.capabilities,
            has_chat_template=self._template is not None,
            n_threads=opts.n_threads,
        )
        self._closed = False
        self._static_batch: int | None = None

    def _make_config(self, path: Path, og_name: str | None, provider: str, n_ctx: int) -> Any:
        opts = self.options
        try:
            config = og.Config(str(path))
        except Exception as exc:
            raise ModelLoadError(f"the model's genai_config.json is invalid: {_scrub(str(exc))}") from exc
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
                f"the {provider} execution provider could not be configured: {_scrub(str(exc))}"
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
            if _is_grammar_error(exc):
                raise InvalidRequestError(
                    f"unsupported JSON schema: {_scrub(str(exc))}", param="response_format"
                ) from exc
            # This model cannot take a probe generator: the grammar is compiled when the request starts.
            log.debug("guidance pre-check skipped: %s", exc)

    def create_runner(self) -> _EngineRunner | _GeneratorRunner:
        if self.options.runner != "generator":
            try:
                return _EngineRunner(self)
            except Exception as exc:
                if self.options.runner == "engine":
                    raise ModelLoadError(
                        f"onnxruntime-genai's engine cannot serve this model: {_scrub(str(exc))}"
                    ) from exc
                log.info("og.Engine unavailable for this model (%s); using og.Generator", exc)
        return _GeneratorRunner(self)

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
            self._static_batch = _probe_static_batch(self, self.options.max_batch)
            log.debug("og.Engine static batch size: %d", self._static_batch)
        return self._static_batch

    @property
    def dynamic_batching(self) -> bool:
        """True for paged-attention models, whose og.Engine batches continuously by itself."""
        return self._dynamic


# --- shared request preparation ---------------------------------------------------------------


@dataclass
class _Budget:
    max_new: int
    """Tokens this sequence may generate (request's max_tokens, capped by the context)."""
    session: int
    """Prompt + generated tokens."""
    ctx_limited: bool
    """True when the context, not max_tokens, bounds the sequence."""


def _budget(engine: OrtGenaiEngine, request: GenerationRequest) -> _Budget:
    prompt = request.prompt_tokens
    n_ctx = engine.n_ctx
    if not 0 < len(prompt) < n_ctx:  # validation keeps such requests out
        raise EngineError(f"a prompt of {len(prompt)} tokens does not fit this runner")
    room = n_ctx - len(prompt)
    max_new = max(1, request.max_tokens)
    # The KV buffer is sized from the session; sliding-window models (Gemma 3) refuse one smaller
    # than their window, whatever the request needs.
    session = max(len(prompt) + min(max_new, room), min(engine.min_session, n_ctx))
    return _Budget(min(max_new, room), session, max_new > room)


def _seed(sp: SamplingParams) -> int:
    return secrets.randbits(32) if sp.seed is None else sp.seed % (1 << 63)


# --- og.Engine runner ---------------------------------------------------------------------


def _probe_static_batch(owner: OrtGenaiEngine, wanted: int) -> int:
    """Requests a fresh static og.Engine starts in its first batch when ``wanted`` wait (<= wanted)."""
    if wanted <= 1:
        return 1
    engine = og.Engine(owner.model)
    buffer = engine.create_event_buffer(4 * wanted + 16)
    prompt = np.asarray(owner.tokenize("Hi", add_special=False) or [max(owner.eos_token, 0)], dtype=np.int32)
    session = max(len(prompt) + 1, min(owner.min_session, owner.n_ctx))
    requests = []
    try:
        for _ in range(wanted):
            options = og.RequestOptions()
            options.set_max_session_tokens(session)
            request = engine.create_request(options=options)
            requests.append(request)
            turn = og.TurnOptions(request)
            turn.set_max_generated_tokens(1)
            turn.set_do_sample(False)
            request.begin_turn(prompt, turn)
        events = engine.run(buffer)
        started = {id(events[i].request) for i in range(len(events))
                   if int(events[i].flags.value) & (_FLAG_TOKEN | _FLAG_FINISHED)}
    except Exception as exc:  # the probe is an optimisation: without it, lanes of max_batch
        log.info("could not measure og.Engine's static batch size (%s)", exc)
        return wanted
    finally:
        for request in requests:
            with contextlib.suppress(Exception):
                request.close()
    return max(1, min(wanted, len(started)))


@dataclass(eq=False)
class _Seq:
    request_id: str
    request: Any
    """og.Request"""
    turn_id: int
    stream: Any
    """og.TokenizerStream"""
    lane: _Lane
    budget: _Budget
    finished: bool = False


@dataclass(eq=False)
class _Lane:
    engine: Any
    """og.Engine: one static batch at a time."""
    buffer: Any
    members: dict[int, _Seq] = field(default_factory=dict)
    """By id() of the og.Request."""
    started: bool = False
    """Its batch has run: requests added now would wait for the whole batch to finish."""

    def idle(self) -> bool:
        return not self.members and not self.engine.has_pending_requests()


class _EngineRunner:
    """Continuous batching over og.Engine lanes (see the module docstring)."""

    def __init__(self, owner: OrtGenaiEngine) -> None:
        self.owner = owner
        self.max_batch = owner.options.max_batch
        self._continuous = owner.dynamic_batching
        """Paged-attention models: one engine admits new requests into its running batch."""
        self._lanes: list[_Lane] = [self._new_lane()]  # fails here, on this thread, if unsupported
        self.lane_size = self.max_batch if self._continuous else owner.static_batch_size()
        """Most requests one lane takes: more would wait in the engine for the whole batch."""
        self._by_request: dict[str, _Seq] = {}
        self._solo = _GeneratorRunner(owner)
        """Requests the static engine cannot take (per-request seeds), and prefix reuse."""
        self._crowded_at = -QUIET_S
        """When two or more sequences last ran together (monotonic seconds)."""

    def _new_lane(self) -> _Lane:
        engine = og.Engine(self.owner.model)
        return _Lane(engine, engine.create_event_buffer(4 * self.max_batch + 16))

    def _open_lane(self) -> _Lane:
        for lane in self._lanes:
            if (self._continuous or not lane.started) and len(lane.members) < self.lane_size:
                return lane
        for lane in self._lanes:
            if lane.idle():
                lane.started = False
                return lane
        lane = self._new_lane()
        self._lanes.append(lane)
        return lane

    # --- protocol -----------------------------------------------------------------------

    def kv_usage(self) -> float:
        """An estimate: onnxruntime-genai does not report its KV use. Each running request's KV
        buffer is sized for its whole session (prompt + the tokens it may generate) when it
        starts, so the reserved tokens over n_ctx x slots is what this returns (an upper bound on
        the cells written so far)."""
        reserved = sum(seq.budget.session for seq in self._by_request.values()) + self._solo.reserved()
        return reserved / (self.owner.n_ctx * self.max_batch)

    def add(self, request: GenerationRequest) -> int:
        if request.request_id in self._by_request or self._solo.has(request.request_id):
            raise EngineError("duplicate request id")
        sp = request.sampling
        if not self._continuous and sp.temperature > 0.0 and sp.seed is not None:
            # "A per-turn seed requires an Engine configured for dynamic batching"
            return self._solo.add(request)
        now = time.monotonic()
        if self._by_request or self._solo.active():
            self._crowded_at = now
        elif self._solo.reuses(request) and now - self._crowded_at >= QUIET_S:
            # One request at a time: a generator decodes as fast as a lane, and can reuse a kept
            # prefix (and leave its own for the next request). Under concurrency, lanes batch
            # requests: a generator beside a lane would cost a model run of its own every step.
            return self._solo.add(request)
        budget = _budget(self.owner, request)
        guidance = constraint_to_guidance(sp.constraint) if sp.constraint is not None else None
        lane = self._open_lane()
        og_request = None
        try:
            options = og.RequestOptions()
            options.set_max_session_tokens(budget.session)
            og_request = lane.engine.create_request(options=options)
            turn = og.TurnOptions(og_request)
            turn.set_max_generated_tokens(budget.max_new)
            _apply_sampling(turn, sp)
            if guidance is not None:
                turn.set_guidance(*guidance)
            turn_id = og_request.begin_turn(np.asarray(request.prompt_tokens, dtype=np.int32), turn)
        except Exception as exc:
            if og_request is not None:
                og_request.close()
            raise _start_error(exc, guidance is not None) from exc
        seq = _Seq(request.request_id, og_request, int(turn_id), self.owner.create_stream(), lane, budget)
        lane.members[id(og_request)] = seq
        self._by_request[request.request_id] = seq
        return 0  # og.Engine keeps no KV between requests

    def remove(self, request_id: str) -> None:
        seq = self._by_request.pop(request_id, None)
        if seq is None:
            self._solo.remove(request_id)
            return
        seq.lane.members.pop(id(seq.request), None)
        try:
            if not seq.finished:
                seq.request.cancel_turn(seq.turn_id)
            seq.request.close()  # leaves the engine now: no more events, its row is released
        except Exception:
            log.exception("closing an onnxruntime-genai request failed")

    def step(self) -> list[TokenOutput | SequenceFailure]:
        outputs: list[TokenOutput | SequenceFailure] = []
        for lane in self._lanes:
            if not lane.members and not lane.engine.has_pending_requests():
                continue
            lane.started = True
            try:
                events = lane.engine.run(lane.buffer)
            except Exception as exc:
                log.error("og.Engine.run failed: %s", exc)
                for seq in list(lane.members.values()):
                    if not seq.finished:
                        seq.finished = True
                        outputs.append(SequenceFailure(seq.request_id, EngineError(
                            "the inference engine could not decode this batch")))
                continue
            for i in range(len(events)):
                self._translate(lane, events[i], outputs)
        self._prune()
        if self._solo.active():
            outputs.extend(self._solo.step())
        return outputs

    def close(self) -> None:
        for request_id in list(self._by_request):
            self.remove(request_id)
        self._solo.close()
        self._lanes.clear()

    # --- helpers ------------------------------------------------------------------------

    def _translate(self, lane: _Lane, event: Any, out: list[TokenOutput | SequenceFailure]) -> None:
        seq = lane.members.get(id(event.request))
        if seq is None or seq.request is not event.request or seq.finished:
            return
        flags = int(event.flags.value)
        rid = seq.request_id
        if flags & _FLAG_FAILED:
            seq.finished = True
            code = getattr(event.error_code, "name", "unknown").lower()
            error = EngineError(f"the inference engine failed this request ({code})")
            out.append(SequenceFailure(rid, error))
            return
        if flags & _FLAG_TOKEN and event.token is not None:
            token = int(event.token)
            if self.owner.is_eos(token):
                seq.finished = True
                out.append(TokenOutput(rid, token, b"", end_of_generation=True))
                return
            out.append(TokenOutput(rid, token, str(seq.stream.decode(token)).encode("utf-8")))
        if flags & _FLAG_FINISHED:
            seq.finished = True
            out.extend(_finish_outputs(seq.request_id, event.finish_reason, seq.budget, self.owner.eos_token))

    def _prune(self) -> None:
        """Keep one idle lane for the next batch; drop the other idle ones (their buffers)."""
        idle = [lane for lane in self._lanes if lane.idle()]
        for lane in idle[1:]:
            self._lanes.remove(lane)


def _is_grammar_error(exc: Exception) -> bool:
    return "grammar" in str(exc).lower()  # onnxruntime-genai: "Error creating grammar: ..."


def _start_error(exc: Exception, guided: bool) -> InvalidRequestError | EngineError:
    """The error a client sees when onnxruntime-genai refuses to start a request."""
    if guided and _is_grammar_error(exc):
        return InvalidRequestError(f"unsupported JSON schema: {_scrub(str(exc))}", param="response_format")
    log.warning("onnxruntime-genai could not start a request: %s", exc)
    return EngineError("the inference engine could not start this request")


def _apply_sampling(turn: Any, sp: SamplingParams) -> None:
    if sp.temperature <= 0.0:
        turn.set_do_sample(False)
        turn.set_temperature(0.0)
    else:
        turn.set_do_sample(True)
        turn.set_temperature(float(sp.temperature))
        turn.set_top_p(min(max(float(sp.top_p), 1e-6), 1.0))
        turn.set_top_k(max(int(sp.top_k), 0))
        if sp.seed is not None:  # only dynamic engines take one; unseeded turns use the engine's RNG
            turn.set_seed(_seed(sp))
    if sp.repeat_penalty > 0 and sp.repeat_penalty != 1.0:
        turn.set_repetition_penalty(float(sp.repeat_penalty))


def _finish_outputs(
    request_id: str, reason: Any, budget: _Budget, eos: int
) -> list[TokenOutput | SequenceFailure]:
    """What a finished turn means for the scheduler.

    EOS ends the sequence. Reaching max_tokens is the scheduler's to report (it counts tokens and
    has already finished the request when this arrives: the extra end marker is then ignored).
    Running out of context fails the sequence, as the llama.cpp engine does.
    """
    name = getattr(reason, "name", str(reason))
    if name == "CANCELLED":
        return [SequenceFailure(request_id, EngineError("the inference engine cancelled this request"))]
    if name == "FAILED":
        return [SequenceFailure(request_id, EngineError("the inference engine failed this request"))]
    if name in ("MAX_SESSION_TOKENS", "MAX_GENERATED_TOKENS") and budget.ctx_limited:
        return [SequenceFailure(request_id, ContextLengthExceededError(
            f"the sequence reached the context length ({budget.session} tokens)"))]
    return [TokenOutput(request_id, eos, b"", end_of_generation=True)]


# --- og.Generator runner and prefix reuse ----------------------------------------------------


def reuse_key(sp: SamplingParams) -> tuple[float] | None:
    """The search options under which a kept generator's KV may serve a request, or None when
    it may not: only greedy, unconstrained requests (a sampler's RNG state and a grammar's state
    cannot be rewound). Requests with the same key behave alike on the same KV."""
    if sp.temperature > 0.0 or sp.constraint is not None:
        return None
    return (float(sp.repeat_penalty) if sp.repeat_penalty > 0 else 1.0,)


@dataclass(eq=False)
class _Kept:
    """A finished sequence's generator, kept for a later prompt that starts like its own."""

    generator: Any
    tokens: list[int]
    """The prompt whose KV it holds: every position computed by a prefill of >= MIN_FRESH rows
    (generated tokens are not reused: the decode kernels computed their KV)."""
    capacity: int
    """Its KV buffer (``max_length``), in tokens."""
    key: tuple[float]


@dataclass(eq=False)
class _GenSeq:
    request_id: str
    generator: Any
    stream: Any
    prompt: list[int] | None
    """Prompt still to feed (the first step prefills)."""
    budget: _Budget
    tokens: list[int]
    """The whole prompt."""
    capacity: int
    key: tuple[float] | None
    """:func:`reuse_key`; None: not kept when it ends."""
    generated: int = 0
    failed: bool = False


class _GeneratorRunner:
    """One og.Generator per sequence, each advanced by one token per step (no batched compute).

    Prefix reuse: when a greedy sequence ends, its generator is kept (least recently used first
    out, within ``kept_bytes`` of KV). A later greedy request whose prompt shares at least
    :data:`MIN_REUSE` tokens with a kept prompt takes that generator, rewinds it to the shared
    prefix (``Generator.rewind_to``) and prefills only the rest, always at least
    :data:`MIN_FRESH` tokens, so its logits are bitwise those of a fresh prefill (tested: the same
    tokens as alone). llama.cpp's slots and vLLM's prefix cache do the same with their KV."""

    def __init__(self, owner: OrtGenaiEngine) -> None:
        self.owner = owner
        self.max_batch = owner.options.max_batch
        self._seqs: dict[str, _GenSeq] = {}
        self._kept: list[_Kept] = []
        """Least recently used first."""
        per_token = max(owner.kv_bytes_per_token, 1)
        self._kept_tokens = owner.options.kept_bytes // per_token
        """Bound on the kept generators' capacities (0: no reuse)."""

    def active(self) -> int:
        return len(self._seqs)

    def has(self, request_id: str) -> bool:
        return request_id in self._seqs

    def reserved(self) -> int:
        """KV tokens the running generators were sized for."""
        return sum(seq.budget.session for seq in self._seqs.values())

    def kv_usage(self) -> float:
        return self.reserved() / (self.owner.n_ctx * self.max_batch)

    def reuses(self, request: GenerationRequest) -> bool:
        """True when this request's generator would be kept for reuse when it ends."""
        return self._kept_tokens >= CAPACITY_STEP and reuse_key(request.sampling) is not None

    def kept(self) -> int:
        """Generators kept for prefix reuse."""
        return len(self._kept)

    def add(self, request: GenerationRequest) -> int:
        if request.request_id in self._seqs:
            raise EngineError("duplicate request id")
        budget = _budget(self.owner, request)
        prompt = list(request.prompt_tokens)
        key = reuse_key(request.sampling) if self.reuses(request) else None
        capacity = budget.session
        if key is not None:
            # Room for a later prompt that extends this one.
            capacity = max(budget.session, min(self.owner.n_ctx,
                                               -(-budget.session // CAPACITY_STEP) * CAPACITY_STEP))
            crowded = sum(k.capacity for k in self._kept) + capacity > self._kept_tokens
            hit = self._take(prompt, budget.session, key, partial=crowded)
            if hit is not None:
                kept, shared = hit
                self._seqs[request.request_id] = _GenSeq(
                    request.request_id, kept.generator, self.owner.create_stream(), prompt[shared:],
                    budget, prompt, kept.capacity, key)
                return shared
        generator = self._new_generator(request.sampling, capacity)
        self._seqs[request.request_id] = _GenSeq(
            request.request_id, generator, self.owner.create_stream(), prompt, budget, prompt,
            capacity, key)
        return 0

    def _new_generator(self, sp: SamplingParams, capacity: int) -> Any:
        params = og.GeneratorParams(self.owner.model)
        search: dict[str, Any] = {"max_length": capacity, "do_sample": sp.temperature > 0.0}
        if sp.temperature > 0.0:
            search.update(temperature=float(sp.temperature), top_p=min(max(float(sp.top_p), 1e-6), 1.0),
                          top_k=max(int(sp.top_k), 0), random_seed=_seed(sp) % (1 << 31))
        if sp.repeat_penalty > 0 and sp.repeat_penalty != 1.0:
            search["repetition_penalty"] = float(sp.repeat_penalty)
        guidance = constraint_to_guidance(sp.constraint) if sp.constraint is not None else None
        try:
            params.set_search_options(**search)
            if guidance is not None:
                params.set_guidance(*guidance)
            return og.Generator(self.owner.model, params)
        except Exception as exc:
            raise _start_error(exc, guidance is not None) from exc

    def _take(self, prompt: list[int], session: int, key: tuple[float], *,
              partial: bool) -> tuple[_Kept, int] | None:
        """The kept generator sharing the longest prefix with ``prompt`` (at least MIN_REUSE
        tokens, at most all but MIN_FRESH), rewound to it; None when none qualifies.

        Taking a generator ends its own prompt's reuse. So one whose whole prompt ``prompt``
        repeats or extends (a repeat, a conversation's next turn) is taken first, and one that
        shares less (a system prompt) only when ``partial``: when keeping one more generator
        would push another out anyway (llama-server likewise reuses a slot only for a similar
        prompt)."""
        best: tuple[bool, int, int] | None = None
        want = np.asarray(prompt, dtype=np.int64)
        for i, kept in enumerate(self._kept):
            if kept.key != key or kept.capacity < session:
                continue
            common = common_prefix(np.asarray(kept.tokens, dtype=np.int64), want)
            whole = common == len(kept.tokens)
            shared = min(common, len(prompt) - MIN_FRESH)
            if shared < MIN_REUSE or not (whole or partial):
                continue
            if best is None or (whole, shared) > best[:2]:
                best = (whole, shared, i)
        if best is None:
            return None
        _, shared, i = best
        kept = self._kept.pop(i)
        try:
            kept.generator.rewind_to(shared)
        except Exception as exc:
            log.warning("could not rewind a kept og.Generator (%s); prefilling anew", exc)
            return None
        return kept, shared

    def _keep(self, seq: _GenSeq) -> None:
        if seq.key is None or seq.failed or seq.prompt is not None:
            return  # not greedy, failed, or its prompt never reached the model
        self._kept.append(_Kept(seq.generator, seq.tokens, seq.capacity, seq.key))
        while self._kept and sum(k.capacity for k in self._kept) > self._kept_tokens:
            self._kept.pop(0)

    def remove(self, request_id: str) -> None:
        seq = self._seqs.pop(request_id, None)
        if seq is not None:
            self._keep(seq)  # else dropping the generator frees its KV cache

    def step(self) -> list[TokenOutput | SequenceFailure]:
        outputs: list[TokenOutput | SequenceFailure] = []
        for seq in list(self._seqs.values()):
            if seq.budget.max_new <= seq.generated:
                continue
            try:
                if seq.prompt is not None:
                    seq.generator.append_tokens(np.asarray(seq.prompt, dtype=np.int32))
                    seq.prompt = None
                seq.generator.generate_next_token()
                token = int(seq.generator.get_next_tokens()[0])
            except Exception as exc:
                log.error("og.Generator step failed: %s", exc)
                seq.generated = seq.budget.max_new
                seq.failed = True
                outputs.append(SequenceFailure(seq.request_id, EngineError(
                    "the inference engine could not decode this sequence")))
                continue
            seq.generated += 1
            if self.owner.is_eos(token):
                seq.generated = seq.budget.max_new
                outputs.append(TokenOutput(seq.request_id, token, b"", end_of_generation=True))
                continue
            outputs.append(TokenOutput(seq.request_id, token, str(seq.stream.decode(token)).encode("utf-8")))
            if seq.generated >= seq.budget.max_new or seq.generator.is_done():
                seq.generated = seq.budget.max_new
                outputs.extend(_finish_outputs(seq.request_id, "MAX_GENERATED_TOKENS", seq.budget,
                                               self.owner.eos_token))
        return outputs

    def close(self) -> None:
        self._seqs.clear()
        self._kept.clear()
