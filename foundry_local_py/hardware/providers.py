"""Execution-provider names and Foundry Local's device ranks.

Foundry Local picks a model's variant by device class:
``NPU > vendor GPU > CUDA GPU > generic GPU > vendor CPU > generic CPU``.
A catalog variant's ``device`` and ``execution_provider`` map onto those classes so:

============  =================================================  ===============
device        execution provider                                 class
============  =================================================  ===============
npu           any (QNN, OpenVINO, VitisAI, CoreML)                NPU
gpu           OpenVINO, MIGraphX, ROCm, CoreML, Metal             vendor GPU
gpu           CUDA, TensorRT, NvTensorRTRTX                       CUDA GPU
gpu           DirectML, WebGPU (and anything not listed)          generic GPU
cpu           OpenVINO, oneDNN                                    vendor CPU
cpu           CPU (ONNX CPU and every llama.cpp CPU variant)      generic CPU
============  =================================================  ===============

A llama.cpp (GGUF) variant with ``device: gpu`` runs with GPU offload; its provider field says
which backend the catalog meant ('CUDAExecutionProvider' for CUDA, 'MetalExecutionProvider' for
Metal) and it ranks like the table says.
"""

from __future__ import annotations

from enum import IntEnum
from types import MappingProxyType

from ..errors import InvalidRequestError


class DeviceClass(IntEnum):
    """Lower is preferred."""

    NPU = 0
    VENDOR_GPU = 1
    CUDA_GPU = 2
    GENERIC_GPU = 3
    VENDOR_CPU = 4
    GENERIC_CPU = 5

    @property
    def label(self) -> str:
        """'NPU', 'vendor GPU', 'CUDA GPU', 'generic GPU', 'vendor CPU', 'generic CPU'."""
        kind, _, unit = self.name.rpartition("_")
        return f"{kind.lower() if kind != 'CUDA' else kind} {unit}".strip()


# short name -> full provider name (the names onnxruntime reports).
PROVIDERS = MappingProxyType(
    {
        "cpu": "CPUExecutionProvider",
        "cuda": "CUDAExecutionProvider",
        "tensorrt": "TensorrtExecutionProvider",
        "nv_tensorrt_rtx": "NvTensorRTRTXExecutionProvider",
        "dml": "DmlExecutionProvider",
        "webgpu": "WebGpuExecutionProvider",
        "qnn": "QNNExecutionProvider",
        "openvino": "OpenVINOExecutionProvider",
        "vitisai": "VitisAIExecutionProvider",
        "coreml": "CoreMLExecutionProvider",
        "migraphx": "MIGraphXExecutionProvider",
        "rocm": "ROCMExecutionProvider",
        "dnnl": "DnnlExecutionProvider",
        "metal": "MetalExecutionProvider",  # not an onnxruntime provider: llama.cpp's Metal backend
    }
)
_SPELLINGS = MappingProxyType({"directml": "dml", "trt": "tensorrt", "ov": "openvino"})
_FULL_TO_SHORT = MappingProxyType({full.lower(): short for short, full in PROVIDERS.items()})

# Foundry Local's per-request ``ep`` values, listed first in error messages.
FOUNDRY_EP_VALUES = ("cpu", "cuda", "dml", "qnn", "webgpu")

NVIDIA_PROVIDERS = frozenset({"cuda", "tensorrt", "nv_tensorrt_rtx"})
GENERIC_GPU_PROVIDERS = frozenset({"dml", "webgpu"})
VENDOR_CPU_PROVIDERS = frozenset({"openvino", "dnnl"})
# ONNX GenAI GPU models built for one of these run on the others too (Foundry Local loads its
# WebGPU/CUDA models with ``ep=cuda`` where CUDA is present); order = preference when substituting.
PORTABLE_GPU_PROVIDERS = ("cuda", "dml", "webgpu")

DEVICES = ("cpu", "gpu", "npu")


def short_ep(provider: str) -> str:
    """'CUDAExecutionProvider' -> 'cuda'; unknown full names lose the suffix and are lower-cased."""
    key = provider.strip().lower()
    if key in PROVIDERS:
        return key
    if key in _FULL_TO_SHORT:
        return _FULL_TO_SHORT[key]
    return key.removesuffix("executionprovider")


def full_ep(short: str) -> str:
    return PROVIDERS.get(short, short)


def normalize_ep(value: str | None) -> str | None:
    """A user's ``ep`` (Foundry Local's dml|cuda|qnn|cpu|webgpu, or a full provider name, any case)
    as a short name; None or ''/'auto' means no preference. Unknown names raise
    :class:`InvalidRequestError` with ``param='ep'``."""
    if value is None:
        return None
    key = value.strip().lower()
    if key in {"", "auto"}:
        return None
    key = _SPELLINGS.get(key, key)
    if key in PROVIDERS:
        return key
    if key in _FULL_TO_SHORT:
        return _FULL_TO_SHORT[key]
    others = sorted(set(PROVIDERS) - set(FOUNDRY_EP_VALUES))
    raise InvalidRequestError(
        f"Unknown execution provider '{value[:64]}'. Use one of {', '.join(FOUNDRY_EP_VALUES)} "
        f"(or {', '.join(others)}), or a full provider name such as 'CUDAExecutionProvider'.",
        param="ep",
        code="invalid_ep",
    )


def normalize_device(value: str | None) -> str | None:
    """'cpu' | 'gpu' | 'npu' (any case); None or ''/'auto' means no preference."""
    if value is None:
        return None
    key = value.strip().lower()
    if key in {"", "auto"}:
        return None
    if key in DEVICES:
        return key
    raise InvalidRequestError(
        f"Unknown device '{value[:64]}'. Use one of cpu, gpu, npu (or auto).",
        param="device",
        code="invalid_device",
    )


def device_class(device: str, ep: str) -> DeviceClass:
    """The Foundry Local class of a variant with ``device`` built for provider ``ep`` (short name)."""
    if device == "npu":
        return DeviceClass.NPU
    if device == "gpu":
        if ep in NVIDIA_PROVIDERS:
            return DeviceClass.CUDA_GPU
        if ep in GENERIC_GPU_PROVIDERS or ep in {"cpu", ""} or ep not in PROVIDERS:
            return DeviceClass.GENERIC_GPU
        return DeviceClass.VENDOR_GPU
    if ep in VENDOR_CPU_PROVIDERS:
        return DeviceClass.VENDOR_CPU
    return DeviceClass.GENERIC_CPU
