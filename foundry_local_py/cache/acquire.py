"""Make a variant available locally: the one entry point for 'get me this model'.

Package variants resolve in place (or are assembled from parts); Hugging Face variants are
downloaded (:mod:`.download`); converted variants are built from their base (:mod:`.convert`),
which is acquired first.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelNotFoundError
from .catalog import Catalog, CatalogModel, ConvertSource, HuggingFaceSource, Variant
from .hub import is_hub_alias, update_from_gguf
from .progress import ProgressCallback
from .store import ModelStore


def ensure_variant(
    store: ModelStore,
    catalog: Catalog,
    model: CatalogModel,
    variant: Variant,
    *,
    progress: ProgressCallback | None = None,
    force: bool = False,
    token: str | None = None,
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

        path = download_variant(store, model, variant, progress=progress, force=force, token=token)
        if is_hub_alias(model.alias) and path.is_file():
            update_from_gguf(store.root, catalog, model, path)  # context and template from the file
        return path
    if isinstance(source, ConvertSource):
        from .convert import build_variant

        base_model, base_variant = catalog.variant(source.base)
        base_path = ensure_variant(
            store, catalog, base_model, base_variant, progress=progress, token=token
        )
        return build_variant(
            store, model, variant, base_model, base_variant, base_path, progress=progress, force=force
        )
    return store.resolve(model, variant)
