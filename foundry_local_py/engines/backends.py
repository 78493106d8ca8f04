"""Engine backends as registered descriptors: what each model format needs, in one place.

A :class:`Backend` says which format it serves, how to recognise and check its files, whether its
runtime is installed here, which execution providers it can drive, the context it uses by
default, what it can do (:class:`Capabilities`), how to estimate the memory a loaded model takes,
and how to load one. The factory, the cache (registration, local checks), the hardware choice and
the Foundry routes look a backend up here instead of branching on format strings.

Adding an engine: one module with the engine, one :class:`Backend` added to :data:`BACKENDS`.

Nothing here imports a heavy runtime: each backend imports its engine module when it loads a model.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

from ..errors import InvalidRequestError, ModelLoadError

if TYPE_CHECKING:
    from ..hardware.inventory import HardwareInventory
    from .base import Engine

DEFAULT_CONTEXT = 4096
"""Context per request of an engine without a shared KV pool (ONNX, llama.cpp in deterministic
mode) unless a setting says otherwise (Ollama's default): its KV cache holds ``max_batch`` of
these, so a small model's full 8k-32k would cost hundreds of MB."""

ONNX_KEPT_BYTES = 64 << 20
"""Default KV memory per ONNX model held by finished greedy sequences for prefix reuse."""
KV_POOL_MIN = 4096
KV_POOL_MAX = 16384
KV_POOL_MEMORY_SHARE = 8
"""The default pool takes at most 1 / this of the memory budget."""
KV_CACHE_TYPES: Mapping[str, float] = MappingProxyType({"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32})
"""KV cache element types (llama.cpp's -ctk / -ctv) and their bytes per element (q8_0 and q4_0
store blocks of 32 values with one f16 scale)."""
KV_CACHE_AUTO_CPU = ("q8_0", "f16")
"""(K, V) types of ``kv_cache_type`` 'auto' on the CPU: K in q8_0, V in f16. The pool is 24%
smaller (SmolLM2: 138 instead of 180 MiB at 8192 cells) and decoding as fast (llama.cpp alone,
2 threads: 88-99 vs 82-90 tok/s after a 256-token prompt, 39-41 vs 42 after 2048); prefill of
long prompts is slower (ggml's CPU flash attention takes a row-by-row path for a quantized K:
0.90x f16's speed at 256 tokens, 0.72x at 768, 0.58x at 2048). Fidelity, teacher-forced over
2,682 tokens: perplexity 21.85 vs 21.92, next token as f16's at 96.6% of positions."""

SamplingField = Literal[
    "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
    "repeat_penalty", "logit_bias",
]
SAMPLING_FIELDS: tuple[SamplingField, ...] = (
    "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
    "repeat_penalty", "logit_bias",
)


@dataclass(frozen=True)
class Capabilities:
    """What an engine honours. A request asking for anything else is refused (400), not ignored."""

    sampling: frozenset[SamplingField]
    """Sampling fields the engine applies as their names say."""
    logprobs: bool = False
    """Per-token logprobs and top alternatives."""
    constraints: bool = False
    """Structured output (json_object / json_schema, forced tool calls)."""
    embeddings: bool = False
    lora_adapters: bool = False
    """Serves LoRA adapters per request (``GenerationRequest.lora``)."""
    prefix_cache: bool = False
    """Reuses cached KV for a shared prompt prefix (reported as cached_tokens)."""
    kv_pool: bool = False
    """One KV pool shared by all slots (``kv_tokens``), outside deterministic mode: a request
    may use the model's whole context, admission waits for KV room."""
    max_batch: int | None = None
    """Largest number of sequences decoded together; None: as many as the settings ask."""
    deterministic: bool = False
    """Can run in deterministic mode (``Settings.deterministic``): at temperature 0 or with a seed,
    the same request gives the same tokens whatever else runs, is cached or arrived first."""
    batching: bool = True
    """Decodes concurrent sequences in one batch. False for a loaded model whose runtime computes a
    batched row differently from the same row alone (measured at load; e.g. onnxruntime's 4-bit
    MatMulNBits on AVX2 CPUs): its sequences then run one at a time, side by side, so each gives
    what it gives alone (``allow_batch_dependent_outputs`` batches them anyway), or whose runtime
    fails a batch of prompts of different lengths."""
    batching_reason: str = ""
    """Why ``batching`` is False, in words (``model info`` shows it)."""


@dataclass(frozen=True)
class EngineOptions:
    """What the model manager asks of any backend when it loads a model."""

    n_threads: int
    max_batch: int
    n_ctx: int | None = None
    """Context per request; None: the model's, capped at :data:`DEFAULT_CONTEXT`."""
    execution_provider: str = "cpu"
    """'cpu', 'cuda', 'dml', ... (lower-case short names)."""
    prompt_cache_bytes: int | None = None
    """Host prompt cache; None: derived from the KV cache's size (:func:`plan_kv`)."""
    deterministic: bool = False
    """Deterministic mode (the backend's ``Capabilities.deterministic`` must be True)."""
    max_loras: int = 4
    """LoRA adapters kept loaded (engines with ``Capabilities.lora_adapters``)."""
    kv_tokens: int | None = None
    """Cells of the shared KV pool; None: derived (:func:`default_kv_tokens`)."""
    kv_cache_type: str = "auto"
    """'auto' (:func:`kv_types`), one of :data:`KV_CACHE_TYPES` for K and V, or 'K/V'."""
    allow_batch_dependent_outputs: bool = False
    """Batch sequences even where the runtime's batched kernels change their tokens."""
    memory_budget: int | None = None
    """The model manager's memory budget (bytes), which bounds the default pool."""


@dataclass(frozen=True)
class KvPlan:
    """How a model's KV cache is laid out, from its options and its geometry."""

    pooled: bool
    """One pool shared by all sequences (else one stream of ``n_ctx`` cells per slot)."""
    n_ctx: int
    """Longest request (prompt + completion)."""
    kv_tokens: int
    """Cells in the whole KV cache."""
    bytes_per_token: int
    """At the chosen cache types, all layers."""
    prompt_cache_bytes: int
    cache_types: tuple[str, str] = ("f16", "f16")
    """(K, V) element types."""

    @property
    def cache_type(self) -> str:
        """'f16', or 'q8_0/f16' when K and V differ (as reported by /v1/slots and model info)."""
        k, v = self.cache_types
        return k if k == v else f"{k}/{v}"

    @property
    def kv_bytes(self) -> int:
        return self.kv_tokens * self.bytes_per_token


def kv_types(cache_type: str, *, gpu: bool) -> tuple[str, str]:
    """The (K, V) element types of a ``kv_cache_type`` setting: 'auto' is
    :data:`KV_CACHE_AUTO_CPU` on the CPU and f16 for both when layers are offloaded (GPU flash
    attention kernels are built for equal K and V types); 'q8_0' both; 'q8_0/f16' K and V."""
    if cache_type == "auto":
        return ("f16", "f16") if gpu else KV_CACHE_AUTO_CPU
    k, _, v = cache_type.partition("/")
    types = (k, v or k)
    for t in types:
        if t not in KV_CACHE_TYPES:
            raise ModelLoadError(f"unknown KV cache type '{cache_type}' (auto, one of "
                                 f"{', '.join(KV_CACHE_TYPES)}, or K/V such as q8_0/f16)")
    return types


def kv_bytes_per_token(f16_bytes: int, types: tuple[str, str]) -> int:
    """A token's KV bytes with K and V stored as ``types``, from its size at f16 (half K, half V)."""
    k, v = types
    return int(f16_bytes * (KV_CACHE_TYPES[k] + KV_CACHE_TYPES[v]) / 4)


def default_kv_tokens(n_ctx: int, bytes_per_token: int, memory_budget: int | None) -> int:
    """The default pool: the model's context (so one request can use all of it), at least
    :data:`KV_POOL_MIN` and at most :data:`KV_POOL_MAX` cells, and no more than
    1/:data:`KV_POOL_MEMORY_SHARE` of the memory budget (not below 2048 cells); a multiple of 256."""
    tokens = min(max(n_ctx, KV_POOL_MIN), KV_POOL_MAX)
    if memory_budget and bytes_per_token > 0:
        tokens = min(tokens, max(2048, memory_budget // KV_POOL_MEMORY_SHARE // bytes_per_token))
    return max(256, tokens // 256 * 256)


def plan_kv(options: EngineOptions, f16_bytes_per_token: int, n_ctx_train: int, *,
            pooled: bool) -> KvPlan:
    """The KV layout a load uses and the memory estimate counts (the same function for both).

    Pooled: the pool has ``kv_tokens`` cells (default :func:`default_kv_tokens`) and a request may
    use the model's context (``n_ctx``, default its training context) up to the whole pool.
    Per-slot streams (deterministic mode): ``max_batch`` streams of ``n_ctx`` cells (default the
    training context capped at :data:`DEFAULT_CONTEXT`). The host prompt cache defaults to none
    with the pool (finished sequences stay in the pool's free cells: the pool is the prefix cache,
    as in vLLM) and to 1/8 of the KV cache's bytes, at most 256 MiB, with per-slot streams."""
    types = kv_types(options.kv_cache_type, gpu=options.execution_provider != "cpu")
    per_token = kv_bytes_per_token(f16_bytes_per_token, types)
    if pooled:
        ctx = options.n_ctx or n_ctx_train
        tokens = options.kv_tokens or default_kv_tokens(ctx, per_token, options.memory_budget)
        n_ctx = min(ctx, tokens)
    else:
        n_ctx = options.n_ctx or min(n_ctx_train, DEFAULT_CONTEXT)
        tokens = n_ctx * options.max_batch
    cache = options.prompt_cache_bytes
    if cache is None:
        cache = 0 if pooled else min(256 << 20, tokens * per_token // 8)
    return KvPlan(pooled, n_ctx, tokens, per_token, cache, types)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a loaded model holds: weights, KV cache (the pool, or every slot's stream), host
    prompt cache."""

    weights: int
    kv_cache: int
    prompt_cache: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.prompt_cache


@dataclass(frozen=True)
class Backend:
    format: str
    """The catalog's ``format`` value ('gguf', 'onnx')."""
    engine: str
    """The engine's name as reported in EngineInfo and /metrics ('llama.cpp', ...)."""
    model_type: str
    """Foundry Local's ``modelType`` ('GGUF', 'ONNX')."""
    capabilities: Capabilities
    providers: frozenset[str]
    """Short execution-provider names the engine can drive."""
    recognise: Callable[[Path], bool]
    """True when ``path`` looks like a model of this format (cheap: magic bytes, a config file)."""
    check_files: Callable[[Path], None]
    """Raise InvalidRequestError when ``path`` is not a usable model of this format."""
    runtime_problem: Callable[[HardwareInventory], str | None]
    """Why this machine cannot run the format (runtime not installed), or None."""
    provider_problem: Callable[[HardwareInventory, str, str], str | None]
    """``(inventory, device, ep)``: why a variant for ``device`` cannot run on provider ``ep`` here."""
    estimate_memory: Callable[[Path, EngineOptions], MemoryEstimate]
    load: Callable[[Path, EngineOptions], Engine]
    default_context: int = DEFAULT_CONTEXT
    native_cpu: bool = False
    """Runs on the CPU without an onnxruntime provider (so no provider name to check there)."""
    onnxruntime_providers: bool = False
    """Runs through onnxruntime execution providers (a missing one is a build problem)."""
    portable_gpu: bool = False
    """A GPU variant may run on any portable GPU provider, not only the one it was built for."""


# --- helpers shared by the descriptors -------------------------------------------------------

GGUF_MAGIC = b"GGUF"


def _is_gguf(path: Path) -> bool:
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(4) == GGUF_MAGIC


def _check_gguf(path: Path) -> None:
    if not path.is_file():
        raise InvalidRequestError("a GGUF model must be a file")
    if not _is_gguf(path):
        raise InvalidRequestError("the file is not a GGUF model (bad magic bytes)")


def _is_onnx_folder(path: Path) -> bool:
    return path.is_dir() and (path / "genai_config.json").is_file()


def _check_onnx(path: Path) -> None:
    from ..cache.layout import check_no_escaping_symlinks

    if not path.is_dir():
        raise InvalidRequestError("an ONNX model must be a folder")
    if not (path / "genai_config.json").is_file():
        raise InvalidRequestError("an ONNX model folder needs a genai_config.json")
    check_no_escaping_symlinks(path)


def _llama_runtime(inv: HardwareInventory) -> str | None:
    return None if inv.llama_cpp.installed else "llama-cpp-python is not installed"


def _onnx_runtime(inv: HardwareInventory) -> str | None:
    if not inv.onnxruntime.genai_installed:
        return "onnxruntime-genai is not installed (install foundry-local-py[onnx] or [cuda])"
    if not inv.onnxruntime.installed:
        return "onnxruntime is not installed"
    return None


def _llama_provider_problem(inv: HardwareInventory, device: str, ep: str) -> str | None:
    from ..hardware.providers import NVIDIA_PROVIDERS

    if device == "cpu":
        return None
    if device == "npu":
        return "llama.cpp cannot run on an NPU"
    if not inv.llama_cpp.gpu_offload:
        return "this llama-cpp-python build has no GPU offload"
    if ep in NVIDIA_PROVIDERS and not inv.nvidia_gpus:
        return "no NVIDIA GPU was found"
    if ep == "metal" and not inv.metal:
        return "Metal is not available"
    if not inv.gpus and not inv.metal:
        return "no GPU was found"
    return None


def _ort_provider_problem(inv: HardwareInventory, device: str, ep: str) -> str | None:
    from ..hardware.providers import NVIDIA_PROVIDERS, full_ep

    name = full_ep(ep)
    if not inv.has_provider(name):
        build = inv.onnxruntime.distribution or "onnxruntime"
        return f"{name} is not available in this {build} build"
    check = inv.onnxruntime.check(name)
    if check is not None and check.ok is False:
        return f"{name} failed a test session ({check.detail})"
    if ep in NVIDIA_PROVIDERS and not inv.nvidia_gpus:
        return f"{name} is installed but no NVIDIA GPU was found"
    if device == "npu" and not inv.npus:
        return f"{name} is installed but no NPU was found"
    return None


def size_on_disk(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _load_gguf(path: Path, options: EngineOptions) -> Engine:
    from .llamacpp import LlamaCppEngine, LlamaCppOptions

    return LlamaCppEngine(path, LlamaCppOptions(
        n_threads=options.n_threads, n_ctx=options.n_ctx, max_batch=options.max_batch,
        n_gpu_layers=0 if options.execution_provider == "cpu" else -1,
        prompt_cache_bytes=options.prompt_cache_bytes, deterministic=options.deterministic,
        max_loras=options.max_loras,
        kv_tokens=options.kv_tokens, kv_cache_type=options.kv_cache_type,
        memory_budget=options.memory_budget,
    ))


def _estimate_gguf(path: Path, options: EngineOptions) -> MemoryEstimate:
    """Weights + the KV cache as the load lays it out (:func:`plan_kv`: the pool, not slots x
    context) + the host prompt cache's bound."""
    from .llamacpp import kv_geometry

    per_token, n_ctx_train = kv_geometry(path)
    plan = plan_kv(options, per_token, n_ctx_train, pooled=not options.deterministic)
    return MemoryEstimate(size_on_disk(path), plan.kv_bytes, plan.prompt_cache_bytes)


def _load_onnx(path: Path, options: EngineOptions) -> Engine:
    try:
        from .onnx_genai import OrtGenaiEngine, OrtGenaiOptions
    except ImportError as exc:
        raise ModelLoadError("onnxruntime-genai is not installed; install foundry-local-py[onnx]") from exc
    return OrtGenaiEngine(path, OrtGenaiOptions(
        execution_provider=options.execution_provider, max_batch=options.max_batch,
        n_ctx=options.n_ctx, n_threads=options.n_threads, kept_bytes=_onnx_kept_bytes(options),
        allow_batch_dependent_outputs=options.allow_batch_dependent_outputs,
    ))


def _onnx_kept_bytes(options: EngineOptions) -> int:
    """KV memory of finished greedy sequences kept for prefix reuse (``prompt_cache_mib``)."""
    return ONNX_KEPT_BYTES if options.prompt_cache_bytes is None else options.prompt_cache_bytes


def onnx_kv_values(decoder: Mapping[str, Any]) -> int:
    """K and V values one token holds in every layer, from genai_config.json's ``model.decoder``
    (2 x layers x KV heads x head size); ValueError or TypeError when a field is not a number."""
    return (2 * int(decoder.get("num_hidden_layers", 0)) * int(decoder.get("num_key_value_heads", 0))
            * int(decoder.get("head_size", 0)))


def _estimate_onnx(path: Path, options: EngineOptions) -> MemoryEstimate:
    """Weights from the folder; KV from genai_config.json (layers x kv heads x head size, fp16
    unless the model is fp32), for every slot at the full context; the generators kept for
    prefix reuse."""
    try:
        cfg = json.loads((path / "genai_config.json").read_text(encoding="utf-8")).get("model", {})
        values = onnx_kv_values(cfg.get("decoder", {}))
        n_ctx_train = int(cfg.get("context_length") or DEFAULT_CONTEXT)
    except (OSError, ValueError, TypeError, AttributeError):
        values = 0
        n_ctx_train = DEFAULT_CONTEXT
    n_ctx = options.n_ctx or min(n_ctx_train, DEFAULT_CONTEXT)
    per_token = values * 2
    return MemoryEstimate(size_on_disk(path), per_token * n_ctx * options.max_batch,
                          _onnx_kept_bytes(options))


LLAMA_CPP = Backend(
    format="gguf",
    engine="llama.cpp",
    model_type="GGUF",
    capabilities=Capabilities(
        sampling=frozenset(SAMPLING_FIELDS), logprobs=True, constraints=True, embeddings=True,
        prefix_cache=True, deterministic=True, lora_adapters=True, kv_pool=True,
    ),
    providers=frozenset({"cpu", "cuda", "metal"}),
    recognise=_is_gguf,
    check_files=_check_gguf,
    runtime_problem=_llama_runtime,
    provider_problem=_llama_provider_problem,
    estimate_memory=_estimate_gguf,
    load=_load_gguf,
    native_cpu=True,
)

ONNX_GENAI = Backend(
    format="onnx",
    engine="onnxruntime-genai",
    model_type="ONNX",
    # onnxruntime-genai has no min_p, presence/frequency penalties, logit bias or logprobs.
    capabilities=Capabilities(
        sampling=frozenset({"temperature", "top_p", "top_k", "seed", "repeat_penalty"}),
        constraints=True,
        prefix_cache=True,
        # Not shown batch-invariant: its batching engine decides how sequences share kernels.
        deterministic=False,
    ),
    providers=frozenset({"cpu", "cuda", "dml", "webgpu", "qnn", "openvino"}),
    recognise=_is_onnx_folder,
    check_files=_check_onnx,
    runtime_problem=_onnx_runtime,
    provider_problem=_ort_provider_problem,
    estimate_memory=_estimate_onnx,
    load=_load_onnx,
    onnxruntime_providers=True,
    portable_gpu=True,
)

BACKENDS: Mapping[str, Backend] = MappingProxyType({b.format: b for b in (LLAMA_CPP, ONNX_GENAI)})
"""Registered backends by format, in order of preference when several variants tie."""

FORMATS: tuple[str, ...] = tuple(BACKENDS)


def backend_for(fmt: str) -> Backend:
    try:
        return BACKENDS[fmt]
    except KeyError:
        raise ModelLoadError(f"unsupported model format '{fmt}'") from None


def detect_format(path: Path) -> str:
    """The format of a model file or folder, by asking each backend to recognise it."""
    for b in BACKENDS.values():
        if b.recognise(path):
            return b.format
    if path.is_file():
        raise InvalidRequestError("the file is not a GGUF model (bad magic bytes)")
    raise InvalidRequestError(
        "expected " + " or ".join(f"a {b.model_type} model" for b in BACKENDS.values())
        + " (a GGUF file, or an ONNX GenAI folder with genai_config.json)")


def load_engine(fmt: str, path: Path, options: EngineOptions) -> Engine:
    backend = backend_for(fmt)
    if options.deterministic and not backend.capabilities.deterministic:
        raise ModelLoadError(
            f"deterministic mode is on, and the {backend.engine} engine ({backend.model_type} "
            "models) cannot guarantee the same tokens for the same request; use a GGUF variant "
            "or turn deterministic mode off")
    return backend.load(path, options)
