"""The hardware report: the inventory plus, for each catalog model, the variant it would get and why.

``foundry-local hardware`` prints it; the server's ``GET /foundry/hardware`` and
``GET /openai/status`` return it (or part of it) as JSON. Everything here is JSON-able and free of
filesystem paths.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from ..cache.catalog import Catalog, CatalogModel
from ..cache.store import ModelStore
from ..errors import FoundryError
from .inventory import HardwareInventory
from .providers import device_class, normalize_device, normalize_ep
from .select import VariantChoice, engine_execution_provider, evaluate_variants


def cached_variant_ids(model: CatalogModel, store: ModelStore) -> set[str]:
    """Ids of ``model``'s variants that are complete on this machine (no hashing, no download)."""
    found = set()
    for variant in model.variants:
        try:
            if store.is_available(model, variant):
                found.add(variant.id)
        except (FoundryError, OSError):
            continue
    return found


def degraded_variant_ids(model: CatalogModel, store: ModelStore) -> set[str]:
    """Ids of ``model``'s cached variants whose manifest records a degraded fidelity."""
    found = set()
    for variant in model.variants:
        try:
            manifest = store.manifest(model, variant)
        except (FoundryError, OSError):
            continue
        if manifest is not None and manifest.fidelity is not None and manifest.fidelity.degraded:
            found.add(variant.id)
    return found


def choose_for_cache(
    model: CatalogModel,
    inventory: HardwareInventory,
    store: ModelStore,
    *,
    device: str | None = None,
    ep: str | None = None,
    requested: str | None = None,
    prefer_cached: bool = True,
    exclude: Collection[str] = frozenset(),
    exclude_eps: Collection[str] = frozenset(),
    cached: Collection[str] | None = None,
) -> VariantChoice:
    """:func:`evaluate_variants` with the cache's state: what is cached, what is degraded.

    The one way the server, the CLI and the SDK ask "which variant here?"; ``cached`` may be passed
    when the caller already computed it.
    """
    return evaluate_variants(
        model,
        inventory,
        cached=cached_variant_ids(model, store) if cached is None else cached,
        degraded=degraded_variant_ids(model, store),
        device=device,
        ep=ep,
        requested=requested,
        exclude=exclude,
        exclude_eps=exclude_eps,
        prefer_cached=prefer_cached,
    )


def model_report(
    model: CatalogModel,
    inventory: HardwareInventory,
    store: ModelStore,
    *,
    device: str | None = None,
    ep: str | None = None,
    prefer_cached: bool = True,
    exclude: Collection[str] = frozenset(),
    exclude_eps: Collection[str] = frozenset(),
) -> dict[str, Any]:
    """One model: the chosen variant (or the error) and every variant with its verdict."""
    cached = cached_variant_ids(model, store)
    degraded = degraded_variant_ids(model, store)
    choice = choose_for_cache(
        model, inventory, store, device=device, ep=ep, exclude=exclude, exclude_eps=exclude_eps,
        prefer_cached=prefer_cached, cached=cached,
    )
    verdicts = {c.variant_id: c for c in choice.considered}
    variants = []
    for variant in model.variants:
        try:
            manifest = store.manifest(model, variant)
        except (FoundryError, OSError):
            manifest = None
        fidelity = manifest.fidelity.model_dump() if manifest and manifest.fidelity else None
        verdict = verdicts.get(variant.id)
        variants.append(
            {
                "id": variant.id,
                "format": variant.format,
                "device": variant.device,
                "execution_provider": variant.execution_provider,
                "engine_ep": engine_execution_provider(variant),
                "device_class": device_class(
                    variant.device, engine_execution_provider(variant)
                ).label,
                "precision": variant.precision,
                "version": variant.version,
                "size_bytes": variant.size_bytes,
                "source": variant.source.kind,
                "cached": variant.id in cached,
                "degraded": variant.id in degraded,
                "fidelity": fidelity,
                "chosen": variant.id == choice.variant_id,
                "accepted": verdict.accepted if verdict else False,
                "reason": verdict.reason if verdict else "not considered",
            }
        )
    chosen = None
    if choice.variant is not None:
        chosen = {
            "variant": choice.variant.id,
            "execution_provider": choice.execution_provider,
            "engine_ep": choice.engine_ep,
            "device": choice.variant.device,
            "device_class": choice.device_class.label if choice.device_class is not None else None,
            "cached": choice.cached,
            "reason": choice.reason,
        }
    error = choice.error.to_dict()["error"] if choice.error is not None else None
    return {
        "alias": model.alias,
        "display_name": model.display_name,
        "task": model.task,
        "chosen": chosen,
        "error": error,
        "variants": variants,
    }


def hardware_report(
    inventory: HardwareInventory,
    catalog: Catalog,
    store: ModelStore,
    *,
    device: str | None = None,
    ep: str | None = None,
    prefer_cached: bool = True,
) -> dict[str, Any]:
    """``{"inventory": ..., "overrides": ..., "models": [...]}``.

    ``device``/``ep`` are the server's or the caller's overrides; a malformed value raises
    :class:`~foundry_local_py.errors.InvalidRequestError` (param 'device' / 'ep') before any work.
    """
    want_device = normalize_device(device)
    want_ep = normalize_ep(ep)
    return {
        "inventory": inventory.to_dict(),
        "accelerators": accelerators(inventory),
        "overrides": {"device": want_device, "ep": want_ep, "prefer_cached": prefer_cached},
        "models": [
            model_report(
                model, inventory, store, device=want_device, ep=want_ep, prefer_cached=prefer_cached
            )
            for model in catalog.models
        ],
    }


def accelerators(inventory: HardwareInventory) -> list[str]:
    """One human line per accelerator path found (GPUs, NPUs, providers beyond CPU)."""
    lines = []
    for gpu in inventory.gpus:
        mem = ""
        if gpu.memory_total_bytes:
            free = gpu.memory_free_bytes or 0
            mem = f", {gpu.memory_total_bytes / 2**30:.1f} GiB ({free / 2**30:.1f} GiB free)"
        lines.append(f"GPU {gpu.index}: {gpu.name} [{gpu.vendor}{mem}]")
    lines.extend(f"NPU: {npu.name} [{npu.vendor}]" for npu in inventory.npus)
    extra = [
        p for p in inventory.onnxruntime.providers
        if p not in {"CPUExecutionProvider", "AzureExecutionProvider"}
    ]
    if extra:
        lines.append(f"onnxruntime providers: {', '.join(extra)}")
    if inventory.llama_cpp.gpu_offload:
        lines.append("llama.cpp: GPU offload")
    return lines
