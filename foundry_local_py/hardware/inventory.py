"""What this machine has: plain frozen data, built by :mod:`.detect` or by hand in tests.

Nothing here probes anything; :func:`foundry_local_py.hardware.detect.detect_hardware` fills these
types, and the variant choice (:mod:`.select`) reads them. Tests build simulated inventories
(a CUDA box, an NPU laptop, a machine without a GPU) directly from these classes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

GpuVendor = Literal["nvidia", "amd", "intel", "apple", "qualcomm", "unknown"]


@dataclass(frozen=True)
class CpuInfo:
    model: str = "unknown"
    vendor: str = "unknown"
    arch: str = "unknown"
    """``platform.machine()``: 'x86_64', 'aarch64', 'arm64', 'AMD64', ..."""
    physical_cores: int | None = None
    logical_cores: int | None = None
    usable_cores: int | None = None
    """Cores this process may run on (CPU affinity / container limits)."""
    features: tuple[str, ...] = ()
    """Normalised SIMD features: avx, avx2, fma, f16c, avx512f, avx512_vnni, avx512_bf16,
    avx_vnni, amx_tile, amx_bf16, amx_int8, neon, dotprod, i8mm, sve."""
    features_source: str = "none"
    """Where ``features`` came from: 'cpuinfo', 'sysctl', 'llama.cpp' or 'none'."""

    def has(self, feature: str) -> bool:
        return feature in self.features

    @property
    def avx2(self) -> bool:
        return self.has("avx2")

    @property
    def avx512(self) -> bool:
        return self.has("avx512f")

    @property
    def neon(self) -> bool:
        return self.has("neon")

    @property
    def amx(self) -> bool:
        return self.has("amx_tile")


@dataclass(frozen=True)
class MemoryInfo:
    total_bytes: int = 0
    available_bytes: int = 0


@dataclass(frozen=True)
class GpuInfo:
    index: int
    vendor: GpuVendor
    name: str
    memory_total_bytes: int | None = None
    memory_free_bytes: int | None = None
    driver_version: str | None = None
    compute_capability: str | None = None
    """CUDA compute capability ('8.9') for NVIDIA GPUs."""
    unified_memory: bool = False
    """The GPU shares system RAM (Apple silicon)."""
    source: str = "unknown"
    """'nvml', 'nvidia-smi' or 'platform'."""


@dataclass(frozen=True)
class NpuInfo:
    vendor: str
    name: str
    source: str = "unknown"
    """'sysfs' (Linux accel driver) or 'platform'."""


@dataclass(frozen=True)
class ProviderCheck:
    """The result of creating (and running) a one-node session on a provider."""

    provider: str
    ok: bool | None
    """True: it initialised and ran; False: it failed or onnxruntime fell back to the CPU;
    None: not checked (the provider needs options to start, or is slow to start)."""
    detail: str = ""


@dataclass(frozen=True)
class OnnxRuntimeInfo:
    installed: bool = False
    version: str | None = None
    distribution: str | None = None
    """'onnxruntime', 'onnxruntime-gpu', 'onnxruntime-directml', ... (they share one import name)."""
    providers: tuple[str, ...] = ()
    """``onnxruntime.get_available_providers()``: what the installed build can create."""
    genai_installed: bool = False
    genai_version: str | None = None
    genai_distribution: str | None = None
    """'onnxruntime-genai', 'onnxruntime-genai-cuda', ... (one import name, one per environment)."""
    provider_checks: tuple[ProviderCheck, ...] = ()
    """Filled when detection ran with ``verify_providers=True``; empty otherwise."""

    def check(self, provider: str) -> ProviderCheck | None:
        wanted = provider.lower()
        return next((c for c in self.provider_checks if c.provider.lower() == wanted), None)


@dataclass(frozen=True)
class LlamaCppInfo:
    installed: bool = False
    version: str | None = None
    gpu_offload: bool = False
    """``llama_supports_gpu_offload()``: built with CUDA, Metal, Vulkan, ROCm or SYCL."""
    system_info: str | None = None
    """``llama_print_system_info()``: the CPU features the library was built for."""


@dataclass(frozen=True)
class HardwareInventory:
    system: str = "unknown"
    """``platform.system()``: 'Linux', 'Windows', 'Darwin'."""
    cpu: CpuInfo = field(default_factory=CpuInfo)
    memory: MemoryInfo = field(default_factory=MemoryInfo)
    gpus: tuple[GpuInfo, ...] = ()
    npus: tuple[NpuInfo, ...] = ()
    metal: bool = False
    """Apple Metal is usable (macOS on Apple silicon)."""
    onnxruntime: OnnxRuntimeInfo = field(default_factory=OnnxRuntimeInfo)
    llama_cpp: LlamaCppInfo = field(default_factory=LlamaCppInfo)
    errors: tuple[str, ...] = ()
    """One line per probe that failed ('probe: what went wrong'); never paths."""

    def has_provider(self, provider: str) -> bool:
        """Whether onnxruntime lists ``provider`` (a full name such as 'CUDAExecutionProvider')."""
        wanted = provider.lower()
        return any(p.lower() == wanted for p in self.onnxruntime.providers)

    def gpus_of(self, vendor: GpuVendor) -> tuple[GpuInfo, ...]:
        return tuple(g for g in self.gpus if g.vendor == vendor)

    @property
    def nvidia_gpus(self) -> tuple[GpuInfo, ...]:
        return self.gpus_of("nvidia")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (tuples become lists); CPU feature flags are spelled out too."""
        data = dataclasses.asdict(self)
        data["cpu"].update(
            avx2=self.cpu.avx2, avx512=self.cpu.avx512, neon=self.cpu.neon, amx=self.cpu.amx
        )
        return data
