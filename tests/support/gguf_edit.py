"""Just enough of the GGUF format (v2/v3) to make hostile files from a good one: find the offset of
a metadata value or of a tensor's dimensions, and patch it in place."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q",
            12: "<d"}
STRING, ARRAY = 8, 9


@dataclass
class Layout:
    kv: dict[str, tuple[int, int]]
    """key -> (value type, offset of the value)"""
    tensors: dict[str, tuple[int, list[int]]]
    """tensor name -> (offset of its first dimension, dimensions)"""
    data_start: int


def read_layout(data: bytes) -> Layout:
    assert data[:4] == b"GGUF"
    pos = 8
    n_tensors, n_kv = struct.unpack_from("<QQ", data, pos)
    pos += 16

    def string(p: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", data, p)
        return data[p + 8 : p + 8 + n].decode("utf-8", errors="replace"), p + 8 + n

    def skip(kind: int, p: int) -> int:
        if kind in _SCALARS:
            return p + struct.calcsize(_SCALARS[kind])
        if kind == STRING:
            return string(p)[1]
        if kind == ARRAY:
            item, n = struct.unpack_from("<IQ", data, p)
            p += 12
            if item in _SCALARS:
                return p + n * struct.calcsize(_SCALARS[item])
            for _ in range(n):
                p = skip(item, p)
            return p
        raise ValueError(f"unknown GGUF type {kind}")

    kv: dict[str, tuple[int, int]] = {}
    alignment = 32
    for _ in range(n_kv):
        key, pos = string(pos)
        (kind,) = struct.unpack_from("<I", data, pos)
        pos += 4
        kv[key] = (kind, pos)
        if key == "general.alignment":
            alignment = struct.unpack_from("<I", data, pos)[0]
        pos = skip(kind, pos)
    tensors: dict[str, tuple[int, list[int]]] = {}
    for _ in range(n_tensors):
        name, pos = string(pos)
        (n_dims,) = struct.unpack_from("<I", data, pos)
        pos += 4
        dims = list(struct.unpack_from(f"<{n_dims}Q", data, pos))
        tensors[name] = (pos, dims)
        pos += 8 * n_dims + 4 + 8  # dims, type, offset
    data_start = (pos + alignment - 1) // alignment * alignment
    return Layout(kv, tensors, data_start)


def patch_kv_uint(path: Path, key: str, value: int) -> None:
    data = bytearray(path.read_bytes())
    kind, offset = read_layout(bytes(data)).kv[key]
    struct.pack_into(_SCALARS[kind], data, offset, value)
    path.write_bytes(bytes(data))


def patch_tensor_dim(path: Path, tensor: str, dim: int, value: int) -> None:
    data = bytearray(path.read_bytes())
    offset, _dims = read_layout(bytes(data)).tensors[tensor]
    struct.pack_into("<Q", data, offset + 8 * dim, value)
    path.write_bytes(bytes(data))
