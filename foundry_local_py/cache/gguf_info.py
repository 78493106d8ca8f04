"""What a GGUF file says about itself: architecture, training context, chat template.

Reads only the header's key/value section (arrays such as the vocabulary are skipped, not
parsed), with bounds on every count and length, so a hostile or truncated file fails with a
``ValueError`` instead of exhausting memory.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

GGUF_MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
            12: "<d"}
_STRING, _ARRAY = 8, 9
MAX_KV = 1 << 20
MAX_STRING = 16 << 20
_WANTED_SUFFIXES = (".context_length",)
_WANTED = {"general.architecture", "general.name", "tokenizer.chat_template"}


@dataclass(frozen=True)
class GgufInfo:
    architecture: str | None
    name: str | None
    context_length: int | None
    chat_template: str | None


def _read(f: IO[bytes], n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ValueError("truncated GGUF header")
    return data


def _u32(f: IO[bytes]) -> int:
    return int(struct.unpack("<I", _read(f, 4))[0])


def _u64(f: IO[bytes]) -> int:
    return int(struct.unpack("<Q", _read(f, 8))[0])


def _string(f: IO[bytes], keep: bool = True) -> str | None:
    n = _u64(f)
    if n > MAX_STRING:
        raise ValueError("GGUF string too long")
    if not keep:
        f.seek(n, 1)
        return None
    return _read(f, n).decode("utf-8", errors="replace")


def _value(f: IO[bytes], vtype: int, keep: bool) -> Any:
    if vtype in _SCALARS:
        fmt = _SCALARS[vtype]
        return struct.unpack(fmt, _read(f, struct.calcsize(fmt)))[0]
    if vtype == _STRING:
        return _string(f, keep)
    if vtype == _ARRAY:
        etype, count = _u32(f), _u64(f)
        if etype in _SCALARS:
            f.seek(struct.calcsize(_SCALARS[etype]) * count, 1)
        elif etype == _STRING:
            for _ in range(count):
                _string(f, keep=False)
        else:
            raise ValueError("unsupported GGUF array type")
        return None
    raise ValueError(f"unknown GGUF value type {vtype}")


def read_gguf_info(path: Path) -> GgufInfo:
    values: dict[str, Any] = {}
    with path.open("rb") as f:
        if _read(f, 4) != GGUF_MAGIC:
            raise ValueError("not a GGUF file")
        version = _u32(f)
        if version < 2:
            raise ValueError("GGUF version 1 is not supported")
        _u64(f)  # tensor count
        kv_count = _u64(f)
        if kv_count > MAX_KV:
            raise ValueError("too many GGUF metadata entries")
        for _ in range(kv_count):
            key = _string(f) or ""
            vtype = _u32(f)
            keep = key in _WANTED or key.endswith(_WANTED_SUFFIXES)
            value = _value(f, vtype, keep)
            if keep:
                values[key] = value
    arch = values.get("general.architecture")
    ctx = values.get(f"{arch}.context_length") if isinstance(arch, str) else None
    template = values.get("tokenizer.chat_template")
    return GgufInfo(
        architecture=arch if isinstance(arch, str) else None,
        name=values.get("general.name") if isinstance(values.get("general.name"), str) else None,
        context_length=int(ctx) if isinstance(ctx, int) and ctx > 0 else None,
        chat_template=template if isinstance(template, str) and template.strip() else None,
    )


@dataclass(frozen=True)
class GgufHeader:
    """A GGUF file's scalar metadata (strings and numbers; arrays skipped) and tensor shapes
    (GGML order: ``ne[0]`` first)."""

    values: dict[str, Any]
    tensors: dict[str, tuple[int, ...]]


def read_gguf_header(path: Path) -> GgufHeader:
    """Metadata and tensor shapes from the header only (fast even for a large vocabulary)."""
    values: dict[str, Any] = {}
    tensors: dict[str, tuple[int, ...]] = {}
    with path.open("rb") as f:
        if _read(f, 4) != GGUF_MAGIC:
            raise ValueError("not a GGUF file")
        if _u32(f) < 2:
            raise ValueError("GGUF version 1 is not supported")
        n_tensors, kv_count = _u64(f), _u64(f)
        if kv_count > MAX_KV or n_tensors > MAX_KV:
            raise ValueError("too many GGUF entries")
        for _ in range(kv_count):
            key = _string(f) or ""
            vtype = _u32(f)
            value = _value(f, vtype, keep=vtype != _ARRAY)
            if value is not None:
                values[key] = value
        for _ in range(n_tensors):
            name = _string(f) or ""
            n_dims = _u32(f)
            if n_dims > 8:
                raise ValueError("GGUF tensor with too many dimensions")
            tensors[name] = tuple(_u64(f) for _ in range(n_dims))
            _u32(f)  # type
            _u64(f)  # offset
    return GgufHeader(values, tensors)
