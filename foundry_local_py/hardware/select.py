"""Choose the variant of a catalog model that this machine should run, and say why.

:func:`choose_variant` is a pure function of the catalog entry, a
:class:`~foundry_local_py.hardware.inventory.HardwareInventory` and the cache's state (which
variants are cached, which have a degraded fidelity record). The rules, in order:

1. Filters: ``requested`` (a variant id/name asked for explicitly), the ``device`` and ``ep``
   overrides, ``exclude`` (variants that failed to load) and ``exclude_eps`` (providers that
   failed to initialise).
2. Quality: a variant whose recorded fidelity is degraded (an ONNX int4 model rebuilt from a 4-bit
   GGUF that drifted from its source) is skipped unless it was requested by id.
3. Runnable here: the engine's runtime is installed, the provider is in onnxruntime's
   ``get_available_providers()`` *and* its device was found (CUDA needs an NVIDIA GPU, an NPU
   variant needs an NPU), llama.cpp GPU variants need a build with GPU offload.
4. Memory: a GPU variant must fit in the free memory of the GPU it would use
   (``size_bytes * gpu_overhead + gpu_reserve_bytes``); otherwise it is skipped with the numbers.
5. Preference among the rest (Foundry Local's): an already-cached variant first (``prefer_cached``),
   then the device class ``NPU > vendor GPU > CUDA GPU > generic GPU > vendor CPU > generic CPU``,
   then, within a class, a variant *not* re-quantized from a GGUF (fidelity risk) over one that is,
   then a variant built for the provider it runs on over one that runs on a substitute,
   then the higher version, then GGUF over ONNX (:data:`FORMAT_PREFERENCE`), then the name
   (for a stable answer).

ONNX GenAI GPU variants built for CUDA, DirectML or WebGPU may run on another of those three
providers when theirs is missing (as Foundry Local loads its GPU models with ``ep=cuda`` where
CUDA is present); :attr:`VariantChoice.execution_provider` is the provider to actually use, and
the class follows that provider (a DirectML build run on CUDA ranks as a CUDA GPU variant).

Fallback after a provider fails to initialise (the loader's loop)::

    choice = choose_variant(model, inv, cached=..., degraded=...)
    while True:
        try:
            engine = load(choice.variant, choice.engine_ep)
            break
        except ModelLoadError as exc:
            log.warning("%s on %s failed: %s", choice.variant_id, choice.execution_provider, exc)
            metrics.provider_fallbacks.labels(choice.engine_ep).inc()
            exclude_eps.add(choice.engine_ep)      # or exclude.add(choice.variant_id)
            choice = choose_variant(model, inv, ..., exclude=exclude, exclude_eps=exclude_eps)
            # raises ModelLoadError once nothing is left
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import NamedTuple

from ..cache.catalog import CatalogModel, ConvertSource, Variant
from ..engines.backends import FORMATS, backend_for
from ..errors import FoundryError, InvalidRequestError, ModelLoadError, ModelNotFoundError
from .inventory import GpuInfo, HardwareInventory
from .providers import (
    NVIDIA_PROVIDERS,
    PORTABLE_GPU_PROVIDERS,
    DeviceClass,
    device_class,
    full_ep,
    normalize_device,
    normalize_ep,
    short_ep,
)

GIB = 1024**3
GPU_MEMORY_OVERHEAD = 1.2
"""Weights plus KV cache and activations, as a multiple of the variant's size on disk."""
GPU_MEMORY_RESERVE_BYTES = 512 * 1024 * 1024
"""Kept free on the GPU for the runtime's own context and workspace."""
MAX_REASONS_IN_ERROR = 4
FORMAT_PREFERENCE = FORMATS
"""Last tie-break before the name: the backends' registration order (llama.cpp first: continuous
batching, grammar-constrained output, logprobs) when both run on the same class of device."""


class Considered(NamedTuple):
    """One variant looked at: accepted or not, and why."""

    variant_id: str
    accepted: bool
    reason: str


@dataclass(frozen=True)
class VariantChoice:
    alias: str
    variant: Variant | None
    """None when nothing can run (then :meth:`require` raises :attr:`error`)."""
    reason: str
    considered: tuple[Considered, ...]
    execution_provider: str | None = None
    """Full provider name to run with ('CUDAExecutionProvider'); 'CPUExecutionProvider' for
    llama.cpp CPU variants."""
    engine_ep: str | None = None
    """Short name for ``EngineOptions.execution_provider`` ('cpu', 'cuda', 'dml', 'metal', ...)."""
    device_class: DeviceClass | None = None
    cached: bool = False
    error: FoundryError | None = field(default=None, repr=False, compare=False)

    @property
    def variant_id(self) -> str | None:
        return self.variant.id if self.variant is not None else None

    def require(self) -> Variant:
        """The chosen variant, or raise the error that explains why there is none."""
        if self.variant is None:
            raise self.error or ModelNotFoundError(self.alias, detail=self.reason)
        return self.variant


@dataclass(frozen=True)
class _Verdict:
    variant: Variant
    accepted: bool
    reason: str
    stage: str
    """Where a rejection came from: 'device', 'ep', 'excluded', 'quality', 'runtime', 'memory'."""
    dclass: DeviceClass
    """The class of the provider it would run on (its declared one when rejected)."""
    cached: bool
    requantized: bool
    run_ep: str | None = None

    @property
    def substituted(self) -> bool:
        """Runs on another provider than the one it was built for."""
        return self.run_ep is not None and self.run_ep != engine_execution_provider(self.variant)


def engine_execution_provider(variant: Variant, run_ep: str | None = None) -> str:
    """The short provider name the engine factory expects for ``variant`` (or for ``run_ep``)."""
    if run_ep is not None:
        return run_ep
    if variant.device == "cpu" and backend_for(variant.format).native_cpu:
        return "cpu"
    return short_ep(variant.execution_provider)


def gpu_memory_needed(
    size_bytes: int,
    overhead: float = GPU_MEMORY_OVERHEAD,
    reserve_bytes: int = GPU_MEMORY_RESERVE_BYTES,
) -> int:
    return math.ceil(size_bytes * overhead) + reserve_bytes


def choose_variant(
    model: CatalogModel,
    inventory: HardwareInventory,
    *,
    cached: Collection[str] = frozenset(),
    degraded: Collection[str] = frozenset(),
    device: str | None = None,
    ep: str | None = None,
    requested: str | None = None,
    exclude: Collection[str] = frozenset(),
    exclude_eps: Collection[str] = frozenset(),
    prefer_cached: bool = True,
    gpu_overhead: float = GPU_MEMORY_OVERHEAD,
    gpu_reserve_bytes: int = GPU_MEMORY_RESERVE_BYTES,
) -> VariantChoice:
    """The variant to run, raising when there is none (see :func:`evaluate_variants`)."""
    choice = evaluate_variants(
        model,
        inventory,
        cached=cached,
        degraded=degraded,
        device=device,
        ep=ep,
        requested=requested,
        exclude=exclude,
        exclude_eps=exclude_eps,
        prefer_cached=prefer_cached,
        gpu_overhead=gpu_overhead,
        gpu_reserve_bytes=gpu_reserve_bytes,
    )
    choice.require()
    return choice


def evaluate_variants(
    model: CatalogModel,
    inventory: HardwareInventory,
    *,
    cached: Collection[str] = frozenset(),
    degraded: Collection[str] = frozenset(),
    device: str | None = None,
    ep: str | None = None,
    requested: str | None = None,
    exclude: Collection[str] = frozenset(),
    exclude_eps: Collection[str] = frozenset(),
    prefer_cached: bool = True,
    gpu_overhead: float = GPU_MEMORY_OVERHEAD,
    gpu_reserve_bytes: int = GPU_MEMORY_RESERVE_BYTES,
) -> VariantChoice:
    """Like :func:`choose_variant` but never raises for "nothing fits": the returned choice then
    has ``variant=None`` and an ``error``. Malformed ``device``/``ep`` values still raise
    :class:`InvalidRequestError` (param 'device' / 'ep').

    ``cached``, ``degraded`` and ``exclude`` hold variant ids (or names); ``exclude_eps`` holds
    provider names (short or full). ``requested`` pins one variant by id or name: only it is
    considered, and it is used even when its fidelity is degraded.
    """
    want_device = normalize_device(device)
    want_ep = normalize_ep(ep)
    bad_eps = {e for e in (normalize_ep(x) for x in exclude_eps) if e is not None}
    cached_keys = _keys(cached)
    degraded_keys = _keys(degraded)
    excluded_keys = _keys(exclude)

    variants = list(model.variants)
    if requested is not None:
        key = requested.strip().lower()
        variants = [v for v in variants if key in {v.id.lower(), v.name.lower()}]
        if not variants:
            raise ModelNotFoundError(requested)

    ctx = _Context(
        model=model,
        inventory=inventory,
        want_device=want_device,
        want_ep=want_ep,
        bad_eps=bad_eps,
        pinned=requested is not None,
        gpu_overhead=gpu_overhead,
        gpu_reserve_bytes=gpu_reserve_bytes,
    )
    verdicts = [
        ctx.judge(
            v,
            cached=_hit(v, cached_keys),
            degraded=_hit(v, degraded_keys),
            excluded=_hit(v, excluded_keys),
        )
        for v in variants
    ]
    accepted = [v for v in verdicts if v.accepted]
    if not accepted:
        return _no_choice(model, requested, verdicts, want_device, want_ep)

    def preference(v: _Verdict) -> tuple[bool, int, bool, bool, int, int, str]:
        return (prefer_cached and not v.cached, int(v.dclass), v.requantized, v.substituted,
                -v.variant.version, _format_rank(v.variant), v.variant.name)

    accepted.sort(key=preference)
    best = accepted[0]
    considered = []
    for v in verdicts:
        if v is best:
            considered.append(Considered(v.variant.id, True, f"chosen: {v.reason}"))
        elif v.accepted:
            why = _why_preferred(best, v, prefer_cached)
            considered.append(Considered(v.variant.id, True, f"usable ({v.reason}), but {why}"))
        else:
            considered.append(Considered(v.variant.id, False, v.reason))
    assert best.run_ep is not None
    return VariantChoice(
        alias=model.alias,
        variant=best.variant,
        reason=_chosen_reason(best, accepted[1:], prefer_cached),
        considered=tuple(considered),
        execution_provider=full_ep(best.run_ep),
        engine_ep=engine_execution_provider(best.variant, best.run_ep),
        device_class=best.dclass,
        cached=best.cached,
    )


# --- per-variant judgement -------------------------------------------------------------------


@dataclass(frozen=True)
class _Context:
    model: CatalogModel
    inventory: HardwareInventory
    want_device: str | None
    want_ep: str | None
    bad_eps: set[str]
    pinned: bool
    gpu_overhead: float
    gpu_reserve_bytes: int

    def judge(self, v: Variant, *, cached: bool, degraded: bool, excluded: bool) -> _Verdict:
        declared = engine_execution_provider(v)
        dclass = device_class(v.device, declared)
        requantized = _requantized(self.model, v)

        def reject(stage: str, reason: str) -> _Verdict:
            return _Verdict(v, False, reason, stage, dclass, cached, requantized)

        if self.want_device is not None and v.device != self.want_device:
            return reject("device", f"a {v.device} variant; device '{self.want_device}' was asked for")
        candidates = _candidate_eps(v, declared)
        if self.want_ep is not None:
            if self.want_ep not in candidates:
                return reject("ep", f"does not run on {full_ep(self.want_ep)} (built for "
                                    f"{full_ep(declared)})")
            candidates = [self.want_ep]
        if excluded:
            return reject("excluded", "failed to load earlier; excluded")
        failed = [e for e in candidates if e in self.bad_eps]
        if len(failed) == len(candidates):
            names = ", ".join(full_ep(e) for e in failed)
            return reject("excluded", f"{names} failed to initialise earlier")
        if degraded and not self.pinned:
            return reject("quality", "its recorded fidelity is below the threshold (degraded); "
                                     "request it by id to use it anyway")
        runtime = self._runtime_problem(v)
        if runtime:
            return reject("runtime", runtime)
        run_ep, problem = self._pick_provider(v, candidates, failed)
        if run_ep is None:
            return reject("excluded" if failed else "runtime", problem)
        memory_note, memory_problem = self._memory(v, run_ep)
        if memory_problem:
            return reject("memory", memory_problem)
        dclass = device_class(v.device, run_ep)
        parts = [f"runs on {full_ep(run_ep)} ({dclass.label})"]
        if run_ep != declared:
            parts.append(f"built for {full_ep(declared)}, which is not available")
        if memory_note:
            parts.append(memory_note)
        if cached:
            parts.append("cached")
        if requantized:
            parts.append("re-quantized from a GGUF")
        if degraded:
            parts.append("fidelity degraded, used because it was requested by id")
        return _Verdict(v, True, "; ".join(parts), "ok", dclass, cached, requantized, run_ep)

    def _pick_provider(self, v: Variant, candidates: list[str], failed: list[str]) -> tuple[str | None, str]:
        """(the first candidate provider ``v`` can run on here, or None; why none could)."""
        problems: list[str] = []
        missing: list[str] = []  # providers this onnxruntime build lacks, reported in one phrase
        missing_at = 0
        for candidate in candidates:
            problem = (f"{full_ep(candidate)} failed to initialise earlier" if candidate in failed
                       else self._provider_problem(v, candidate))
            if problem is None:
                return candidate, ""
            if (backend_for(v.format).onnxruntime_providers
                    and not self.inventory.has_provider(full_ep(candidate))):
                missing.append(full_ep(candidate))
                if len(missing) > 1:
                    continue
                missing_at = len(problems)
            problems.append(problem)
        if len(missing) > 1:
            problems[missing_at] += f" (nor {', '.join(missing[1:])}, which it could also run on)"
        return None, "; ".join(dict.fromkeys(problems))

    def _runtime_problem(self, v: Variant) -> str | None:
        return backend_for(v.format).runtime_problem(self.inventory)

    def _provider_problem(self, v: Variant, ep: str) -> str | None:
        """Why ``v`` cannot run on provider ``ep`` here, or None when it can."""
        return backend_for(v.format).provider_problem(self.inventory, v.device, ep)

    def _gpus_for(self, ep: str) -> tuple[GpuInfo, ...]:
        inv = self.inventory
        if ep in NVIDIA_PROVIDERS:
            return inv.nvidia_gpus
        if ep in {"metal", "coreml"}:
            return inv.gpus_of("apple")
        return inv.gpus

    def _memory(self, v: Variant, ep: str) -> tuple[str | None, str | None]:
        """(note, problem): whether a GPU variant fits in the free memory of its GPU."""
        if v.device != "gpu":
            return None, None
        if v.size_bytes is None:
            return "size unknown, GPU memory not checked", None
        frees = [g.memory_free_bytes for g in self._gpus_for(ep) if g.memory_free_bytes is not None]
        if not frees:
            return "GPU memory unknown, not checked", None
        free = max(frees)
        need = gpu_memory_needed(v.size_bytes, self.gpu_overhead, self.gpu_reserve_bytes)
        detail = (f"needs ~{_gib(need)} of GPU memory ({_gib(v.size_bytes)} x {self.gpu_overhead:g} "
                  f"+ {_gib(self.gpu_reserve_bytes)}), {_gib(free)} free")
        if need > free:
            return None, f"does not fit: {detail}"
        return f"fits: {detail}", None


def _candidate_eps(v: Variant, declared: str) -> list[str]:
    """Providers ``v`` could run on, its own first."""
    if backend_for(v.format).portable_gpu and v.device == "gpu" and declared in PORTABLE_GPU_PROVIDERS:
        return [declared, *(e for e in PORTABLE_GPU_PROVIDERS if e != declared)]
    return [declared]


_FULL_PRECISIONS = frozenset({"f32", "fp32", "f16", "fp16", "bf16"})


def _requantized(model: CatalogModel, v: Variant) -> bool:
    """Built by conversion from an already-quantized GGUF (e.g. Q4 GGUF -> ONNX int4): quantizing
    twice loses quality, so such a variant is a fidelity risk even before it is measured."""
    source = v.source
    if not isinstance(source, ConvertSource):
        return False
    base = source.base.lower()
    for other in model.variants:
        if base in {other.id.lower(), other.name.lower()}:
            return other.format == "gguf" and other.precision.lower() not in _FULL_PRECISIONS
    return False


def _format_rank(v: Variant) -> int:
    return FORMAT_PREFERENCE.index(v.format) if v.format in FORMAT_PREFERENCE else len(FORMAT_PREFERENCE)


def _keys(ids: Collection[str]) -> set[str]:
    return {i.strip().lower() for i in ids}


def _hit(v: Variant, keys: set[str]) -> bool:
    return v.id.lower() in keys or v.name.lower() in keys


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


# --- explanations ----------------------------------------------------------------------------


def _advantage(best: _Verdict, other: _Verdict, prefer_cached: bool) -> str:
    """What made ``best`` win over ``other`` (the first differing preference key)."""
    if prefer_cached and best.cached and not other.cached:
        if other.dclass < best.dclass:
            return (f"already cached (cached variants win over the higher-priority "
                    f"{other.dclass.label} one, which is not)")
        return "already cached"
    if best.dclass != other.dclass:
        return f"higher-priority device class ({best.dclass.label} over {other.dclass.label})"
    if best.requantized != other.requantized:
        return "not re-quantized from a quantized GGUF (fidelity)"
    if best.substituted != other.substituted:
        return f"built for {full_ep(best.run_ep or '')} itself"
    if best.variant.version != other.variant.version:
        return f"newer version ({best.variant.version} over {other.variant.version})"
    if best.variant.format != other.variant.format:
        return f"{best.variant.format.upper()} preferred over {other.variant.format.upper()} at equal rank"
    return "first by name"


def _why_preferred(best: _Verdict, other: _Verdict, prefer_cached: bool) -> str:
    return f"{best.variant.id} was preferred: {_advantage(best, other, prefer_cached)}"


def _chosen_reason(best: _Verdict, rest: list[_Verdict], prefer_cached: bool) -> str:
    if not rest:
        return f"{best.reason}; the only usable variant"
    runner_up = rest[0]
    return (f"{best.reason}; preferred over {runner_up.variant.id}: "
            f"{_advantage(best, runner_up, prefer_cached)}")


def _no_choice(
    model: CatalogModel,
    requested: str | None,
    verdicts: list[_Verdict],
    want_device: str | None,
    want_ep: str | None,
) -> VariantChoice:
    lines = [f"{v.variant.id}: {v.reason}" for v in verdicts]
    summary = "; ".join(lines[:MAX_REASONS_IN_ERROR])
    if len(lines) > MAX_REASONS_IN_ERROR:
        summary += f"; and {len(lines) - MAX_REASONS_IN_ERROR} more"
    name = requested or model.alias
    error: FoundryError
    if any(v.stage == "excluded" for v in verdicts):
        error = ModelLoadError(f"No variant of '{name}' is left to try after load failures ({summary}).")
    elif want_ep is not None:
        error = InvalidRequestError(
            f"No variant of '{name}' can run on {full_ep(want_ep)} here ({summary}).",
            param="ep", code="unsupported_ep")
    elif want_device is not None:
        error = InvalidRequestError(
            f"No variant of '{name}' can run on the {want_device} here ({summary}).",
            param="device", code="unsupported_device")
    else:
        error = ModelNotFoundError(name, detail=f"No variant of it can run on this machine ({summary}).")
    return VariantChoice(
        alias=model.alias,
        variant=None,
        reason=error.message,
        considered=tuple(Considered(v.variant.id, False, v.reason) for v in verdicts),
        error=error,
    )
