"""Detection logic with injected probes and sample tool output (no hardware needed)."""

from __future__ import annotations

import importlib.machinery
import json
import platform
import sys
from dataclasses import replace

import pytest

from foundry_local_py.hardware import detect
from foundry_local_py.hardware.detect import (
    NvmlUnavailable,
    Probes,
    detect_hardware,
    parse_llama_system_info,
    parse_nvidia_smi,
    parse_proc_cpuinfo,
    probe_npus,
    probe_nvidia,
    refresh_memory,
    safe_error,
)
from foundry_local_py.hardware.inventory import CpuInfo, GpuInfo, MemoryInfo, OnnxRuntimeInfo, ProviderCheck

X86_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme sse sse2 avx f16c fma avx2 avx512f avx512_vnni avx512_bf16 amx_tile amx_bf16 amx_int8

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu
"""

ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics asimddp sve i8mm
CPU implementer\t: 0x41
CPU architecture: 8
"""

SMI = """0, NVIDIA GeForce RTX 4060, 8188, 7642, 550.54.14, 8.9
1, NVIDIA A100-SXM4-80GB, 81920, 81000, 550.54.14, 8.0
"""


def test_parse_x86_cpuinfo_reads_first_block_only():
    model, vendor, features = parse_proc_cpuinfo(X86_CPUINFO)
    assert model == "Intel(R) Xeon(R) Platinum 8480+"
    assert vendor == "Intel"
    assert features == ("amx_bf16", "amx_int8", "amx_tile", "avx", "avx2", "avx512_bf16",
                        "avx512_vnni", "avx512f", "f16c", "fma")


def test_parse_arm_cpuinfo():
    model, vendor, features = parse_proc_cpuinfo(ARM_CPUINFO)
    assert vendor == "ARM" and model == "unknown"
    assert features == ("dotprod", "i8mm", "neon", "sve")
    cpu = CpuInfo(features=features)
    assert cpu.neon and not cpu.avx2 and not cpu.avx512 and not cpu.amx


def test_parse_llama_system_info():
    text = "CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | AVX512 = 0 | F16C = 1 | FMA = 1 | NEON = 0 | REPACK = 1 |"
    assert parse_llama_system_info(text) == ("avx", "avx2", "f16c", "fma")
    assert parse_llama_system_info("Metal : EMBED_LIBRARY = 1 | CPU : NEON = 1 | ARM_FMA = 1 | "
                                   "DOTPROD = 1 | MATMUL_INT8 = 1 |") == ("dotprod", "fma", "i8mm", "neon")


def test_parse_nvidia_smi():
    gpus = parse_nvidia_smi(SMI, with_compute_cap=True)
    assert [g.index for g in gpus] == [0, 1]
    assert gpus[0].name == "NVIDIA GeForce RTX 4060"
    assert gpus[0].memory_total_bytes == 8188 * 2**20 and gpus[0].memory_free_bytes == 7642 * 2**20
    assert gpus[1].compute_capability == "8.0" and gpus[1].driver_version == "550.54.14"
    old = parse_nvidia_smi("0, Tesla K80, 11441, [N/A], 470.1\ngarbage\n", with_compute_cap=False)
    assert len(old) == 1 and old[0].memory_free_bytes is None and old[0].compute_capability is None


def _gpu() -> GpuInfo:
    return GpuInfo(index=0, vendor="nvidia", name="X", memory_total_bytes=1, memory_free_bytes=1)


def test_probe_nvidia_prefers_nvml_then_falls_back_to_smi():
    assert probe_nvidia(nvml=lambda: [_gpu()], smi=lambda: pytest.fail("smi not needed")) == [_gpu()]

    def absent() -> list[GpuInfo]:
        raise NvmlUnavailable("not installed")

    assert probe_nvidia(nvml=absent, smi=lambda: None) == []
    assert probe_nvidia(nvml=absent, smi=lambda: [_gpu()]) == [_gpu()]

    def broken() -> list[GpuInfo]:
        raise RuntimeError("Driver/library version mismatch")

    assert probe_nvidia(nvml=broken, smi=lambda: [_gpu()]) == [_gpu()]
    with pytest.raises(RuntimeError, match=r"NVML failed .*mismatch.* nvidia-smi is unavailable"):
        probe_nvidia(nvml=broken, smi=lambda: None)


def test_failing_probe_is_recorded_without_paths_and_others_still_run():
    def boom() -> CpuInfo:
        raise OSError("cannot read /proc/cpuinfo or C:\\Windows\\x.dll")

    probes = replace(Probes(), cpu=boom, nvidia=lambda: [_gpu()], memory=lambda: MemoryInfo(10, 5))
    inv = detect_hardware(probes)
    assert inv.cpu.model == "unknown" and inv.cpu.arch == (platform.machine() or "unknown")
    assert inv.gpus == (_gpu(),)
    assert inv.memory == MemoryInfo(10, 5)
    assert len(inv.errors) == 1 and inv.errors[0].startswith("cpu: OSError: cannot read <path>")
    assert "/proc" not in inv.errors[0] and "Windows" not in inv.errors[0]
    json.dumps(inv.to_dict())


def test_apple_probe_receives_memory_and_adds_gpu():
    apple_gpu = GpuInfo(0, "apple", "Apple M3 GPU", 8, 4, unified_memory=True, source="platform")
    seen = []

    def apple(memory: MemoryInfo) -> tuple[bool, list[GpuInfo]]:
        seen.append(memory)
        return True, [apple_gpu]

    inv = detect_hardware(replace(Probes(), apple=apple, memory=lambda: MemoryInfo(8, 4),
                                  nvidia=lambda: []))
    assert seen == [MemoryInfo(8, 4)]
    assert inv.metal and inv.gpus == (apple_gpu,)


def test_provider_checks_run_only_when_asked():
    calls = []

    def sessions(providers):
        calls.append(tuple(providers))
        return (ProviderCheck("CPUExecutionProvider", True, "ran"),)

    ort = OnnxRuntimeInfo(installed=True, providers=("CPUExecutionProvider",))
    probes = replace(Probes(), onnxruntime=lambda: ort, provider_sessions=sessions)
    assert detect_hardware(probes).onnxruntime.provider_checks == ()
    inv = detect_hardware(probes, verify_providers=True)
    assert calls == [("CPUExecutionProvider",)]
    assert inv.onnxruntime.check("cpuexecutionprovider") == ProviderCheck("CPUExecutionProvider", True, "ran")
    assert inv.onnxruntime.check("CUDAExecutionProvider") is None

    def broken(providers):
        raise RuntimeError("boom")

    inv = detect_hardware(replace(probes, provider_sessions=broken), verify_providers=True)
    assert inv.onnxruntime.provider_checks == () and inv.errors == ("providers: RuntimeError: boom",)


def test_safe_error():
    assert safe_error(ValueError()) == "ValueError"
    assert safe_error(OSError("libnvidia-ml.so.1: cannot open /usr/lib/x")) == (
        "OSError: libnvidia-ml.so.1: cannot open <path>")
    assert len(safe_error(RuntimeError("x" * 1000))) < 230


@pytest.mark.skipif(platform.system() != "Linux", reason="sysfs accel layout is Linux's")
def test_probe_npus_reads_linux_accel_drivers(tmp_path):
    drivers = tmp_path / "drivers"
    for name in ("intel_vpu", "mystery"):
        (drivers / name).mkdir(parents=True)
    for i, name in enumerate(("intel_vpu", "mystery")):
        dev = tmp_path / "accel" / f"accel{i}" / "device"
        dev.mkdir(parents=True)
        (dev / "driver").symlink_to(drivers / name)
    (tmp_path / "accel" / "accel2" / "device").mkdir(parents=True)  # no driver bound
    npus = probe_npus(tmp_path / "accel")
    assert [(n.vendor, n.name) for n in npus] == [
        ("intel", "Intel NPU"), ("unknown", "accelerator (mystery)"), ("unknown", "accelerator (unknown)")]
    assert probe_npus(tmp_path / "absent") == []


def test_nvml_absent_when_module_missing(monkeypatch):
    monkeypatch.setattr(detect.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(NvmlUnavailable):
        detect.probe_nvml()


class _FakeNvml:
    """The slice of nvidia-ml-py that probe_nvml calls, with a machine of two GPUs."""

    class NVMLError(Exception):
        pass

    class NVMLError_LibraryNotFound(NVMLError):
        pass

    class NVMLError_DriverNotLoaded(NVMLError):
        pass

    class _Mem:
        def __init__(self, total: int, free: int) -> None:
            self.total, self.free = total, free

    def __init__(self, init_error: Exception | None = None) -> None:
        self.init_error = init_error
        self.shutdown = 0
        self.__spec__ = importlib.machinery.ModuleSpec("pynvml", None)

    def nvmlInit(self) -> None:
        if self.init_error:
            raise self.init_error

    def nvmlShutdown(self) -> None:
        self.shutdown += 1

    def nvmlSystemGetDriverVersion(self) -> bytes:
        return b"550.54.14"

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetMemoryInfo(self, h: int) -> _Mem:
        return self._Mem(8 * 2**30, (7 - h) * 2**30)

    def nvmlDeviceGetName(self, h: int) -> str | bytes:
        return b"NVIDIA GeForce RTX 4060" if h == 0 else "NVIDIA L4"

    def nvmlDeviceGetCudaComputeCapability(self, h: int) -> tuple[int, int]:
        if h == 1:
            raise self.NVMLError("not supported")
        return 8, 9


def test_probe_nvml_reads_every_gpu(monkeypatch):
    fake = _FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    gpus = detect.probe_nvml()
    assert [(g.index, g.name, g.compute_capability) for g in gpus] == [
        (0, "NVIDIA GeForce RTX 4060", "8.9"), (1, "NVIDIA L4", None)]
    assert gpus[0].memory_free_bytes == 7 * 2**30 and gpus[1].memory_free_bytes == 6 * 2**30
    assert {g.driver_version for g in gpus} == {"550.54.14"} and {g.source for g in gpus} == {"nvml"}
    assert fake.shutdown == 1


@pytest.mark.parametrize("error", ["NVMLError_LibraryNotFound", "NVMLError_DriverNotLoaded"])
def test_probe_nvml_without_driver_means_no_gpu(monkeypatch, error):
    fake = _FakeNvml()
    fake.init_error = getattr(_FakeNvml, error)()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    with pytest.raises(NvmlUnavailable):
        detect.probe_nvml()


def test_probe_nvidia_smi_retries_without_compute_cap(monkeypatch):
    calls = []

    def run(args):
        calls.append(args[1])
        return None if "compute_cap" in args[1] else "0, Tesla T4, 15360, 15000, 470.82\n"

    monkeypatch.setattr(detect, "_run", run)
    (gpu,) = detect.probe_nvidia_smi()
    assert gpu.name == "Tesla T4" and gpu.compute_capability is None and len(calls) == 2
    monkeypatch.setattr(detect, "_run", lambda args: None)
    assert detect.probe_nvidia_smi() is None


def test_run_helper_uses_real_commands():
    assert detect._run([sys.executable, "-c", "print('hi')"]) == "hi\n"
    assert detect._run([sys.executable, "-c", "raise SystemExit(3)"]) is None
    assert detect._run(["definitely-not-a-command-xyz"]) is None


def test_refresh_memory_remeasures_ram_and_gpus_only():
    first = detect_hardware(replace(Probes(), memory=lambda: MemoryInfo(16, 10),
                                    nvidia=lambda: [replace(_gpu(), memory_free_bytes=8)]))
    amd = GpuInfo(3, "amd", "Radeon")
    first = replace(first, gpus=(*first.gpus, amd))

    def no_cpu() -> CpuInfo:
        raise AssertionError("refresh must not re-probe the CPU")

    later = refresh_memory(first, replace(Probes(), cpu=no_cpu, memory=lambda: MemoryInfo(16, 4),
                                          nvidia=lambda: [replace(_gpu(), memory_free_bytes=2)]))
    assert later.memory == MemoryInfo(16, 4)
    assert [g.memory_free_bytes for g in later.nvidia_gpus] == [2]
    assert amd in later.gpus and later.cpu == first.cpu and later.onnxruntime == first.onnxruntime

    def broken() -> list[GpuInfo]:
        raise RuntimeError("nvml went away")

    def broken_memory() -> MemoryInfo:
        raise OSError("no /proc")

    def broken_apple(memory: MemoryInfo) -> tuple[bool, list[GpuInfo]]:
        raise RuntimeError("sysctl")

    kept = refresh_memory(later, replace(Probes(), memory=broken_memory, nvidia=broken, apple=broken_apple))
    assert kept.gpus == later.gpus and kept.memory == later.memory
    assert [e.split(":")[0] for e in kept.errors[-3:]] == ["memory", "nvidia", "apple"]
