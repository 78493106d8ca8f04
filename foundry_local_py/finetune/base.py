"""The GGUF file a catalog alias trains against: its GGUF variant, acquired like a download."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..cache.acquire import ensure_variant
from ..cache.catalog import Catalog, ConvertSource, Variant
from ..cache.progress import ProgressCallback
from ..cache.store import ModelStore
from ..errors import InvalidRequestError


@dataclass(frozen=True)
class BaseModel:
    alias: str
    variant_id: str
    path: Path
    chat_template: str | None = None  # the catalog's override of the GGUF's template, as served


def gguf_variant_of(catalog: Catalog, name: str) -> tuple[str, Variant]:
    """(alias, variant): NAME's fixed variant when it names one, else the alias's first GGUF
    variant that is not itself a conversion (the published weights)."""
    model, fixed = catalog.lookup(name)
    if fixed is not None:
        if fixed.format != "gguf":
            raise InvalidRequestError(
                f"'{fixed.name}' is a {fixed.format} variant; training needs a GGUF one"
            )
        return model.alias, fixed
    ggufs = [v for v in model.variants if v.format == "gguf"]
    ggufs.sort(key=lambda v: isinstance(v.source, ConvertSource))
    if not ggufs:
        raise InvalidRequestError(f"'{model.alias}' has no GGUF variant to train on")
    return model.alias, ggufs[0]


def resolve_base(
    store: ModelStore, catalog: Catalog, name: str, *, progress: ProgressCallback | None = None
) -> BaseModel:
    """The local GGUF of NAME's base variant, assembled or downloaded when not cached yet."""
    alias, variant = gguf_variant_of(catalog, name)
    model, _ = catalog.variant(variant.id)
    path = ensure_variant(store, catalog, model, variant, progress=progress)
    if path.is_dir():
        files = sorted(path.glob("*.gguf"))
        if len(files) != 1:
            raise InvalidRequestError(f"'{variant.name}' is not a single GGUF file")
        path = files[0]
    return BaseModel(alias=alias, variant_id=variant.id, path=path, chat_template=variant.chat_template)
