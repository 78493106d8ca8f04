"""The variant choice on simulated machines: every branch without the hardware."""

from __future__ import annotations

from dataclasses import replace

import pytest

from foundry_local_py.errors import InvalidRequestError, ModelLoadError, ModelNotFoundError
from foundry_local_py.hardware.inventory import LlamaCppInfo, ProviderCheck
from foundry_local_py.hardware.providers import (
    DeviceClass,
    device_class,
    normalize_device,
    normalize_ep,
    short_ep,
)
from foundry_local_py.hardware.select import (
    Considered,
    choose_variant,
    engine_execution_provider,
    evaluate_variants,
    gpu_memory_needed,
)

from .hardware_machines import (
    APPLE,
    CPU_ONNX,
    CPU_OPENVINO,
    CUDA_8GB,
    DML_BOX,
    EVERYTHING,
    GGUF_CPU,
    GGUF_CUDA,
    GGUF_METAL,
    GIB,
    GPU_CUDA,
    GPU_DML,
    GPU_OPENVINO,
    GPU_WEBGPU,
    LLAMA_GPU,
    NO_GPU,
    NPU_LAPTOP,
    NPU_QNN,
    ORT_CPU,
    model,
    rtx,
    variant,
)


def verdicts(choice) -> dict[str, tuple[bool, str]]:
    return {vid: (ok, why) for vid, ok, why in choice.considered}


# --- Foundry Local's order ---------------------------------------------------------------------


def test_class_order_follows_foundry_local_priority():
    ranked = [NPU_QNN, GPU_OPENVINO, GPU_CUDA, GPU_DML, CPU_OPENVINO, CPU_ONNX]
    expected = [DeviceClass.NPU, DeviceClass.VENDOR_GPU, DeviceClass.CUDA_GPU, DeviceClass.GENERIC_GPU,
                DeviceClass.VENDOR_CPU, DeviceClass.GENERIC_CPU]
    for i, klass in enumerate(expected):
        # With the better classes removed, the next one in line is chosen.
        choice = choose_variant(model(*reversed(ranked[i:])), EVERYTHING)
        assert choice.variant_id == f"{ranked[i]['name']}:1"
        assert choice.device_class is klass
        for loser in ranked[i + 1:]:
            ok, why = verdicts(choice)[f"{loser['name']}:1"]
            assert ok and "higher-priority device class" in why


@pytest.mark.parametrize(
    ("device", "ep", "klass"),
    [
        ("npu", "qnn", DeviceClass.NPU),
        ("npu", "openvino", DeviceClass.NPU),
        ("gpu", "openvino", DeviceClass.VENDOR_GPU),
        ("gpu", "migraphx", DeviceClass.VENDOR_GPU),
        ("gpu", "metal", DeviceClass.VENDOR_GPU),
        ("gpu", "cuda", DeviceClass.CUDA_GPU),
        ("gpu", "tensorrt", DeviceClass.CUDA_GPU),
        ("gpu", "dml", DeviceClass.GENERIC_GPU),
        ("gpu", "webgpu", DeviceClass.GENERIC_GPU),
        ("gpu", "somethingnew", DeviceClass.GENERIC_GPU),
        ("cpu", "openvino", DeviceClass.VENDOR_CPU),
        ("cpu", "dnnl", DeviceClass.VENDOR_CPU),
        ("cpu", "cpu", DeviceClass.GENERIC_CPU),
    ],
)
def test_device_class_mapping(device, ep, klass):
    assert device_class(device, ep) is klass


def test_labels():
    assert [c.label for c in DeviceClass] == [
        "NPU", "vendor GPU", "CUDA GPU", "generic GPU", "vendor CPU", "generic CPU"]


# --- simulated machines --------------------------------------------------------------------------


def test_cuda_box_picks_cuda_variant_that_fits():
    m = model(NPU_QNN, GPU_CUDA, GPU_DML, CPU_ONNX, GGUF_CPU)
    choice = choose_variant(m, CUDA_8GB)
    assert choice.variant_id == "phi-gpu-cuda:1"
    assert choice.execution_provider == "CUDAExecutionProvider"
    assert choice.engine_ep == "cuda"
    assert "fits" in choice.reason and "7.5 GiB free" in choice.reason
    v = verdicts(choice)
    assert v["phi-npu-qnn:1"] == (
        False, "QNNExecutionProvider is not available in this onnxruntime-gpu build")
    # The DML build of the same model could run on CUDA, but the CUDA build is native.
    ok, why = v["phi-gpu-dml:1"]
    assert ok and "runs on CUDAExecutionProvider (CUDA GPU)" in why
    assert "built for CUDAExecutionProvider itself" in why
    assert set(v) == {f"{x['name']}:1" for x in (NPU_QNN, GPU_CUDA, GPU_DML, CPU_ONNX, GGUF_CPU)}
    assert all(isinstance(c, Considered) for c in choice.considered)


def test_cuda_box_skips_variant_that_does_not_fit_gpu_memory():
    big = variant("phi-gpu-cuda-fp16", "onnx", "gpu", "CUDAExecutionProvider", size=7)
    choice = choose_variant(model(big, GGUF_CPU), CUDA_8GB)
    assert choice.variant_id == "phi-q4-gguf-cpu:1"
    ok, why = verdicts(choice)["phi-gpu-cuda-fp16:1"]
    assert not ok
    assert why.startswith("does not fit") and "7.5 GiB free" in why and "8.9 GiB" in why


def test_gpu_memory_uses_the_gpu_with_most_free_memory_and_tunable_overhead():
    inv = replace(CUDA_8GB, gpus=(rtx(free_gib=1), rtx(free_gib=7.5, index=1)))
    assert choose_variant(model(GPU_CUDA, GGUF_CPU), inv).variant_id == "phi-gpu-cuda:1"
    tight = choose_variant(model(GPU_CUDA, GGUF_CPU), inv, gpu_overhead=2.5)
    assert tight.variant_id == "phi-q4-gguf-cpu:1"
    assert gpu_memory_needed(GIB, 1.0, 0) == GIB


def test_unknown_size_or_unknown_gpu_memory_is_not_checked():
    no_size = variant("phi-gpu-cuda-x", "onnx", "gpu", "CUDAExecutionProvider", size=None)
    choice = choose_variant(model(no_size), CUDA_8GB)
    assert "size unknown" in choice.reason
    blind = replace(CUDA_8GB, gpus=(replace(rtx(), memory_free_bytes=None),))
    assert "GPU memory unknown" in choose_variant(model(GPU_CUDA), blind).reason


def test_provider_that_failed_its_test_session_is_rejected():
    checks = (ProviderCheck("CUDAExecutionProvider", False, "onnxruntime fell back to the CPU"),
              ProviderCheck("TensorrtExecutionProvider", None, "not checked"))
    inv = replace(CUDA_8GB, onnxruntime=replace(CUDA_8GB.onnxruntime, provider_checks=checks))
    choice = choose_variant(model(GPU_CUDA, GGUF_CPU), inv)
    assert choice.variant_id == "phi-q4-gguf-cpu:1"
    ok, why = verdicts(choice)["phi-gpu-cuda:1"]
    assert not ok and "CUDAExecutionProvider failed a test session (onnxruntime fell back" in why
    # Not checked is not evidence against it.
    trt = variant("phi-gpu-trt", "onnx", "gpu", "TensorrtExecutionProvider")
    assert choose_variant(model(trt, GGUF_CPU), inv).variant_id == "phi-gpu-trt:1"


def test_cuda_provider_without_nvidia_gpu_is_rejected():
    inv = replace(CUDA_8GB, gpus=())
    choice = choose_variant(model(GPU_CUDA, GGUF_CPU), inv)
    assert choice.variant_id == "phi-q4-gguf-cpu:1"
    ok, why = verdicts(choice)["phi-gpu-cuda:1"]
    assert not ok and "no NVIDIA GPU was found" in why


def test_webgpu_variant_runs_on_cuda_when_webgpu_is_missing():
    choice = choose_variant(model(GPU_WEBGPU, GGUF_CPU), CUDA_8GB)
    assert choice.variant_id == "phi-gpu-webgpu:1"
    assert choice.execution_provider == "CUDAExecutionProvider"
    assert choice.engine_ep == "cuda"
    assert choice.device_class is DeviceClass.CUDA_GPU  # the class of what it runs on
    assert "built for WebGpuExecutionProvider, which is not available" in choice.reason


def test_npu_laptop_picks_qnn():
    choice = choose_variant(model(GGUF_CPU, GPU_DML, NPU_QNN), NPU_LAPTOP)
    assert choice.variant_id == "phi-npu-qnn:1"
    assert choice.engine_ep == "qnn"
    assert choice.device_class is DeviceClass.NPU
    ok, why = verdicts(choice)["phi-gpu-dml:1"]
    assert not ok and "DmlExecutionProvider" in why and "CUDAExecutionProvider" in why


def test_npu_provider_without_npu_is_rejected():
    choice = choose_variant(model(NPU_QNN, GGUF_CPU), replace(NPU_LAPTOP, npus=()))
    assert choice.variant_id == "phi-q4-gguf-cpu:1"
    assert "no NPU was found" in verdicts(choice)["phi-npu-qnn:1"][1]


def test_directml_box_uses_dml_with_unknown_memory():
    choice = choose_variant(model(GPU_CUDA, GPU_DML, GGUF_CPU), DML_BOX)
    assert choice.variant_id == "phi-gpu-dml:1"
    assert choice.engine_ep == "dml"
    assert "GPU memory unknown" in choice.reason
    # The CUDA build runs on DirectML too (same class then), but the DML build is native.
    ok, why = verdicts(choice)["phi-gpu-cuda:1"]
    assert ok and "runs on DmlExecutionProvider (generic GPU)" in why
    assert "built for DmlExecutionProvider itself" in why
    # Alone, the CUDA build is used through DirectML.
    alone = choose_variant(model(GPU_CUDA, GGUF_CPU), DML_BOX)
    assert alone.variant_id == "phi-gpu-cuda:1" and alone.engine_ep == "dml"


def test_no_gpu_box_falls_back_to_cpu_and_explains_each_gpu_variant():
    choice = choose_variant(model(NPU_QNN, GPU_CUDA, GPU_DML, GGUF_CUDA, GGUF_CPU), NO_GPU)
    assert choice.variant_id == "phi-q4-gguf-cpu:1"
    assert choice.engine_ep == "cpu"
    assert choice.execution_provider == "CPUExecutionProvider"
    v = verdicts(choice)
    assert v["phi-q4-gguf-cuda:1"] == (False, "this llama-cpp-python build has no GPU offload")
    assert v["phi-gpu-cuda:1"] == (False, (
        "CUDAExecutionProvider is not available in this onnxruntime build "
        "(nor DmlExecutionProvider, WebGpuExecutionProvider, which it could also run on)"))
    assert choice.reason.endswith("the only usable variant")


def test_gguf_gpu_variants():
    assert choose_variant(model(GGUF_CUDA, GGUF_CPU), CUDA_8GB).variant_id == "phi-q4-gguf-cuda:1"
    apple = choose_variant(model(GGUF_METAL, GGUF_CPU), APPLE)
    assert apple.variant_id == "phi-q4-gguf-metal:1"
    assert apple.device_class is DeviceClass.VENDOR_GPU and apple.engine_ep == "metal"
    assert "10.0 GiB free" in apple.reason  # unified memory: what RAM has free
    v = verdicts(choose_variant(model(GGUF_METAL, GGUF_CUDA, GGUF_CPU), replace(CUDA_8GB, gpus=())))
    assert v["phi-q4-gguf-metal:1"] == (False, "Metal is not available")
    assert v["phi-q4-gguf-cuda:1"] == (False, "no NVIDIA GPU was found")
    generic = variant("phi-q4-gguf-vulkan", "gguf", "gpu", "VulkanExecutionProvider")
    v = verdicts(choose_variant(model(generic, GGUF_CPU), replace(NO_GPU, llama_cpp=LLAMA_GPU)))
    assert v["phi-q4-gguf-vulkan:1"] == (False, "no GPU was found")
    npu_gguf = variant("phi-q4-gguf-npu", "gguf", "npu", "QNNExecutionProvider")
    v = verdicts(choose_variant(model(npu_gguf, GGUF_CPU), NPU_LAPTOP))
    assert v["phi-q4-gguf-npu:1"] == (False, "llama.cpp cannot run on an NPU")


def test_missing_runtimes():
    no_genai = replace(NO_GPU, onnxruntime=replace(ORT_CPU, genai_installed=False))
    v = verdicts(choose_variant(model(CPU_ONNX, GGUF_CPU), no_genai))
    assert "onnxruntime-genai is not installed" in v["phi-cpu-onnx:1"][1]
    no_ort = replace(NO_GPU, onnxruntime=replace(ORT_CPU, installed=False, providers=()))
    v = verdicts(choose_variant(model(CPU_ONNX, GGUF_CPU), no_ort))
    assert v["phi-cpu-onnx:1"] == (False, "onnxruntime is not installed")
    no_llama = replace(NO_GPU, llama_cpp=LlamaCppInfo())
    choice = choose_variant(model(CPU_ONNX, GGUF_CPU), no_llama)
    assert choice.variant_id == "phi-cpu-onnx:1"
    assert verdicts(choice)["phi-q4-gguf-cpu:1"] == (False, "llama-cpp-python is not installed")


# --- preferences ---------------------------------------------------------------------------------


def test_cached_variant_is_preferred_over_higher_priority_uncached():
    m = model(GPU_CUDA, GGUF_CPU)
    choice = choose_variant(m, CUDA_8GB, cached={"phi-q4-gguf-cpu:1"})
    assert choice.variant_id == "phi-q4-gguf-cpu:1" and choice.cached
    assert "already cached" in choice.reason
    ok, why = verdicts(choice)["phi-gpu-cuda:1"]
    assert ok and "already cached" in why
    fresh = choose_variant(m, CUDA_8GB, cached={"phi-q4-gguf-cpu:1"}, prefer_cached=False)
    assert fresh.variant_id == "phi-gpu-cuda:1"
    both = choose_variant(m, CUDA_8GB, cached={"phi-q4-gguf-cpu:1", "phi-gpu-cuda:1"})
    assert both.variant_id == "phi-gpu-cuda:1"


def test_cached_wins_within_a_class():
    choice = choose_variant(model(CPU_ONNX, GGUF_CPU), NO_GPU, cached={"phi-cpu-onnx:1"})
    assert choice.variant_id == "phi-cpu-onnx:1"
    assert choice.reason.endswith("preferred over phi-q4-gguf-cpu:1: already cached")


def test_cache_names_are_matched_by_name_or_id_in_any_case():
    choice = choose_variant(model(GPU_CUDA, GGUF_CPU), CUDA_8GB, cached={"PHI-Q4-GGUF-CPU"})
    assert choice.variant_id == "phi-q4-gguf-cpu:1"


def test_version_tie_goes_to_newer():
    old = variant("phi-gpu-cuda", "onnx", "gpu", "CUDAExecutionProvider", version=1)
    new = variant("phi-gpu-cuda", "onnx", "gpu", "CUDAExecutionProvider", version=3)
    choice = choose_variant(model(old, new), CUDA_8GB)
    assert choice.variant_id == "phi-gpu-cuda:3"
    assert "newer version (3 over 1)" in choice.reason
    ok, why = verdicts(choice)["phi-gpu-cuda:1"]
    assert ok and "newer version" in why


def test_gguf_preferred_over_onnx_at_equal_rank_and_version():
    choice = choose_variant(model(CPU_ONNX, GGUF_CPU), NO_GPU)
    assert choice.variant_id == "phi-q4-gguf-cpu:1"
    assert "GGUF preferred over ONNX at equal rank" in choice.reason
    # A newer ONNX build still wins: version comes first.
    newer = {**CPU_ONNX, "version": 2}
    assert choose_variant(model(newer, GGUF_CPU), NO_GPU).variant_id == "phi-cpu-onnx:2"


def test_name_breaks_full_ties():
    a = variant("phi-a-cpu", "gguf", "cpu", "CPUExecutionProvider")
    b = variant("phi-b-cpu", "gguf", "cpu", "CPUExecutionProvider")
    choice = choose_variant(model(b, a), NO_GPU)
    assert choice.variant_id == "phi-a-cpu:1"
    assert "first by name" in choice.reason


def test_requantized_from_gguf_loses_to_original_in_same_class_even_if_newer():
    converted = variant("phi-cpu-onnx", "onnx", "cpu", "CPUExecutionProvider", version=2, source={
        "kind": "convert", "base": "phi-q4-gguf-cpu:1", "method": "onnx-builder", "precision": "int4"})
    choice = choose_variant(model(converted, GGUF_CPU), NO_GPU)
    assert choice.variant_id == "phi-q4-gguf-cpu:1"
    assert "not re-quantized" in choice.reason
    assert "re-quantized from a GGUF" in verdicts(choice)["phi-cpu-onnx:2"][1]
    # From a full-precision GGUF the conversion is not penalised: the newer version wins.
    f16 = variant("phi-f16-gguf-cpu", "gguf", "cpu", "CPUExecutionProvider", precision="f16")
    from_f16 = {**converted, "source": {**converted["source"], "base": "phi-f16-gguf-cpu"}}
    assert choose_variant(model(from_f16, f16), NO_GPU).variant_id == "phi-cpu-onnx:2"
    # A base outside this model is not known to be quantized.
    elsewhere = {**converted, "source": {**converted["source"], "base": "other-model:1"}}
    assert choose_variant(model(elsewhere, f16), NO_GPU).variant_id == "phi-cpu-onnx:2"


def test_degraded_variant_is_skipped_unless_requested_by_id():
    m = model(GPU_CUDA, GGUF_CPU)
    choice = choose_variant(m, CUDA_8GB, degraded={"phi-gpu-cuda:1"})
    assert choice.variant_id == "phi-q4-gguf-cpu:1"
    ok, why = verdicts(choice)["phi-gpu-cuda:1"]
    assert not ok and "degraded" in why
    pinned = choose_variant(m, CUDA_8GB, degraded={"phi-gpu-cuda:1"}, requested="phi-gpu-cuda:1")
    assert pinned.variant_id == "phi-gpu-cuda:1"
    assert "requested by id" in pinned.reason
    assert [c.variant_id for c in pinned.considered] == ["phi-gpu-cuda:1"]
    # By name (no version) too.
    assert choose_variant(m, CUDA_8GB, requested="PHI-GPU-CUDA").variant_id == "phi-gpu-cuda:1"


def test_only_degraded_variants_means_not_available():
    with pytest.raises(ModelNotFoundError) as info:
        choose_variant(model(GGUF_CPU), NO_GPU, degraded={"phi-q4-gguf-cpu:1"})
    assert "degraded" in info.value.message and info.value.status == 404


# --- overrides -----------------------------------------------------------------------------------


def test_device_override():
    m = model(GPU_CUDA, GGUF_CPU)
    choice = choose_variant(m, CUDA_8GB, device="cpu")
    assert choice.variant_id == "phi-q4-gguf-cpu:1"
    assert "device 'cpu' was asked for" in verdicts(choice)["phi-gpu-cuda:1"][1]
    assert choose_variant(m, CUDA_8GB, device="GPU").variant_id == "phi-gpu-cuda:1"
    assert choose_variant(m, CUDA_8GB, device="auto").variant_id == "phi-gpu-cuda:1"
    with pytest.raises(InvalidRequestError) as info:
        choose_variant(m, CUDA_8GB, device="npu")
    assert info.value.param == "device" and info.value.code == "unsupported_device"
    with pytest.raises(InvalidRequestError) as info:
        choose_variant(m, NO_GPU, device="gpu")
    assert info.value.param == "device"
    assert "not available" in info.value.message  # the rejected GPU variant's reason


@pytest.mark.parametrize("ep", ["cuda", "CUDA", "CUDAExecutionProvider", "cudaexecutionprovider"])
def test_ep_override_accepts_short_and_full_names(ep):
    choice = choose_variant(model(GPU_DML, GGUF_CPU), CUDA_8GB, ep=ep)
    assert choice.variant_id == "phi-gpu-dml:1"  # a DML build, run on CUDA as asked
    assert choice.execution_provider == "CUDAExecutionProvider"


def test_ep_override_filters_and_errors():
    m = model(GPU_CUDA, GGUF_CPU)
    assert choose_variant(m, CUDA_8GB, ep="cpu").variant_id == "phi-q4-gguf-cpu:1"
    assert choose_variant(m, CUDA_8GB, ep="").variant_id == "phi-gpu-cuda:1"
    with pytest.raises(InvalidRequestError) as info:
        choose_variant(m, NO_GPU, ep="cuda")
    assert info.value.param == "ep" and info.value.code == "unsupported_ep"
    assert "phi-gpu-cuda:1" in info.value.message
    with pytest.raises(InvalidRequestError) as info:
        choose_variant(m, CUDA_8GB, ep="qnn")
    assert info.value.param == "ep"
    # ep wins over device when both filter everything out.
    with pytest.raises(InvalidRequestError) as info:
        choose_variant(m, CUDA_8GB, ep="qnn", device="npu")
    assert info.value.param == "ep"


@pytest.mark.parametrize(("value", "param"), [("bogus", "ep"), ("gpu", "ep"), ("../x", "ep")])
def test_malformed_ep_is_invalid_request(value, param):
    with pytest.raises(InvalidRequestError) as info:
        choose_variant(model(GGUF_CPU), NO_GPU, ep=value)
    assert info.value.param == param and info.value.code == "invalid_ep"
    assert info.value.status == 400


@pytest.mark.parametrize("value", ["tpu", "0", "cpu,gpu"])
def test_malformed_device_is_invalid_request(value):
    with pytest.raises(InvalidRequestError) as info:
        evaluate_variants(model(GGUF_CPU), NO_GPU, device=value)
    assert info.value.param == "device" and info.value.code == "invalid_device"


def test_normalizers():
    assert [normalize_ep(x) for x in ("dml", "cuda", "qnn", "cpu", "webgpu")] == [
        "dml", "cuda", "qnn", "cpu", "webgpu"]
    assert normalize_ep("DirectML") == "dml"
    assert normalize_ep("DmlExecutionProvider") == "dml"
    assert normalize_ep("WebGpuExecutionProvider") == "webgpu"
    assert normalize_ep(None) is None and normalize_ep(" auto ") is None
    assert normalize_device(None) is None and normalize_device("NPU") == "npu"
    assert short_ep("QNNExecutionProvider") == "qnn"
    assert short_ep("cuda") == "cuda"
    assert short_ep("FancyExecutionProvider") == "fancy"


def test_engine_ep_helper():
    m = model(GGUF_CPU, GPU_DML, GGUF_CUDA, NPU_QNN)
    by_name = {v.name: v for v in m.variants}
    assert engine_execution_provider(by_name["phi-q4-gguf-cpu"]) == "cpu"
    assert engine_execution_provider(by_name["phi-gpu-dml"]) == "dml"
    assert engine_execution_provider(by_name["phi-gpu-dml"], "cuda") == "cuda"
    assert engine_execution_provider(by_name["phi-q4-gguf-cuda"]) == "cuda"
    assert engine_execution_provider(by_name["phi-npu-qnn"]) == "qnn"


# --- fallback after a failed load ----------------------------------------------------------------


def test_exclude_variant_falls_back_to_next():
    m = model(GPU_CUDA, GPU_DML, GGUF_CPU)
    first = choose_variant(m, CUDA_8GB)
    assert first.variant_id == "phi-gpu-cuda:1"
    second = choose_variant(m, CUDA_8GB, exclude={first.variant_id})
    assert second.variant_id == "phi-gpu-dml:1" and second.engine_ep == "cuda"
    assert verdicts(second)["phi-gpu-cuda:1"] == (False, "failed to load earlier; excluded")


def test_exclude_provider_skips_every_variant_on_it():
    m = model(GPU_CUDA, GPU_DML, GGUF_CPU)
    choice = choose_variant(m, CUDA_8GB, exclude_eps={"CUDAExecutionProvider"})
    assert choice.variant_id == "phi-q4-gguf-cpu:1"
    v = verdicts(choice)
    for vid in ("phi-gpu-cuda:1", "phi-gpu-dml:1"):
        ok, why = v[vid]
        # Both could otherwise run on DML or WebGPU, which this box lacks.
        assert not ok and "CUDAExecutionProvider failed to initialise earlier" in why
        assert "DmlExecutionProvider is not available" in why
    # A variant with no other provider to try says only that.
    only = choose_variant(model(GGUF_CUDA, GGUF_CPU), CUDA_8GB, exclude_eps={"cuda"})
    assert verdicts(only)["phi-q4-gguf-cuda:1"] == (
        False, "CUDAExecutionProvider failed to initialise earlier")


def test_exclusions_exhausted_is_a_load_error():
    m = model(GPU_CUDA, GGUF_CPU)
    choice = evaluate_variants(m, CUDA_8GB, exclude={"phi-q4-gguf-cpu:1"}, exclude_eps={"cuda"})
    assert choice.variant is None and isinstance(choice.error, ModelLoadError)
    assert "left to try" in choice.reason
    with pytest.raises(ModelLoadError):
        choice.require()
    # A forced ep that then fails to initialise is a load error too, not a bad request.
    with pytest.raises(ModelLoadError):
        choose_variant(m, CUDA_8GB, ep="cuda", exclude_eps={"cuda"})


# --- nothing usable ------------------------------------------------------------------------------


def test_nothing_runs_here_is_not_available_and_evaluate_does_not_raise():
    m = model(GPU_CUDA, NPU_QNN)
    choice = evaluate_variants(m, NO_GPU)
    assert choice.variant is None and choice.engine_ep is None
    assert isinstance(choice.error, ModelNotFoundError)
    assert "No variant of it can run on this machine" in choice.reason
    assert all(not ok for _, ok, _ in choice.considered)
    with pytest.raises(ModelNotFoundError):
        choose_variant(m, NO_GPU)


def test_error_summary_is_capped():
    many = [variant(f"phi-gpu-cuda-{i}", "onnx", "gpu", "CUDAExecutionProvider") for i in range(7)]
    choice = evaluate_variants(model(*many), NO_GPU)
    assert "and 3 more" in choice.reason


def test_requested_variant():
    m = model(GPU_CUDA, GGUF_CPU)
    with pytest.raises(ModelNotFoundError):
        choose_variant(m, NO_GPU, requested="phi-nope:1")
    with pytest.raises(ModelNotFoundError) as info:
        choose_variant(m, NO_GPU, requested="phi-gpu-cuda:1")
    assert "phi-gpu-cuda:1" in info.value.message and "not available" in info.value.message
    assert choose_variant(m, NO_GPU, requested="phi-q4-gguf-cpu:1").variant_id == "phi-q4-gguf-cpu:1"
