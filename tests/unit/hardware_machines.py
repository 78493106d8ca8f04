"""Simulated machines and catalog entries for the hardware tests (no hardware needed)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from foundry_local_py.cache.catalog import CatalogModel
from foundry_local_py.hardware.inventory import (
    GpuInfo,
    HardwareInventory,
    LlamaCppInfo,
    MemoryInfo,
    NpuInfo,
    OnnxRuntimeInfo,
)

GIB = 1024**3
HUB = {"kind": "huggingface", "repo": "org/repo", "files": [{"path": "model.bin"}]}


def variant(name: str, fmt: str, device: str, ep: str, *, version: int = 1, size: float | None = 1.0,
            source: dict[str, Any] | None = None, precision: str = "int4") -> dict[str, Any]:
    return {
        "name": name,
        "version": version,
        "format": fmt,
        "device": device,
        "execution_provider": ep,
        "precision": precision,
        "size_bytes": int(size * GIB) if size is not None else None,
        "source": source or HUB,
    }


def model(*variants: dict[str, Any]) -> CatalogModel:
    return CatalogModel.model_validate(
        {
            "alias": "phi",
            "display_name": "Phi",
            "publisher": "microsoft",
            "license": "mit",
            "context_length": 4096,
            "variants": list(variants),
        }
    )


NPU_QNN = variant("phi-npu-qnn", "onnx", "npu", "QNNExecutionProvider")
GPU_CUDA = variant("phi-gpu-cuda", "onnx", "gpu", "CUDAExecutionProvider", size=3)
GPU_DML = variant("phi-gpu-dml", "onnx", "gpu", "DmlExecutionProvider", size=3)
GPU_WEBGPU = variant("phi-gpu-webgpu", "onnx", "gpu", "WebGpuExecutionProvider", size=3)
GPU_OPENVINO = variant("phi-gpu-openvino", "onnx", "gpu", "OpenVINOExecutionProvider", size=3)
CPU_OPENVINO = variant("phi-cpu-openvino", "onnx", "cpu", "OpenVINOExecutionProvider")
CPU_ONNX = variant("phi-cpu-onnx", "onnx", "cpu", "CPUExecutionProvider")
GGUF_CPU = variant("phi-q4-gguf-cpu", "gguf", "cpu", "CPUExecutionProvider", precision="q4_k_m")
GGUF_CUDA = variant("phi-q4-gguf-cuda", "gguf", "gpu", "CUDAExecutionProvider", size=3)
GGUF_METAL = variant("phi-q4-gguf-metal", "gguf", "gpu", "MetalExecutionProvider", size=3)

ORT_CPU = OnnxRuntimeInfo(
    installed=True, version="1.32.0", distribution="onnxruntime",
    providers=("AzureExecutionProvider", "CPUExecutionProvider"),
    genai_installed=True, genai_version="0.18.0", genai_distribution="onnxruntime-genai",
)
LLAMA_CPU = LlamaCppInfo(installed=True, version="0.3.36", gpu_offload=False)
LLAMA_GPU = LlamaCppInfo(installed=True, version="0.3.36", gpu_offload=True)


def rtx(free_gib: float = 7.5, total_gib: float = 8.0, index: int = 0) -> GpuInfo:
    return GpuInfo(index=index, vendor="nvidia", name="NVIDIA GeForce RTX 4060",
                   memory_total_bytes=int(total_gib * GIB), memory_free_bytes=int(free_gib * GIB),
                   driver_version="550.54", compute_capability="8.9", source="nvml")


# Simulated machines.
NO_GPU = HardwareInventory(system="Linux", memory=MemoryInfo(16 * GIB, 12 * GIB),
                           onnxruntime=ORT_CPU, llama_cpp=LLAMA_CPU)
CUDA_8GB = HardwareInventory(
    system="Linux", memory=MemoryInfo(32 * GIB, 24 * GIB), gpus=(rtx(),),
    onnxruntime=replace(
        ORT_CPU, distribution="onnxruntime-gpu", genai_distribution="onnxruntime-genai-cuda",
        providers=("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")),
    llama_cpp=LLAMA_GPU,
)
NPU_LAPTOP = HardwareInventory(
    system="Windows", memory=MemoryInfo(16 * GIB, 9 * GIB),
    npus=(NpuInfo(vendor="qualcomm", name="Qualcomm Hexagon NPU", source="platform"),),
    onnxruntime=replace(ORT_CPU, distribution="onnxruntime-qnn",
                        providers=("QNNExecutionProvider", "CPUExecutionProvider")),
    llama_cpp=LLAMA_CPU,
)
DML_BOX = HardwareInventory(
    system="Windows", memory=MemoryInfo(32 * GIB, 20 * GIB),
    onnxruntime=replace(ORT_CPU, distribution="onnxruntime-directml",
                        providers=("DmlExecutionProvider", "CPUExecutionProvider")),
    llama_cpp=LLAMA_CPU,
)
APPLE = HardwareInventory(
    system="Darwin", memory=MemoryInfo(16 * GIB, 10 * GIB), metal=True,
    gpus=(GpuInfo(0, "apple", "Apple M2 GPU", 16 * GIB, 10 * GIB, unified_memory=True, source="platform"),),
    npus=(NpuInfo("apple", "Apple Neural Engine", "platform"),),
    onnxruntime=replace(ORT_CPU, providers=("CoreMLExecutionProvider", "CPUExecutionProvider")),
    llama_cpp=LLAMA_GPU,
)
# Everything available at once: to check the class order alone.
EVERYTHING = HardwareInventory(
    system="Linux", memory=MemoryInfo(64 * GIB, 60 * GIB), gpus=(rtx(70, 80),),
    npus=(NpuInfo("intel", "Intel NPU", "sysfs"),),
    onnxruntime=replace(ORT_CPU, providers=(
        "QNNExecutionProvider", "OpenVINOExecutionProvider", "CUDAExecutionProvider",
        "DmlExecutionProvider", "WebGpuExecutionProvider", "CPUExecutionProvider")),
    llama_cpp=LLAMA_GPU,
)
