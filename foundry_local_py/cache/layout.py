"""Safe paths inside the cache (the lesson of Ollama's CVE-2024-37032).

Every name that comes from a catalog, a hub listing or a request passes through here before it
touches the filesystem: no absolute paths, no ``..``, no NUL, no drive letters or backslashes, and
the resolved result (symlinks followed) must stay under the root.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from ..errors import UnsafePathError


def check_relative_path(value: str, *, single_component: bool = False) -> str:
    """Validate a relative POSIX path from untrusted input; return it unchanged."""
    if not value or "\x00" in value:
        raise UnsafePathError("path must be non-empty and contain no NUL byte")
    if "\\" in value or (len(value) > 1 and value[1] == ":"):
        raise UnsafePathError("path must use '/' and no drive letter")
    pure = PurePosixPath(value)
    if pure.is_absolute():
        raise UnsafePathError("path must be relative")
    parts = value.split("/")  # not pure.parts: PurePosixPath drops "." and empty components
    if any(p in ("..", ".", "") for p in parts):
        raise UnsafePathError("path must not contain '.' or '..' components")
    if single_component and len(parts) != 1:
        raise UnsafePathError("a file name must not contain '/'")
    return value


def safe_join(root: Path, *relative: str) -> Path:
    """Join validated relative parts to ``root`` and prove the result stays inside it."""
    for part in relative:
        check_relative_path(part)
    candidate = root.joinpath(*relative)
    ensure_within(root, candidate)
    return candidate


def ensure_within(root: Path, candidate: Path) -> Path:
    """Raise unless ``candidate`` (symlinks resolved) is ``root`` or below it."""
    root_resolved = root.resolve()
    resolved = candidate.resolve()
    if resolved != root_resolved and root_resolved not in resolved.parents:
        raise UnsafePathError("path escapes the cache directory")
    return candidate


def check_registered_path(value: str) -> str:
    """Validate a path a user registers as a model: absolute, normalised, no NUL.

    Callers (the CLI) resolve what the user typed first; anything that still holds ``.`` or
    ``..`` components, a NUL byte or a relative form did not come from a resolved path.
    """
    if not value or "\x00" in value:
        raise UnsafePathError("path must be non-empty and contain no NUL byte")
    if not os.path.isabs(value):
        raise UnsafePathError("a registered path must be absolute")
    if any(p in ("..", ".") for p in value.replace("\\", "/").split("/")):
        raise UnsafePathError("a registered path must not contain '.' or '..' components")
    return value


def check_no_escaping_symlinks(folder: Path) -> None:
    """Raise if any entry below ``folder`` is a symlink that resolves outside it.

    A registered or downloaded model folder is read by engines that follow links; a link to
    ``/etc`` or another user's files inside it would let a model "file" read anything.
    """
    root = folder.resolve()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        for name in (*dirnames, *filenames):
            entry = Path(dirpath) / name
            if entry.is_symlink():
                target = entry.resolve()
                if target != root and root not in target.parents:
                    raise UnsafePathError("a symlink in the model folder points outside it")
