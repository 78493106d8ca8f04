"""PEFT LoRA folder -> llama.cpp's GGUF LoRA adapter, checked against the base GGUF it will run on.

The format (what llama.cpp's ``llama_adapter_lora_init`` reads; see its ``convert_lora_to_gguf.py``):

- metadata ``general.type = "adapter"``, ``adapter.type = "lora"``, ``adapter.lora.alpha`` (float32)
  and ``general.architecture`` equal to the base's (llama.cpp refuses a mismatch);
- per adapted weight ``W`` of the base (GGUF name ``blk.N.attn_q.weight`` ...) two tensors
  ``<name>.lora_a`` and ``<name>.lora_b``. PEFT's ``lora_A`` is ``(r, in)`` and ``lora_B`` is
  ``(out, r)`` in row-major order; GGUF lists dimensions innermost first, so they are stored as
  they are: llama.cpp checks ``a.ne[0] == W.ne[0]`` (in), ``b.ne[1] == W.ne[1]`` (out) and
  ``a.ne[1] == b.ne[0]`` (r), and computes ``W x + scale * B (A x)`` with
  ``scale = alpha / r`` (times the per-request scale).

Two transformations keep the product equal to what PEFT computes:

- **RoPE row order (Llama).** llama.cpp's HF -> GGUF conversion permutes the output rows of
  ``q_proj`` / ``k_proj`` (pairs of rotary dimensions interleaved per head), and transformers
  undoes it when loading a GGUF, so an adapter trained on the loaded weights lives in HF row order.
  ``P (W + B A) = P W + (P B) A``: ``lora_b`` of q and k gets the same row permutation (with the
  key/value head count for k).
- **Scale.** PEFT scales by ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA); llama.cpp always by
  ``alpha / r``, so for rsLoRA ``lora_b`` is multiplied by the ratio.

Anything llama.cpp could not apply the same way is refused with :class:`InvalidRequestError`
before a file is written: adapters on embeddings or the output head, DoRA, trained biases,
``modules_to_save``, per-module alphas, modules with no GGUF tensor, and a base whose architecture,
layer count or tensor shapes differ from the adapter's. Messages never hold filesystem paths.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..cache.gguf_info import read_gguf_header
from ..errors import InvalidRequestError

#: GGUF architectures whose HF weights map to GGUF tensors by name only, and whether q/k rows are
#: RoPE-permuted by llama.cpp's converter (and un-permuted by transformers' GGUF loader).
ARCHITECTURES: dict[str, bool] = {
    "llama": True,
    "qwen2": False,
    "qwen3": False,
    "gemma2": False,
    "gemma3": False,
}
#: Modules llama.cpp's adapter path does not treat like a linear layer of a block.
REFUSED_MODULES = frozenset(
    {"embed_tokens", "lm_head", "wte", "wpe", "embed_out", "tok_embeddings", "output"}
)
PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
_LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class BaseHeader:
    """What the export needs from the base GGUF: its architecture, hyperparameters, tensor shapes
    (row-major, i.e. GGUF's dimensions reversed)."""

    architecture: str
    values: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]

    def int_value(self, key: str) -> int | None:
        value = self.values.get(f"{self.architecture}.{key}")
        return value if isinstance(value, int) and not isinstance(value, bool) else None


def read_base_header(path: Path) -> BaseHeader:
    """The base GGUF's metadata scalars and tensor table (:func:`read_gguf_header`: arrays such as
    the vocabulary are skipped), its shapes turned row-major."""
    try:
        header = read_gguf_header(path)
    except FileNotFoundError as exc:
        raise InvalidRequestError("the base model file is missing") from exc
    except (ValueError, OSError) as exc:
        raise InvalidRequestError(f"the base model is not a readable GGUF file ({exc})") from exc
    arch = header.values.get("general.architecture")
    if not isinstance(arch, str):
        raise InvalidRequestError("the base GGUF names no architecture")
    shapes = {name: tuple(reversed(dims)) for name, dims in header.tensors.items()}
    return BaseHeader(architecture=arch, values=header.values, shapes=shapes)


def rope_permute_rows(rows: Any, n_head: int) -> Any:
    """llama.cpp's HF -> GGUF reordering of q/k output rows: per head, the two halves of the
    rotary dimensions are interleaved (row ``h*d + i*2 + j`` <- row ``h*d + j*d/2 + i``)."""
    n_rows = rows.shape[0]
    if n_rows % (2 * n_head):
        raise InvalidRequestError("the adapter's q/k rows do not split into the base's attention heads")
    return rows.reshape(n_head, 2, n_rows // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def read_adapter_config(peft_dir: Path) -> dict[str, Any]:
    if not peft_dir.is_dir():
        raise InvalidRequestError("the PEFT adapter folder does not exist")
    path = peft_dir / "adapter_config.json"
    if not path.is_file():
        raise InvalidRequestError("the PEFT folder has no adapter_config.json")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequestError("the PEFT folder's adapter_config.json is not valid JSON") from exc
    if not isinstance(config, dict):
        raise InvalidRequestError("the PEFT folder's adapter_config.json is not an object")
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise InvalidRequestError(
            f"only LoRA adapters can be exported (this one is {peft_type or 'untyped'})"
        )
    refusals = {
        "use_dora": "DoRA adapters are not supported by llama.cpp",
        "modules_to_save": "adapters that also save fully trained modules (modules_to_save) "
                           "are not supported",
        "alpha_pattern": "per-module alphas (alpha_pattern) are not supported",
        "layer_replication": "layer replication is not supported",
        "lora_bias": "adapters with trained LoRA biases are not supported",
        "fan_in_fan_out": "fan_in_fan_out (Conv1D) adapters are not supported",
    }
    for key, why in refusals.items():
        if config.get(key):
            raise InvalidRequestError(why)
    if config.get("bias", "none") != "none":
        raise InvalidRequestError(
            "adapters that train the base's biases are not supported (bias must be 'none')"
        )
    alpha = config.get("lora_alpha")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        raise InvalidRequestError("adapter_config.json has no positive lora_alpha")
    targets = config.get("target_modules")
    names = [targets] if isinstance(targets, str) else list(targets or [])
    refused = sorted(n for n in names if n.rsplit(".", 1)[-1] in REFUSED_MODULES)
    if refused:
        raise InvalidRequestError(
            f"unsupported target module(s) {', '.join(refused)}: only the linear layers of the "
            "transformer blocks (attention and MLP projections) can be served with llama.cpp"
        )
    return config


def load_adapter_tensors(peft_dir: Path) -> dict[str, Any]:
    """The adapter's tensors as float32 numpy arrays."""
    import numpy as np

    path = peft_dir / "adapter_model.safetensors"
    if not path.is_file():
        if (peft_dir / "adapter_model.bin").is_file():
            raise InvalidRequestError(
                "the PEFT folder holds a pickled adapter_model.bin; save it with safetensors "
                "(save_pretrained(..., safe_serialization=True))"
            )
        raise InvalidRequestError("the PEFT folder has no adapter_model.safetensors")
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError as exc:  # pragma: no cover - part of the [finetune] extra
        raise InvalidRequestError("exporting adapters needs the [finetune] extra (safetensors)") from exc
    out: dict[str, Any] = {}
    try:
        with safe_open(str(path), framework="numpy") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
                out[key] = np.asarray(f.get_tensor(key), dtype=np.float32)
    except (SafetensorError, TypeError, ValueError) as exc:
        if "bf16" in str(exc).lower() or "bfloat16" in str(exc).lower():
            return _load_bf16(path)
        raise InvalidRequestError(f"the adapter weights are not a valid safetensors file ({exc})") from exc
    return out


def _load_bf16(path: Path) -> dict[str, Any]:
    try:
        from safetensors.torch import load_file
    except ImportError as exc:
        raise InvalidRequestError("bfloat16 adapter weights need torch to be read") from exc
    return {k: v.float().numpy() for k, v in load_file(str(path)).items()}


def pair_lora_tensors(tensors: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """module path (without PEFT's prefix) -> (lora_A, lora_B); anything else is refused."""
    halves: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        match = _LORA_KEY.match(key)
        if match is None:
            what = "embedding LoRA" if "lora_embedding" in key else "a non-LoRA tensor"
            raise InvalidRequestError(f"the adapter holds {what} ('{key}'), which cannot be exported")
        module = match["module"].removeprefix(PEFT_PREFIX)
        halves.setdefault(module, {})[match["ab"]] = value
    pairs: dict[str, tuple[Any, Any]] = {}
    for module, ab in halves.items():
        if set(ab) != {"A", "B"}:
            raise InvalidRequestError(f"module '{module}' has only one of lora_A / lora_B")
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise InvalidRequestError(f"module '{module}': lora_A / lora_B shapes do not form a rank-r pair")
        pairs[module] = (a, b)
    if not pairs:
        raise InvalidRequestError("the adapter holds no LoRA tensors")
    return pairs


def peft_to_gguf(peft_dir: Path, out_path: Path, *, base_gguf: Path) -> dict[str, Any]:
    """Convert the PEFT LoRA folder ``peft_dir`` to a GGUF LoRA at ``out_path`` for ``base_gguf``.

    Returns ``{"architecture", "rank", "alpha", "target_modules", "target_tensors", "n_layers",
    "rope_permuted", "scale_adjusted"}``. Raises :class:`InvalidRequestError` for an adapter
    llama.cpp could not apply to that base exactly.
    """
    try:
        import gguf
    except ImportError as exc:  # pragma: no cover - part of the [finetune] extra
        raise InvalidRequestError("exporting adapters needs the [finetune] extra (gguf)") from exc
    config = read_adapter_config(peft_dir)
    header = read_base_header(base_gguf)
    arch = header.architecture
    if arch not in ARCHITECTURES:
        raise InvalidRequestError(
            f"adapters for '{arch}' models are not supported (supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    n_blocks = header.int_value("block_count")
    n_head, n_head_kv = header.int_value("attention.head_count"), header.int_value("attention.head_count_kv")
    if n_blocks is None or n_head is None:
        raise InvalidRequestError("the base GGUF lacks its block or head count")
    n_head_kv = n_head_kv or n_head
    pairs = pair_lora_tensors(load_adapter_tensors(peft_dir))

    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    name_map = gguf.get_tensor_name_map(arch_enum, n_blocks)
    alpha = float(config["lora_alpha"])
    rslora = bool(config.get("use_rslora"))
    permute = ARCHITECTURES[arch]
    out_tensors: list[tuple[str, Any, Any]] = []
    modules: set[str] = set()
    ranks: set[int] = set()
    for module, (a, b_peft) in sorted(pairs.items(), key=lambda kv: _module_order(kv[0])):
        short = module.rsplit(".", 1)[-1]
        if short in REFUSED_MODULES:
            raise InvalidRequestError(f"unsupported target module '{short}': embeddings and the output head "
                                      "cannot be adapted for llama.cpp")
        layer = _LAYER.search(f".{module}.")
        if layer is not None and int(layer[1]) >= n_blocks:
            raise InvalidRequestError(
                f"the adapter targets layer {layer[1]} but the base model has {n_blocks} layers (wrong base?)"
            )
        target = name_map.get_name(module + ".weight", try_suffixes=(".weight",))
        if target is None or not target.endswith(".weight") or ".layers." not in f".{module}":
            raise InvalidRequestError(
                f"unsupported target module '{short}' ({module}): no llama.cpp tensor for it"
            )
        shape = header.shapes.get(target)
        if shape is None:
            raise InvalidRequestError(
                f"the base model has no tensor '{target}' for module '{module}' (wrong base?)"
            )
        if len(shape) != 2 or shape != (b_peft.shape[0], a.shape[1]):
            raise InvalidRequestError(
                f"module '{module}' is {b_peft.shape[0]}x{a.shape[1]} in the adapter but '{target}' is "
                f"{'x'.join(str(d) for d in shape)} in the base (wrong base?)"
            )
        rank = int(a.shape[0])
        b = b_peft * ((alpha / rank**0.5) / (alpha / rank)) if rslora else b_peft
        if permute and target.endswith(".attn_q.weight"):
            b = rope_permute_rows(b, n_head)
        elif permute and target.endswith(".attn_k.weight"):
            b = rope_permute_rows(b, n_head_kv)
        out_tensors.append((target.removesuffix(".weight"), a, b))
        modules.add(short)
        ranks.add(rank)

    _write(gguf, out_path, arch, alpha, out_tensors)
    return {
        "architecture": arch,
        "rank": max(ranks),
        "alpha": alpha,
        "target_modules": sorted(modules),
        "target_tensors": [f"{name}.weight" for name, _, _ in out_tensors],
        "n_layers": len({name.split(".")[1] for name, _, _ in out_tensors if name.startswith("blk.")}),
        "rope_permuted": permute and any(n.endswith(("attn_q", "attn_k")) for n, _, _ in out_tensors),
        "scale_adjusted": rslora,
    }


def _module_order(module: str) -> tuple[int, str]:
    layer = _LAYER.search(f".{module}.")
    return (int(layer[1]) if layer else -1, module)


def _write(gguf: Any, out_path: Path, arch: str, alpha: float, tensors: list[tuple[str, Any, Any]]) -> None:
    import numpy as np

    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(out_path.name + ".partial")
    writer = gguf.GGUFWriter(str(partial), arch)
    try:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for name, a, b in tensors:
            writer.add_tensor(f"{name}.weight.lora_a", np.ascontiguousarray(a, dtype=np.float32))
            writer.add_tensor(f"{name}.weight.lora_b", np.ascontiguousarray(b, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    os.replace(partial, out_path)
