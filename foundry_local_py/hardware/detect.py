"""Detect what this machine offers: CPU, RAM, GPUs, NPUs and the runtimes' execution providers.

:func:`detect_hardware` runs a set of probes (:class:`Probes`). Every probe is cheap (no model is
loaded, subprocesses have short timeouts), imports its runtime lazily, and never raises: a failing
probe leaves its part of the inventory empty and adds one line to ``inventory.errors``. Nothing is
cached here; the server keeps the inventory it built on ``app.state``.

Facts the probes rely on:

- onnxruntime's ``get_available_providers()`` is what the installed build can create; it says
  nothing about a device being present (onnxruntime-gpu lists CUDA on a machine without a GPU),
  so the variant choice also asks for the device, and the loader's fallback handles the rest.
- ``onnxruntime_genai.is_qnn_available()`` / ``is_openvino_available()`` /
  ``is_webgpu_available()`` return True on a CPU-only build: they are not evidence and are not used.
- NVML (``nvidia-ml-py``) missing, or its shared library missing, means "no NVIDIA GPU";
  ``nvidia-smi`` is the fallback when NVML is unusable.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from .inventory import (
    CpuInfo,
    GpuInfo,
    HardwareInventory,
    LlamaCppInfo,
    MemoryInfo,
    NpuInfo,
    OnnxRuntimeInfo,
    ProviderCheck,
)

T = TypeVar("T")

SUBPROCESS_TIMEOUT_S = 5.0
MIB = 1024 * 1024

# /proc/cpuinfo flag (x86 'flags', ARM 'Features') -> our feature name.
_CPUINFO_FLAGS = MappingProxyType({
    "avx": "avx",
    "avx2": "avx2",
    "fma": "fma",
    "f16c": "f16c",
    "avx512f": "avx512f",
    "avx512_vnni": "avx512_vnni",
    "avx512_bf16": "avx512_bf16",
    "avx_vnni": "avx_vnni",
    "amx_tile": "amx_tile",
    "amx_bf16": "amx_bf16",
    "amx_int8": "amx_int8",
    "asimd": "neon",
    "neon": "neon",
    "asimddp": "dotprod",
    "i8mm": "i8mm",
    "sve": "sve",
})

# llama_print_system_info() key -> our feature name.
_LLAMA_FLAGS = MappingProxyType({
    "AVX": "avx",
    "AVX2": "avx2",
    "FMA": "fma",
    "F16C": "f16c",
    "AVX512": "avx512f",
    "AVX512_VNNI": "avx512_vnni",
    "AVX512_BF16": "avx512_bf16",
    "AVX_VNNI": "avx_vnni",
    "AMX_INT8": "amx_int8",
    "NEON": "neon",
    "ARM_FMA": "fma",
    "DOTPROD": "dotprod",
    "MATMUL_INT8": "i8mm",
    "SVE": "sve",
})

# macOS sysctl feature words (Intel Macs) -> our feature name.
_SYSCTL_FLAGS = MappingProxyType({
    "AVX1.0": "avx",
    "AVX2": "avx2",
    "FMA": "fma",
    "F16C": "f16c",
    "AVX512F": "avx512f",
    "AVX512VNNI": "avx512_vnni",
})

_X86_VENDORS = MappingProxyType({"GenuineIntel": "Intel", "AuthenticAMD": "AMD", "HygonGenuine": "Hygon"})
_ARM_IMPLEMENTERS = MappingProxyType({
    "0x41": "ARM",
    "0x42": "Broadcom",
    "0x48": "HiSilicon",
    "0x4e": "NVIDIA",
    "0x51": "Qualcomm",
    "0x61": "Apple",
    "0xc0": "Ampere",
})
# Linux accel-subsystem drivers of NPUs.
_ACCEL_DRIVERS = MappingProxyType({
    "intel_vpu": ("intel", "Intel NPU"),
    "amdxdna": ("amd", "AMD XDNA NPU"),
    "qaic": ("qualcomm", "Qualcomm Cloud AI"),
})
_ORT_DISTRIBUTIONS = (
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxruntime-directml",
    "onnxruntime-qnn",
    "onnxruntime-openvino",
    "onnxruntime-silicon",
)
_GENAI_DISTRIBUTIONS = ("onnxruntime-genai", "onnxruntime-genai-cuda", "onnxruntime-genai-directml")

_PATHISH = re.compile(r"(?:[A-Za-z]:)?[\\/][^\s'\"]*")


# --- helpers ---------------------------------------------------------------------------------


def safe_error(exc: BaseException) -> str:
    """A short description of ``exc`` without filesystem paths (inventories are served to clients)."""
    text = _PATHISH.sub("<path>", str(exc)).strip()
    text = re.sub(r"\s+", " ", text)[:200]
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


def _distribution(candidates: Iterable[str]) -> tuple[str | None, str | None]:
    """The first installed distribution among ``candidates`` and its version."""
    for name in candidates:
        try:
            return name, importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None, None


def _run(args: list[str]) -> str | None:
    """stdout of a short command, or None when it is missing or fails."""
    exe = shutil.which(args[0])
    if exe is None:
        return None
    try:
        done = subprocess.run(
            [exe, *args[1:]], capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


# --- parsers (pure; tested on sample text) ---------------------------------------------------


def parse_proc_cpuinfo(text: str) -> tuple[str, str, tuple[str, ...]]:
    """(model name, vendor, features) from Linux ``/proc/cpuinfo`` (x86 or ARM)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if fields and not line.strip():
                break  # the first processor's block is enough
            continue
        fields.setdefault(key.strip().lower(), value.strip())
    model = fields.get("model name") or fields.get("hardware") or fields.get("cpu model") or "unknown"
    vendor = _X86_VENDORS.get(fields.get("vendor_id", ""), fields.get("vendor_id", ""))
    if not vendor:
        vendor = _ARM_IMPLEMENTERS.get(fields.get("cpu implementer", "").lower(), "unknown")
    flags = (fields.get("flags") or fields.get("features") or "").split()
    features = sorted({_CPUINFO_FLAGS[f] for f in flags if f in _CPUINFO_FLAGS})
    return model, vendor, tuple(features)


def parse_llama_system_info(text: str) -> tuple[str, ...]:
    """Features from ``llama_print_system_info()`` ('CPU : SSE3 = 1 | AVX2 = 1 | ...')."""
    found = set()
    for key, value in re.findall(r"([A-Z0-9_]+)\s*=\s*(\d+)", text):
        if key in _LLAMA_FLAGS and value != "0":
            found.add(_LLAMA_FLAGS[key])
    return tuple(sorted(found))


def parse_nvidia_smi(text: str, *, with_compute_cap: bool) -> list[GpuInfo]:
    """GPUs from ``nvidia-smi --query-gpu=index,name,memory.total,memory.free,driver_version[,compute_cap]
    --format=csv,noheader,nounits`` (memory in MiB)."""
    gpus: list[GpuInfo] = []
    for line in text.strip().splitlines():
        cols = [c.strip() for c in line.split(",")]
        if len(cols) < 5:
            continue
        gpus.append(
            GpuInfo(
                index=index if (index := _int(cols[0])) is not None else len(gpus),
                vendor="nvidia",
                name=cols[1],
                memory_total_bytes=_mib(cols[2]),
                memory_free_bytes=_mib(cols[3]),
                driver_version=cols[4] or None,
                compute_capability=(cols[5] or None) if with_compute_cap and len(cols) > 5 else None,
                source="nvidia-smi",
            )
        )
    return gpus


def _int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _mib(text: str) -> int | None:
    value = _int(text)
    return value * MIB if value is not None else None


# --- probes ----------------------------------------------------------------------------------


def probe_cpu() -> CpuInfo:
    import psutil

    arch = platform.machine() or "unknown"
    model, vendor, source = platform.processor() or "unknown", "unknown", "none"
    features: tuple[str, ...] = ()
    system = platform.system()
    if system == "Linux":
        model, vendor, features = parse_proc_cpuinfo(Path("/proc/cpuinfo").read_text(errors="replace"))
        source = "cpuinfo"
    elif system == "Darwin":
        brand = _run(["sysctl", "-n", "machdep.cpu.brand_string"])
        model = brand.strip() if brand else model
        vendor = "Apple" if arch == "arm64" else "Intel"
        if arch == "arm64":
            features, source = ("dotprod", "neon"), "sysctl"  # NEON and dot product on every M chip
        else:
            words = (_run(["sysctl", "-n", "machdep.cpu.features", "machdep.cpu.leaf7_features"]) or "")
            features = tuple(sorted({_SYSCTL_FLAGS[w] for w in words.split() if w in _SYSCTL_FLAGS}))
            source = "sysctl"
    if not features:
        llama = _llama_system_info()
        if llama:
            features, source = parse_llama_system_info(llama), "llama.cpp"
    try:
        usable: int | None = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS / Windows
        usable = os.cpu_count()
    return CpuInfo(
        model=model,
        vendor=vendor,
        arch=arch,
        physical_cores=psutil.cpu_count(logical=False),
        logical_cores=psutil.cpu_count(logical=True),
        usable_cores=usable,
        features=features,
        features_source=source,
    )


def _llama_system_info() -> str | None:
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    import llama_cpp

    return _text(llama_cpp.llama_print_system_info())


def probe_memory() -> MemoryInfo:
    import psutil

    vm = psutil.virtual_memory()
    return MemoryInfo(total_bytes=int(vm.total), available_bytes=int(vm.available))


class NvmlUnavailable(Exception):
    """NVML is not there (no nvidia-ml-py, or no driver library): no NVIDIA GPU as far as it knows."""


def probe_nvml() -> list[GpuInfo]:
    """NVIDIA GPUs via NVML. Raises :class:`NvmlUnavailable` when NVML itself is absent."""
    if importlib.util.find_spec("pynvml") is None:
        raise NvmlUnavailable("nvidia-ml-py is not installed")
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError_LibraryNotFound as exc:
        raise NvmlUnavailable("the NVML library is not installed") from exc
    except pynvml.NVMLError_DriverNotLoaded as exc:
        raise NvmlUnavailable("the NVIDIA driver is not loaded") from exc
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            try:
                major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
                capability: str | None = f"{major}.{minor}"
            except pynvml.NVMLError:
                capability = None
            gpus.append(
                GpuInfo(
                    index=index,
                    vendor="nvidia",
                    name=_text(pynvml.nvmlDeviceGetName(handle)),
                    memory_total_bytes=int(mem.total),
                    memory_free_bytes=int(mem.free),
                    driver_version=driver,
                    compute_capability=capability,
                    source="nvml",
                )
            )
        return gpus
    finally:
        pynvml.nvmlShutdown()


def probe_nvidia_smi() -> list[GpuInfo] | None:
    """NVIDIA GPUs via ``nvidia-smi``; None when it is not installed or fails."""
    base = "index,name,memory.total,memory.free,driver_version"
    fmt = "--format=csv,noheader,nounits"
    out = _run(["nvidia-smi", f"--query-gpu={base},compute_cap", fmt])
    if out is not None:
        return parse_nvidia_smi(out, with_compute_cap=True)
    out = _run(["nvidia-smi", f"--query-gpu={base}", fmt])  # drivers before compute_cap existed
    return parse_nvidia_smi(out, with_compute_cap=False) if out is not None else None


def probe_nvidia(
    nvml: Callable[[], list[GpuInfo]] = probe_nvml,
    smi: Callable[[], list[GpuInfo] | None] = probe_nvidia_smi,
) -> list[GpuInfo]:
    """NVML first; ``nvidia-smi`` when NVML is absent or fails. Raises only when both fail."""
    try:
        return nvml()
    except NvmlUnavailable:
        return smi() or []
    except Exception as exc:
        gpus = smi()
        if gpus is None:
            raise RuntimeError(f"NVML failed ({safe_error(exc)}) and nvidia-smi is unavailable") from exc
        return gpus


def probe_apple(memory: MemoryInfo) -> tuple[bool, list[GpuInfo]]:
    """(Metal usable, the Apple GPU): macOS on Apple silicon; the GPU shares system memory."""
    if platform.system() != "Darwin" or platform.machine() != "arm64":
        return False, []
    brand = (_run(["sysctl", "-n", "machdep.cpu.brand_string"]) or "Apple silicon").strip()
    gpu = GpuInfo(
        index=0,
        vendor="apple",
        name=f"{brand} GPU",
        memory_total_bytes=memory.total_bytes or None,
        memory_free_bytes=memory.available_bytes or None,
        unified_memory=True,
        source="platform",
    )
    return True, [gpu]


def probe_npus(accel_root: Path = Path("/sys/class/accel")) -> list[NpuInfo]:
    """NPUs: Linux accel drivers; Snapdragon on Windows; the Neural Engine on Apple silicon.

    Intel and AMD NPUs on Windows are not detected (that needs WMI, which is not cheap).
    """
    system, machine = platform.system(), platform.machine()
    if system == "Darwin" and machine == "arm64":
        return [NpuInfo(vendor="apple", name="Apple Neural Engine", source="platform")]
    if system == "Windows" and machine.upper() == "ARM64" and "qualcomm" in platform.processor().lower():
        return [NpuInfo(vendor="qualcomm", name="Qualcomm Hexagon NPU", source="platform")]
    found = []
    if accel_root.is_dir():
        for node in sorted(accel_root.iterdir()):
            driver = node / "device" / "driver"
            name = driver.resolve().name if driver.exists() else ""
            vendor, label = _ACCEL_DRIVERS.get(name, ("unknown", f"accelerator ({name or 'unknown'})"))
            found.append(NpuInfo(vendor=vendor, name=label, source="sysfs"))
    return found


def probe_onnxruntime() -> OnnxRuntimeInfo:
    genai_dist, genai_version = _distribution(_GENAI_DISTRIBUTIONS)
    genai = importlib.util.find_spec("onnxruntime_genai") is not None
    if importlib.util.find_spec("onnxruntime") is None:
        return OnnxRuntimeInfo(
            genai_installed=genai, genai_version=genai_version, genai_distribution=genai_dist
        )
    version, providers = _onnxruntime_providers()
    dist, _ = _distribution(_ORT_DISTRIBUTIONS)
    return OnnxRuntimeInfo(
        installed=True,
        version=version,
        distribution=dist,
        providers=providers,
        genai_installed=genai,
        genai_version=genai_version,
        genai_distribution=genai_dist,
    )


_ORT_QUERY = ("import json, onnxruntime as o; "
              "print(json.dumps([str(o.__version__), [str(p) for p in o.get_available_providers()]]))")


def _onnxruntime_providers() -> tuple[str, tuple[str, ...]]:
    """onnxruntime's version and listed providers. Asked in a child process unless onnxruntime is
    already imported here: importing it costs a server ~19 MiB of resident memory for its whole
    life, even when it serves only GGUF models (an ONNX model's engine loads it when needed)."""
    import sys

    if "onnxruntime" not in sys.modules:
        try:
            out = subprocess.run([sys.executable, "-c", _ORT_QUERY], capture_output=True, text=True,
                                 timeout=60, check=True).stdout
            version, providers = json.loads(out.strip().splitlines()[-1])
            return str(version), tuple(str(p) for p in providers)
        except (OSError, ValueError, IndexError, subprocess.SubprocessError):
            pass  # asked in-process below
    import onnxruntime

    return str(onnxruntime.__version__), tuple(str(p) for p in onnxruntime.get_available_providers())


# Providers a bare session can start without options, and that start quickly.
_CHECKABLE_PROVIDERS = frozenset({
    "CPUExecutionProvider", "CUDAExecutionProvider", "DmlExecutionProvider", "ROCMExecutionProvider",
    "MIGraphXExecutionProvider", "CoreMLExecutionProvider", "WebGpuExecutionProvider",
})
_NOT_DEVICES = frozenset({"AzureExecutionProvider"})


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes | int) -> bytes:
    if isinstance(payload, int):
        return _varint(number << 3) + _varint(payload)
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def identity_model_bytes() -> bytes:
    """A one-node ONNX model (y = Identity(x), x: float[1]) encoded by hand, so checking a provider
    needs no ``onnx`` package and no file."""

    def value_info(name: str) -> bytes:
        shape = _field(2, _field(1, _field(1, 1)))  # TensorShapeProto{dim{dim_value: 1}}
        tensor = _field(1, 1) + shape  # elem_type FLOAT
        return _field(1, name.encode()) + _field(2, _field(1, tensor))

    node = _field(1, b"x") + _field(2, b"y") + _field(4, b"Identity")
    graph = _field(1, node) + _field(2, b"check") + _field(11, value_info("x")) + _field(
        12, value_info("y"))
    opset = _field(2, 13)
    return _field(1, 8) + _field(7, graph) + _field(8, opset)


def probe_provider_sessions(providers: Iterable[str]) -> tuple[ProviderCheck, ...]:
    """Start a one-node session on each provider and run it: evidence that
    ``get_available_providers()`` alone does not give (onnxruntime-gpu lists CUDA even when CUDA's
    libraries or the GPU are missing, and then silently falls back to the CPU)."""
    import numpy as np
    import onnxruntime

    model = identity_model_bytes()
    checks = []
    for name in providers:
        if name in _NOT_DEVICES:
            continue
        if name not in _CHECKABLE_PROVIDERS:
            checks.append(ProviderCheck(name, None, "not checked (needs provider options or a slow start)"))
            continue
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 4  # the fallback warning is what we report, not print
        chain = [name] if name == "CPUExecutionProvider" else [name, "CPUExecutionProvider"]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "not in available provider names", reported below
                session = onnxruntime.InferenceSession(model, sess_options=options, providers=chain)
            (out,) = session.run(None, {"x": np.ones(1, dtype=np.float32)})
            if name not in session.get_providers():
                checks.append(ProviderCheck(name, False, "onnxruntime fell back to the CPU "
                                                         "(its libraries or device are missing)"))
            elif float(out[0]) != 1.0:
                checks.append(ProviderCheck(name, False, "a test session returned a wrong result"))
            else:
                checks.append(ProviderCheck(name, True, "a test session ran"))
        except Exception as exc:
            checks.append(ProviderCheck(name, False, safe_error(exc)))
    return tuple(checks)


def probe_llama_cpp() -> LlamaCppInfo:
    if importlib.util.find_spec("llama_cpp") is None:
        return LlamaCppInfo()
    import llama_cpp

    return LlamaCppInfo(
        installed=True,
        version=str(getattr(llama_cpp, "__version__", "")) or None,
        gpu_offload=bool(llama_cpp.llama_supports_gpu_offload()),
        system_info=_text(llama_cpp.llama_print_system_info()).strip() or None,
    )


@dataclass(frozen=True)
class Probes:
    """The probes :func:`detect_hardware` runs; replace any of them in tests."""

    cpu: Callable[[], CpuInfo] = probe_cpu
    memory: Callable[[], MemoryInfo] = probe_memory
    nvidia: Callable[[], list[GpuInfo]] = probe_nvidia
    apple: Callable[[MemoryInfo], tuple[bool, list[GpuInfo]]] = probe_apple
    npus: Callable[[], list[NpuInfo]] = probe_npus
    onnxruntime: Callable[[], OnnxRuntimeInfo] = probe_onnxruntime
    provider_sessions: Callable[[Iterable[str]], tuple[ProviderCheck, ...]] = probe_provider_sessions
    llama_cpp: Callable[[], LlamaCppInfo] = probe_llama_cpp


def detect_hardware(probes: Probes | None = None, *, verify_providers: bool = False) -> HardwareInventory:
    """Run every probe; a failing probe yields its default and one line in ``errors``.

    ``verify_providers`` also starts a one-node onnxruntime session on each listed provider
    (milliseconds on the CPU, about a second for a GPU provider's first context), recorded in
    ``inventory.onnxruntime.provider_checks``; the variant choice skips providers that failed.
    """
    probes = probes or Probes()
    errors: list[str] = []

    def attempt(name: str, fn: Callable[[], T], default: T) -> T:
        try:
            return fn()
        except Exception as exc:
            errors.append(f"{name}: {safe_error(exc)}")
            return default

    cpu = attempt("cpu", probes.cpu, CpuInfo(arch=platform.machine() or "unknown"))
    memory = attempt("memory", probes.memory, MemoryInfo())
    no_gpus: list[GpuInfo] = []
    no_npus: list[NpuInfo] = []
    nvidia = attempt("nvidia", probes.nvidia, no_gpus)
    metal, apple_gpus = attempt("apple", lambda: probes.apple(memory), (False, no_gpus))
    npus = attempt("npu", probes.npus, no_npus)
    ort = attempt("onnxruntime", probes.onnxruntime, OnnxRuntimeInfo())
    if verify_providers and ort.installed:
        no_checks: tuple[ProviderCheck, ...] = ()
        checks = attempt("providers", lambda: probes.provider_sessions(ort.providers), no_checks)
        ort = dataclasses.replace(ort, provider_checks=checks)
    llama = attempt("llama.cpp", probes.llama_cpp, LlamaCppInfo())
    return HardwareInventory(
        system=platform.system() or "unknown",
        cpu=cpu,
        memory=memory,
        gpus=tuple(nvidia) + tuple(apple_gpus),
        npus=tuple(npus),
        metal=metal,
        onnxruntime=ort,
        llama_cpp=llama,
        errors=tuple(errors),
    )


def refresh_memory(inventory: HardwareInventory, probes: Probes | None = None) -> HardwareInventory:
    """The same inventory with RAM and GPU memory measured again (free memory changes as models
    load). Cheap: no runtime is imported. A failing probe keeps the old figures and adds an error."""
    probes = probes or Probes()
    errors = list(inventory.errors)
    try:
        memory = probes.memory()
    except Exception as exc:
        errors.append(f"memory: {safe_error(exc)}")
        memory = inventory.memory
    try:
        nvidia = tuple(probes.nvidia())
    except Exception as exc:
        errors.append(f"nvidia: {safe_error(exc)}")
        nvidia = inventory.nvidia_gpus
    try:
        _, apple = probes.apple(memory)
    except Exception as exc:
        errors.append(f"apple: {safe_error(exc)}")
        apple = list(inventory.gpus_of("apple"))
    others = tuple(g for g in inventory.gpus if g.vendor not in {"nvidia", "apple"})
    return dataclasses.replace(
        inventory, memory=memory, gpus=nvidia + tuple(apple) + others, errors=tuple(errors)
    )
