"""Register a local GGUF file or ONNX GenAI folder as a model (the user catalog).

Registered models are entries with a ``local`` source in ``<cache_dir>/catalog.json``; their files
stay where they are. The path is checked when registering and again when resolving: absolute and
normalised, no NUL, a real GGUF file (magic bytes) or an ONNX GenAI folder whose symlinks stay
inside it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from filelock import FileLock
from pydantic import ValidationError

from ..engines.backends import detect_format
from ..errors import ConflictError, InvalidRequestError, UnsafePathError
from .catalog import (
    Catalog,
    CatalogFile,
    CatalogModel,
    ModelFormat,
    read_catalog_file,
    user_catalog_path,
)
from .layout import check_registered_path
from .store import check_local_model

LOCAL_PUBLISHER = "local"


def check_alias(alias: str) -> str:
    if not alias or "\x00" in alias or "/" in alias or "\\" in alias or ".." in alias:
        raise UnsafePathError("an alias must be a plain name (no '/', '\\\\', '..' or NUL)")
    return alias


def register_local(
    cache_dir: Path,
    path: str | Path,
    alias: str,
    *,
    fmt: ModelFormat | None = None,
    catalog: Catalog | None = None,
    display_name: str | None = None,
    context_length: int = 4096,
    precision: str = "unknown",
    chat: bool = True,
    replace: bool = False,
) -> CatalogModel:
    """Add (or with ``replace``, overwrite) a user catalog entry for a local model.

    ``path`` must be absolute and normalised: callers resolve what a user typed
    (``Path(p).expanduser().resolve()``). ``catalog`` (the merged one) is used to refuse an alias
    that already exists unless ``replace``.
    """
    check_alias(alias)
    resolved = Path(check_registered_path(str(path)))
    if not resolved.exists():
        raise InvalidRequestError("the path to register does not exist")
    fmt = fmt or detect_format(resolved)
    check_local_model(resolved, fmt)
    if catalog is not None and catalog.model(alias) is not None and not replace:
        raise ConflictError(f"a model named '{alias}' already exists; pass --force to replace it")
    try:
        model = CatalogModel.model_validate(
            {
                "alias": alias,
                "display_name": display_name or alias,
                "publisher": LOCAL_PUBLISHER,
                "task": "chat-completion" if chat else "text-completion",
                "license": "unknown",
                "context_length": context_length,
                "description": "Registered local model.",
                "variants": [
                    {
                        "name": f"{alias}-{fmt}-local",
                        "format": fmt,
                        "device": "cpu",
                        "precision": precision,
                        "size_bytes": _size(resolved),
                        "source": {"kind": "local", "path": str(resolved)},
                    }
                ],
            }
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ()))
        raise InvalidRequestError(f"invalid model entry ({where}): {first.get('msg', 'invalid')}") from exc

    with _catalog_lock(cache_dir):
        current = _read_user_catalog(cache_dir)
        others = [m for m in current.models if m.alias.lower() != alias.lower()]
        if len(others) != len(current.models) and not replace:
            raise ConflictError(f"a model named '{alias}' already exists; pass --force to replace it")
        _write_user_catalog(cache_dir, CatalogFile(models=[*others, model]))
    return model


def read_user_models(cache_dir: Path) -> list[CatalogModel]:
    """The models of the user catalog (none when it does not exist)."""
    return list(_read_user_catalog(cache_dir).models)


def add_user_models(cache_dir: Path, models: list[CatalogModel]) -> None:
    """Add or replace entries of the user catalog (by alias), under its lock, atomically."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    keys = {m.alias.lower() for m in models}
    with _catalog_lock(cache_dir):
        current = _read_user_catalog(cache_dir)
        others = [m for m in current.models if m.alias.lower() not in keys]
        _write_user_catalog(cache_dir, CatalogFile(models=[*others, *models]))


def unregister_local(cache_dir: Path, alias: str) -> bool:
    """Drop a registered model from the user catalog; its files are not touched."""
    with _catalog_lock(cache_dir):
        current = _read_user_catalog(cache_dir)
        keep = [
            m
            for m in current.models
            if not (m.alias.lower() == alias.lower() and all(v.source.kind == "local" for v in m.variants))
        ]
        if len(keep) == len(current.models):
            return False
        _write_user_catalog(cache_dir, CatalogFile(models=keep))
        return True


def _size(path: Path) -> int | None:
    if path.is_file():
        return path.stat().st_size or None
    total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    return total or None


def _catalog_lock(cache_dir: Path) -> FileLock:
    locks = cache_dir / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    return FileLock(str(locks / "user-catalog.lock"), timeout=30)


def _read_user_catalog(cache_dir: Path) -> CatalogFile:
    path = user_catalog_path(cache_dir)
    return read_catalog_file(path) if path.is_file() else CatalogFile()


def _write_user_catalog(cache_dir: Path, data: CatalogFile) -> None:
    path = user_catalog_path(cache_dir)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".catalog-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data.model_dump(mode="json", exclude_none=True), f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
