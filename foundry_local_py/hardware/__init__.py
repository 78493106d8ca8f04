"""Hardware detection and variant choice.

- :func:`detect_hardware` -> :class:`HardwareInventory` (cheap probes, never raises).
- :func:`choose_variant` / :func:`evaluate_variants` -> :class:`VariantChoice` (pure).
- :func:`hardware_report` -> JSON-able dict for ``foundry-local hardware`` and the status routes.
"""

from __future__ import annotations

from .detect import Probes, detect_hardware, refresh_memory
from .inventory import HardwareInventory
from .providers import DeviceClass, normalize_device, normalize_ep
from .report import (
    cached_variant_ids,
    choose_for_cache,
    degraded_variant_ids,
    hardware_report,
    model_report,
)
from .select import (
    Considered,
    VariantChoice,
    choose_variant,
    engine_execution_provider,
    evaluate_variants,
)

__all__ = [
    "Considered",
    "DeviceClass",
    "HardwareInventory",
    "Probes",
    "VariantChoice",
    "cached_variant_ids",
    "choose_for_cache",
    "choose_variant",
    "degraded_variant_ids",
    "detect_hardware",
    "engine_execution_provider",
    "evaluate_variants",
    "hardware_report",
    "model_report",
    "normalize_device",
    "normalize_ep",
    "refresh_memory",
]
