"""The hardware report over a real (temporary) cache: cached and degraded state come from manifests."""

from __future__ import annotations

import json

import pytest

from foundry_local_py.cache.catalog import Catalog, CatalogModel
from foundry_local_py.cache.manifest import Fidelity, Manifest, write_manifest
from foundry_local_py.cache.store import ModelStore
from foundry_local_py.errors import InvalidRequestError
from foundry_local_py.hardware.inventory import GpuInfo, HardwareInventory
from foundry_local_py.hardware.report import (
    accelerators,
    cached_variant_ids,
    degraded_variant_ids,
    hardware_report,
)

from .hardware_machines import CUDA_8GB, GGUF_CPU, GPU_CUDA, NO_GPU, model


def _fidelity(degraded: bool) -> Fidelity:
    return Fidelity(top1_agreement=0.71 if degraded else 0.97, perplexity_source=10.0,
                    perplexity_converted=14.0 if degraded else 10.2,
                    perplexity_delta_pct=40.0 if degraded else 2.0, n_tokens=512, threshold=0.9,
                    degraded=degraded)


def _cache(store: ModelStore, m: CatalogModel, name: str, fidelity: Fidelity | None) -> None:
    variant = next(v for v in m.variants if v.name == name)
    write_manifest(store.variant_dir(m, variant),
                   Manifest(variant_id=variant.id, alias=m.alias, kind="huggingface", fidelity=fidelity))


def test_cache_state_from_manifests(tmp_path):
    store = ModelStore(tmp_path)
    m = model(GPU_CUDA, GGUF_CPU)
    assert cached_variant_ids(m, store) == set() and degraded_variant_ids(m, store) == set()
    _cache(store, m, "phi-gpu-cuda", _fidelity(degraded=True))
    _cache(store, m, "phi-q4-gguf-cpu", None)
    assert cached_variant_ids(m, store) == {"phi-gpu-cuda:1", "phi-q4-gguf-cpu:1"}
    assert degraded_variant_ids(m, store) == {"phi-gpu-cuda:1"}


def test_report_skips_degraded_variant_and_shows_fidelity(tmp_path):
    store = ModelStore(tmp_path)
    m = model(GPU_CUDA, GGUF_CPU)
    report = hardware_report(CUDA_8GB, Catalog([m]), store)
    json.dumps(report)
    (entry,) = report["models"]
    assert entry["chosen"]["variant"] == "phi-gpu-cuda:1"
    assert entry["chosen"]["engine_ep"] == "cuda" and entry["error"] is None

    _cache(store, m, "phi-gpu-cuda", _fidelity(degraded=True))
    (entry,) = hardware_report(CUDA_8GB, Catalog([m]), store)["models"]
    assert entry["chosen"]["variant"] == "phi-q4-gguf-cpu:1"
    cuda = next(v for v in entry["variants"] if v["id"] == "phi-gpu-cuda:1")
    assert cuda["cached"] and cuda["degraded"] and not cuda["accepted"] and not cuda["chosen"]
    assert cuda["fidelity"]["top1_agreement"] == pytest.approx(0.71)
    assert cuda["device_class"] == "CUDA GPU" and "degraded" in cuda["reason"]

    _cache(store, m, "phi-gpu-cuda", _fidelity(degraded=False))
    (entry,) = hardware_report(CUDA_8GB, Catalog([m]), store)["models"]
    assert entry["chosen"]["variant"] == "phi-gpu-cuda:1" and entry["chosen"]["cached"]


def test_report_overrides_and_errors(tmp_path):
    store = ModelStore(tmp_path)
    catalog = Catalog([model(GPU_CUDA, GGUF_CPU)])
    report = hardware_report(NO_GPU, catalog, store, ep="CUDA")
    assert report["overrides"]["ep"] == "cuda"
    (entry,) = report["models"]
    assert entry["chosen"] is None
    assert entry["error"]["param"] == "ep" and entry["error"]["type"] == "invalid_request_error"
    assert all(not v["accepted"] for v in entry["variants"])
    with pytest.raises(InvalidRequestError):
        hardware_report(NO_GPU, catalog, store, device="tpu")


def test_accelerators_lines():
    assert accelerators(NO_GPU) == []
    lines = accelerators(CUDA_8GB)
    assert lines[0] == "GPU 0: NVIDIA GeForce RTX 4060 [nvidia, 8.0 GiB (7.5 GiB free)]"
    assert "onnxruntime providers: TensorrtExecutionProvider, CUDAExecutionProvider" in lines
    assert "llama.cpp: GPU offload" in lines
    bare = HardwareInventory(gpus=(GpuInfo(1, "amd", "Radeon"),))
    assert accelerators(bare) == ["GPU 1: Radeon [amd]"]
