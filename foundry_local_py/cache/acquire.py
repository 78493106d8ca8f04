"""Make a variant available locally: the one entry point for 'get me this model'.

Package variants resolve in place (or are assembled from parts); Hugging Face variants are
downloaded (:mod:`.download`); converted variants are built from their base (:mod:`.convert`),
which is acquired first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelNotFoundError
from .catalog import Catalog, CatalogModel, ConvertSource, HuggingFaceSource, Variant
from .store import ModelStore


@dataclass(frozen=True)
class Progress:
    """A progress report: ``stage`` is 'wait', 'download', 'convert', 'verify' or 'done'.

    ``done_bytes``/``total_bytes`` cover the whole variant (all its files; resumed bytes count as
    done). ``new_bytes`` is what arrived from the network since the previous report: add it to a
    download counter (``foundry_local_download_bytes_total``).
    """

    variant_id: str
    stage: str
    done_bytes: int = 0
    total_bytes: int | None = None
    message: str = ""
    new_bytes: int = 0


ProgressCallback = Callable[[Progress], None]


def ensure_variant(
    store: ModelStore,
    catalog: Catalog,
    model: CatalogModel,
    variant: Variant,
    *,
    progress: ProgressCallback | None = None,
    force: bool = False,
) -> Path:
    """Return the variant's local path, downloading or converting it when needed."""
    if not force:
        try:
            return store.resolve(model, variant)
        except ModelNotFoundError:
            if not isinstance(variant.source, (HuggingFaceSource, ConvertSource)):
                raise
    source = variant.source
    if isinstance(source, HuggingFaceSource):
        from .download import download_variant

        return download_variant(store, model, variant, progress=progress, force=force)
    if isinstance(source, ConvertSource):
        from .convert import build_variant

        base_model, base_variant = catalog.variant(source.base)
        base_path = ensure_variant(store, catalog, base_model, base_variant, progress=progress)
        return build_variant(
            store, model, variant, base_model, base_variant, base_path, progress=progress, force=force
        )
    return store.resolve(model, variant)
