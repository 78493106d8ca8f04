"""Real GGUF LoRA adapter files, written with the ``gguf`` package (no training needed).

:func:`write_lora` writes llama.cpp's LoRA format (``general.type = adapter``, ``adapter.type =
lora``, ``adapter.lora.alpha``, ``<tensor>.lora_a`` / ``.lora_b`` pairs) with seeded random A/B
for some layers' ``attn_q`` / ``attn_v``: big enough to change SmolLM2's greedy output, small
enough that the text stays text-like. Shapes default to SmolLM2-135M's (n_embd 576, 30 layers,
q 576 -> 576, v 576 -> 192); :data:`GEMMA_DIMS` gives a file for another base.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SMOL_DIMS = {"arch": "llama", "n_embd": 576, "q_out": 576, "v_out": 192}
GEMMA_DIMS = {"arch": "gemma3", "n_embd": 640, "q_out": 1024, "v_out": 256}


def write_lora(path: Path, *, seed: int = 0, layers: tuple[int, ...] = (0, 1, 2, 3, 4, 5), rank: int = 8,
               alpha: float = 16.0, std: float = 0.05, dims: dict[str, object] | None = None,
               targets: tuple[str, ...] = ("attn_q", "attn_v")) -> Path:
    import gguf

    d = dict(SMOL_DIMS if dims is None else dims)
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), str(d["arch"]))
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    n_embd = int(d["n_embd"])  # type: ignore[call-overload]
    for layer in layers:
        for target in targets:
            n_out = int(d["q_out" if target == "attn_q" else "v_out"])  # type: ignore[call-overload]
            # numpy shape is GGML's reversed: lora_a ne = [n_embd, rank], lora_b ne = [rank, n_out]
            a = rng.normal(0.0, std, size=(rank, n_embd)).astype(np.float32)
            b = rng.normal(0.0, std * 4, size=(n_out, rank)).astype(np.float32)
            writer.add_tensor(f"blk.{layer}.{target}.weight.lora_a", a)
            writer.add_tensor(f"blk.{layer}.{target}.weight.lora_b", b)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def truncate(src: Path, dst: Path, keep: float = 0.6) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst
