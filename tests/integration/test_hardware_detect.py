"""Real detection on this machine, checked against independent sources (os, /proc, the runtimes)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from foundry_local_py.cache.catalog import Catalog
from foundry_local_py.cache.store import ModelStore
from foundry_local_py.hardware.detect import detect_hardware
from foundry_local_py.hardware.report import hardware_report
from foundry_local_py.hardware.select import choose_variant

REPO = Path(__file__).resolve().parents[2]
NVIDIA_PRESENT = Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia").exists()


@pytest.fixture(scope="module")
def inventory():
    return detect_hardware()


def test_probes_all_succeed(inventory):
    assert inventory.errors == ()
    assert inventory.system == platform.system()
    json.dumps(inventory.to_dict())


def test_cpu_counts_match_os(inventory):
    cpu = inventory.cpu
    assert cpu.logical_cores == os.cpu_count()
    assert cpu.physical_cores is not None and 1 <= cpu.physical_cores <= cpu.logical_cores
    if hasattr(os, "sched_getaffinity"):
        assert cpu.usable_cores == len(os.sched_getaffinity(0))
    assert cpu.arch == platform.machine()


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="needs Linux /proc/cpuinfo")
def test_cpu_features_match_proc_cpuinfo(inventory):
    text = Path("/proc/cpuinfo").read_text()
    flags_line = next(line for line in text.splitlines() if line.startswith(("flags", "Features")))
    flags = set(flags_line.split(":", 1)[1].split())
    cpu = inventory.cpu
    assert cpu.features_source == "cpuinfo"
    assert cpu.model != "unknown" and cpu.vendor != "unknown"
    assert cpu.avx2 == ("avx2" in flags)
    assert cpu.avx512 == ("avx512f" in flags)
    assert cpu.amx == ("amx_tile" in flags)
    assert cpu.neon == ("asimd" in flags or "neon" in flags)
    if platform.machine() in {"x86_64", "AMD64"}:
        assert "avx" in cpu.features or "avx" not in flags
        assert not cpu.neon


def test_cpu_features_agree_with_llama_cpp(inventory):
    """Every feature llama.cpp's CPU backend reports as in use must be one the probe found."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from foundry_local_py.hardware.detect import parse_llama_system_info

    used = set(parse_llama_system_info(llama_cpp.llama_print_system_info().decode()))
    assert used <= set(inventory.cpu.features)


def test_memory_matches_sysconf(inventory):
    mem = inventory.memory
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert abs(mem.total_bytes - total) <= total * 0.01
    assert 0 < mem.available_bytes <= mem.total_bytes


@pytest.mark.skipif(NVIDIA_PRESENT, reason="this machine has an NVIDIA driver")
def test_no_nvidia_gpu_here(inventory):
    assert inventory.nvidia_gpus == ()
    assert inventory.gpus == ()
    assert not inventory.metal


def test_onnxruntime_providers_are_what_onnxruntime_says(inventory):
    ort = pytest.importorskip("onnxruntime")
    info = inventory.onnxruntime
    assert info.installed and info.version == ort.__version__
    assert info.providers == tuple(ort.get_available_providers())
    assert "CPUExecutionProvider" in info.providers
    assert inventory.has_provider("cpuexecutionprovider")
    if not NVIDIA_PRESENT:
        assert not inventory.has_provider("CUDAExecutionProvider") or info.distribution == "onnxruntime-gpu"


def test_provider_sessions_really_run():
    """A one-node session starts on the CPU provider; a provider this build lacks is caught by
    the fallback check, not trusted."""
    pytest.importorskip("onnxruntime")
    from foundry_local_py.hardware.detect import probe_provider_sessions

    inv = detect_hardware(verify_providers=True)
    cpu = inv.onnxruntime.check("CPUExecutionProvider")
    assert cpu is not None and cpu.ok is True
    assert all(c.provider != "AzureExecutionProvider" for c in inv.onnxruntime.provider_checks)
    if not NVIDIA_PRESENT:
        (cuda,) = probe_provider_sessions(["CUDAExecutionProvider"])
        assert cuda.ok is False and "fell back" in cuda.detail
    (qnn,) = probe_provider_sessions(["QNNExecutionProvider"])
    assert qnn.ok is None


def test_genai_detected_when_installed(inventory):
    import importlib.util

    installed = importlib.util.find_spec("onnxruntime_genai") is not None
    assert inventory.onnxruntime.genai_installed == installed
    if inventory.onnxruntime.genai_installed:
        assert inventory.onnxruntime.genai_version
        assert inventory.onnxruntime.genai_distribution.startswith("onnxruntime-genai")


def test_llama_cpp_offload_matches_library(inventory):
    llama_cpp = pytest.importorskip("llama_cpp")
    assert inventory.llama_cpp.installed
    assert inventory.llama_cpp.version == llama_cpp.__version__
    assert inventory.llama_cpp.gpu_offload == bool(llama_cpp.llama_supports_gpu_offload())


@pytest.mark.skipif(NVIDIA_PRESENT, reason="this machine has an NVIDIA driver")
def test_shipped_catalog_gets_cpu_variants_here(inventory, tmp_path):
    catalog = Catalog.load()
    store = ModelStore(tmp_path)
    for model in catalog.models:
        choice = choose_variant(model, inventory)
        assert choice.variant is not None and choice.variant.device == "cpu"
        assert choice.engine_ep == "cpu"
    report = hardware_report(inventory, catalog, store)
    assert {m["alias"] for m in report["models"]} == {m.alias for m in catalog.models}
    assert all(m["chosen"]["engine_ep"] == "cpu" for m in report["models"])


# --- the CLI in a subprocess -------------------------------------------------------------------


def _cli(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "FOUNDRY_LOCAL_CACHE": str(cache), "COLUMNS": "200"}
    env.pop("FOUNDRY_LOCAL_EP", None)
    env.pop("FOUNDRY_LOCAL_DEVICE", None)
    return subprocess.run([sys.executable, "-m", "foundry_local_py.cli.main", "hardware", *args],
                          capture_output=True, text=True, env=env, timeout=120, check=False)


def test_cli_json(tmp_path):
    done = _cli("--json", cache=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["inventory"]["cpu"]["logical_cores"] == os.cpu_count()
    assert report["inventory"]["memory"]["total_bytes"] > 0
    catalog = Catalog.load()
    assert [m["alias"] for m in report["models"]] == [m.alias for m in catalog.models]
    smol = next(m for m in report["models"] if m["alias"] == "smollm2-135m")
    assert smol["chosen"]["variant"] in {v.id for v in catalog.model("smollm2-135m").variants}
    assert smol["chosen"]["reason"]
    assert all(v["reason"] for m in report["models"] for v in m["variants"])
    assert str(tmp_path) not in done.stdout  # no filesystem paths in the report


@pytest.mark.skipif(NVIDIA_PRESENT, reason="this machine has an NVIDIA driver")
def test_cli_overrides_and_bad_values(tmp_path):
    done = _cli("--json", "--ep", "cuda", cache=tmp_path)
    assert done.returncode == 0, done.stderr
    for model in json.loads(done.stdout)["models"]:
        assert model["chosen"] is None and model["error"]["param"] == "ep"
    bad = _cli("--ep", "warp-drive", cache=tmp_path)
    assert bad.returncode == 2
    assert "Unknown execution provider" in bad.stderr
    text = _cli("--device", "cpu", "--verify", cache=tmp_path)
    assert text.returncode == 0, text.stderr
    assert "smollm2-135m ->" in text.stdout and "CPUExecutionProvider" in text.stdout
    assert "CPUExecutionProvider: ok (a test session ran)" in text.stdout
