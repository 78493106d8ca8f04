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
from typing import TYPE_CHECKING, Literal

from ..errors import InvalidRequestError, ModelLoadError

if TYPE_CHECKING:
    from ..hardware.inventory import HardwareInventory
    from .base import Engine

DEFAULT_CONTEXT = 4096
"""Context per request unless a setting says otherwise (Ollama's default): the KV cache holds
``max_batch`` of these, so a small model's full 8k-32k would cost hundreds of MB."""

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
    max_batch: int | None = None
    """Largest number of sequences decoded together; None: as many as the settings ask."""
    deterministic: bool = False
    """Can run in deterministic mode (``Settings.deterministic``): at temperature 0 or with a seed,
    the same request gives the same tokens whatever else runs, is cached or arrived first."""


@dataclass(frozen=True)
class EngineOptions:
    """What the model manager asks of any backend when it loads a model."""

    n_threads: int
    max_batch: int
    n_ctx: int | None = None
    """Context per request; None: the model's, capped at :data:`DEFAULT_CONTEXT`."""
    execution_provider: str = "cpu"
    """'cpu', 'cuda', 'dml', ... (lower-case short names)."""
    prompt_cache_bytes: int = 256 << 20
    deterministic: bool = False
    """Deterministic mode (the backend's ``Capabilities.deterministic`` must be True)."""
    max_loras: int = 4
    """LoRA adapters kept loaded (engines with ``Capabilities.lora_adapters``)."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a loaded model holds: weights, KV cache for every slot, host prompt cache."""

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
    ))


def _estimate_gguf(path: Path, options: EngineOptions) -> MemoryEstimate:
    from .llamacpp import kv_bytes_per_token

    per_token, n_ctx_train = kv_bytes_per_token(path)
    n_ctx = options.n_ctx or min(n_ctx_train, DEFAULT_CONTEXT)
    return MemoryEstimate(size_on_disk(path), per_token * n_ctx * options.max_batch,
                          options.prompt_cache_bytes)


def _load_onnx(path: Path, options: EngineOptions) -> Engine:
    try:
        from .onnx_genai import OrtGenaiEngine, OrtGenaiOptions
    except ImportError as exc:
        raise ModelLoadError("onnxruntime-genai is not installed; install foundry-local-py[onnx]") from exc
    return OrtGenaiEngine(path, OrtGenaiOptions(
        execution_provider=options.execution_provider, max_batch=options.max_batch,
        n_ctx=options.n_ctx, n_threads=options.n_threads,
    ))


def _estimate_onnx(path: Path, options: EngineOptions) -> MemoryEstimate:
    """Weights from the folder; KV from genai_config.json (layers x kv heads x head size, fp16
    unless the model is fp32), for every slot at the full context."""
    try:
        cfg = json.loads((path / "genai_config.json").read_text(encoding="utf-8")).get("model", {})
        dec = cfg.get("decoder", {})
        layers = int(dec.get("num_hidden_layers", 0))
        kv_heads = int(dec.get("num_key_value_heads", 0))
        head = int(dec.get("head_size", 0))
        n_ctx_train = int(cfg.get("context_length") or DEFAULT_CONTEXT)
    except (OSError, ValueError, TypeError, AttributeError):
        layers = kv_heads = head = 0
        n_ctx_train = DEFAULT_CONTEXT
    n_ctx = options.n_ctx or min(n_ctx_train, DEFAULT_CONTEXT)
    per_token = 2 * layers * kv_heads * head * 2
    return MemoryEstimate(size_on_disk(path), per_token * n_ctx * options.max_batch)


LLAMA_CPP = Backend(
    format="gguf",
    engine="llama.cpp",
    model_type="GGUF",
    capabilities=Capabilities(
        sampling=frozenset(SAMPLING_FIELDS), logprobs=True, constraints=True, embeddings=True,
        prefix_cache=True, deterministic=True, lora_adapters=True,
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
