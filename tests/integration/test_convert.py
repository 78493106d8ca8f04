"""Real conversions of the catalog models: GGUF -> ONNX GenAI (model builder) and GGUF
re-quantization (llama.cpp), each loaded and run afterwards, with the fidelity measured against
the source and recorded in a manifest that is written last.

The ONNX builds are session fixtures (tests/integration/conftest.py) shared with other tests.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from foundry_local_py.cache.acquire import ensure_variant
from foundry_local_py.cache.catalog import Catalog, CatalogFile, ConvertSource
from foundry_local_py.cache.convert import build_variant, fidelity, tool_versions
from foundry_local_py.cache.inventory import list_cached
from foundry_local_py.cache.manifest import MANIFEST_NAME, Manifest
from foundry_local_py.cache.store import ModelStore, sha256_file
from foundry_local_py.errors import ConversionError, ModelNotFoundError
from foundry_local_py.hardware import degraded_variant_ids

from .conftest import GEMMA3_INT8, SMOLLM2_INT4, SMOLLM2_INT8

pytestmark = [pytest.mark.convert, pytest.mark.slow]

SMOLLM2_Q4_0 = "smollm2-135m-instruct-q4_0-gguf-cpu"
ROOT = Path(__file__).resolve().parents[2]


def _manifest(store: ModelStore, catalog: Catalog, name: str) -> Manifest:
    model, variant = catalog.variant(name)
    manifest = store.manifest(model, variant)
    assert manifest is not None
    return manifest


def _check_manifest(folder: Path, manifest: Manifest, *, method: str) -> None:
    """Complete: every file on disk is listed with its real size and sha256, and nothing else."""
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {MANIFEST_NAME}
    assert {f.path for f in manifest.files} == on_disk
    for f in manifest.files:
        assert f.size == (folder / f.path).stat().st_size
        assert f.sha256 == sha256_file(folder / f.path)
    assert manifest.kind == "convert"
    assert manifest.source["method"] == method
    assert len(manifest.source["base_sha256"]) == 64
    # the manifest was the last thing written into the folder
    newest_file = max((folder / f.path).stat().st_mtime_ns for f in manifest.files)
    assert (folder / MANIFEST_NAME).stat().st_mtime_ns >= newest_file
    expected_tools = {"llama-cpp-python"} | (
        {"transformers", "torch", "onnxruntime-genai", "onnx-ir"} if method == "onnx-builder" else set()
    )
    assert expected_tools <= set(manifest.tool_versions)
    current = tool_versions(method)
    assert all(current[k] == v for k, v in manifest.tool_versions.items())


def _check_fidelity(manifest: Manifest) -> None:
    fid = manifest.fidelity
    assert fid is not None
    assert 200 <= fid.n_tokens <= fidelity.MAX_TOKENS
    assert 0.0 <= fid.top1_agreement <= 1.0
    assert fid.perplexity_source > 1.0 and fid.perplexity_converted > 1.0
    assert fid.degraded == (fid.top1_agreement < fid.threshold)


def _onnx_generate(folder: Path, ids: list[int], n: int = 8) -> list[int]:
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=1024, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray(ids, dtype=np.int32))
    out: list[int] = []
    while not generator.is_done() and len(out) < n:
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out


def _gguf_source(store: ModelStore, catalog: Catalog, name: str) -> Path:
    _model, variant = catalog.variant(name)
    assert isinstance(variant.source, ConvertSource)
    base_model, base_variant = catalog.variant(variant.source.base)
    return store.resolve(base_model, base_variant)


# --- GGUF -> ONNX -----------------------------------------------------------------------------


def test_smollm2_int8_onnx_keeps_its_source_and_generates(smollm2_onnx_int8, convert_store, convert_catalog):
    folder = smollm2_onnx_int8
    assert (folder / "genai_config.json").is_file() and (folder / "model.onnx").is_file()
    manifest = _manifest(convert_store, convert_catalog, SMOLLM2_INT8)
    _check_manifest(folder, manifest, method="onnx-builder")
    _check_fidelity(manifest)
    fid = manifest.fidelity
    assert fid is not None and not fid.degraded
    assert manifest.source["checkpoint_vs_source_top1"] >= 0.8
    model, variant = convert_catalog.variant(SMOLLM2_INT8)
    assert not convert_store.is_degraded(model, variant)

    # The ONNX model's own tokenizer gives the ids the fidelity measurement fed it.
    source = _gguf_source(convert_store, convert_catalog, SMOLLM2_INT8)
    text = fidelity.reference_text()
    assert fidelity.tokenize(folder, text) == fidelity.tokenize(source, text)

    prompt = fidelity.tokenize(source, "The capital of France is")
    generated = _onnx_generate(folder, prompt)
    assert generated and all(0 <= t < 49152 for t in generated)


def test_smollm2_int4_onnx_is_measured_and_marked_degraded(
    smollm2_onnx_int4, smollm2_onnx_int8, convert_store, convert_catalog
):
    manifest = _manifest(convert_store, convert_catalog, SMOLLM2_INT4)
    _check_manifest(smollm2_onnx_int4, manifest, method="onnx-builder")
    _check_fidelity(manifest)
    fid = manifest.fidelity
    int8 = _manifest(convert_store, convert_catalog, SMOLLM2_INT8).fidelity
    assert fid is not None and int8 is not None
    # Re-quantizing an already 4-bit model to 4 bits loses a lot: measured, not assumed.
    assert fid.top1_agreement < fid.threshold and fid.degraded
    assert fid.top1_agreement < int8.top1_agreement
    assert fid.perplexity_delta_pct > int8.perplexity_delta_pct
    model, variant = convert_catalog.variant(SMOLLM2_INT4)
    assert convert_store.is_degraded(model, variant)
    assert variant.id in degraded_variant_ids(model, convert_store)
    # degraded is a ranking verdict: the model still loads and runs
    source = _gguf_source(convert_store, convert_catalog, SMOLLM2_INT4)
    assert _onnx_generate(smollm2_onnx_int4, fidelity.tokenize(source, "Once upon a time"))


def test_gemma3_int8_onnx_keeps_its_source_and_generates(gemma3_onnx_int8, convert_store, convert_catalog):
    manifest = _manifest(convert_store, convert_catalog, GEMMA3_INT8)
    _check_manifest(gemma3_onnx_int8, manifest, method="onnx-builder")
    _check_fidelity(manifest)
    fid = manifest.fidelity
    assert fid is not None and not fid.degraded
    assert manifest.source["architecture"] == "Gemma3ForCausalLM"
    # the flattened RoPE settings reproduce llama.cpp's Gemma 3 (sliding + global layers)
    assert manifest.source["checkpoint_vs_source_top1"] >= 0.8
    assert manifest.source["add_bos_token"] is True
    source = _gguf_source(convert_store, convert_catalog, GEMMA3_INT8)
    prompt = fidelity.tokenize(source, "The capital of France is")
    assert prompt[0] == 2  # <bos>, which onnxruntime-genai's tokenizer leaves out
    generated = _onnx_generate(gemma3_onnx_int8, prompt)
    assert generated and all(0 <= t < 262144 for t in generated)


def test_an_existing_build_is_reused_without_force(smollm2_onnx_int8, convert_store, convert_catalog):
    model, variant = convert_catalog.variant(SMOLLM2_INT8)
    before = _manifest(convert_store, convert_catalog, SMOLLM2_INT8)
    assert isinstance(variant.source, ConvertSource)
    base_model, base_variant = convert_catalog.variant(variant.source.base)
    stages: list[str] = []
    path = build_variant(
        convert_store, model, variant, base_model, base_variant,
        convert_store.resolve(base_model, base_variant), progress=lambda p: stages.append(p.stage),
    )
    assert path == smollm2_onnx_int8
    assert stages == []
    assert _manifest(convert_store, convert_catalog, SMOLLM2_INT8).created_at == before.created_at


# --- GGUF re-quantization -----------------------------------------------------------------------


def test_gguf_requantization_via_acquire(tmp_path: Path):
    from llama_cpp import Llama

    catalog = Catalog.load()
    store = ModelStore(tmp_path)
    model, variant = catalog.variant(SMOLLM2_Q4_0)
    stages: list[str] = []
    path = ensure_variant(store, catalog, model, variant, progress=lambda p: stages.append(p.stage))
    assert path.suffix == ".gguf" and path.parent == store.variant_dir(model, variant)
    assert stages[0] == "convert" and stages[-1] == "done"
    manifest = store.manifest(model, variant)
    assert manifest is not None and manifest.entry == path.name
    _check_manifest(path.parent, manifest, method="gguf-quantize")
    _check_fidelity(manifest)
    assert manifest.fidelity is not None and manifest.fidelity.reference == "source (llama.cpp)"
    assert store.is_degraded(model, variant) == manifest.fidelity.degraded
    assert not store.staging_dir(model, variant).exists()

    llm = Llama(str(path), n_ctx=256, verbose=False)
    try:
        assert llm.metadata["general.file_type"] == "2"  # LLAMA_FTYPE_MOSTLY_Q4_0
        out = llm.create_completion("The capital of France is", max_tokens=6, temperature=0.0)
        assert out["usage"]["completion_tokens"] > 0
    finally:
        llm.close()


def _custom_catalog(tmp_path: Path, precision: str) -> Catalog:
    """The shipped catalog plus a SmolLM2 GGUF re-quantization to ``precision``."""
    shipped = Catalog.load()
    smol = shipped.model("smollm2-135m")
    assert smol is not None
    extra = smol.model_copy(
        update={
            "variants": [
                *smol.variants,
                smol.variants[0].model_copy(
                    update={
                        "name": f"smollm2-test-{precision}-gguf-cpu",
                        "precision": precision,
                        "source": ConvertSource(
                            base=smol.variants[0].id, method="gguf-quantize", precision=precision
                        ),
                    }
                ),
            ]
        }
    )
    path = tmp_path / "extra-catalog.json"
    path.write_text(CatalogFile(models=[extra]).model_dump_json())
    return Catalog.load(path)


def test_a_failed_conversion_leaves_nothing_in_the_cache(tmp_path: Path):
    catalog = _custom_catalog(tmp_path, "q9_9")  # no such llama.cpp type: fails in the worker
    store = ModelStore(tmp_path / "cache")
    model, variant = catalog.variant("smollm2-test-q9_9-gguf-cpu")
    with pytest.raises(ConversionError, match="unsupported GGUF precision"):
        ensure_variant(store, catalog, model, variant)
    assert not store.variant_dir(model, variant).exists()
    assert not store.staging_dir(model, variant).exists()
    with pytest.raises(ModelNotFoundError):
        store.resolve(model, variant)
    assert all(c.variant_id != variant.id for c in list_cached(store, catalog))


_BUILD_SCRIPT = """
import sys
from pathlib import Path
from foundry_local_py.cache.acquire import ensure_variant
from foundry_local_py.cache.catalog import Catalog
from foundry_local_py.cache.store import ModelStore
catalog = Catalog.load()
store = ModelStore(Path(sys.argv[1]))
model, variant = catalog.variant(sys.argv[2])
stages = []
ensure_variant(store, catalog, model, variant, progress=lambda p: stages.append(p.stage))
print("BUILT" if "convert" in stages else "FOUND", flush=True)
"""


def _start_build(cache: Path, name: str = SMOLLM2_Q4_0) -> subprocess.Popen[str]:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.Popen(
        [sys.executable, "-c", _BUILD_SCRIPT, str(cache), name],
        env=dict(os.environ, PYTHONPATH=path),
        stdout=subprocess.PIPE,
        text=True,
    )


def test_a_killed_conversion_leaves_nothing_visible_and_the_next_build_succeeds(tmp_path: Path):
    catalog = Catalog.load()
    store = ModelStore(tmp_path)
    model, variant = catalog.variant(SMOLLM2_Q4_0)
    log = tmp_path / ".logs" / f"convert-{variant.name}.log"
    proc = _start_build(tmp_path)
    try:
        # Kill it once the quantized file is written and the fidelity run has started.
        deadline = time.monotonic() + 240
        while "Measuring fidelity" not in (log.read_text() if log.is_file() else ""):
            assert proc.poll() is None, "the build ended before it could be killed"
            assert time.monotonic() < deadline, "the build never reached the fidelity step"
            time.sleep(0.2)
        workers = psutil.Process(proc.pid).children(recursive=True)
        assert workers
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    # The worker notices its parent is gone and stops too.
    _gone, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive
    staged = store.staging_dir(model, variant)
    assert any(staged.rglob("*.gguf"))  # the output existed, unverified, in staging only
    assert not store.variant_dir(model, variant).exists()
    with pytest.raises(ModelNotFoundError):
        store.resolve(model, variant)
    assert all(c.variant_id != variant.id for c in list_cached(store, catalog))

    # The next build clears the leftovers and installs the variant.
    path = ensure_variant(store, catalog, model, variant)
    assert path.is_file() and store.manifest(model, variant) is not None
    assert not staged.exists()


def test_two_processes_build_a_variant_once(tmp_path: Path):
    procs = [_start_build(tmp_path) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert sorted(outputs) == ["BUILT", "FOUND"]
    catalog = Catalog.load()
    model, variant = catalog.variant(SMOLLM2_Q4_0)
    manifest = ModelStore(tmp_path).manifest(model, variant)
    assert manifest is not None and manifest.fidelity is not None


# --- CLI ----------------------------------------------------------------------------------------


def test_cli_convert_shows_the_recorded_fidelity(smollm2_onnx_int4, convert_store, convert_catalog):
    import typer
    from typer.testing import CliRunner

    from foundry_local_py.cli.convert import convert

    app = typer.Typer()
    app.command()(convert)
    result = CliRunner().invoke(
        app, ["smollm2-135m", "--precision", "int4", "--format", "onnx"],
        env={"FOUNDRY_LOCAL_CACHE": str(convert_store.root)},
    )
    assert result.exit_code == 0, result.output
    fid = _manifest(convert_store, convert_catalog, SMOLLM2_INT4).fidelity
    assert fid is not None
    assert SMOLLM2_INT4 in result.output
    assert f"{fid.top1_agreement:.1%}" in result.output
    assert f"{fid.perplexity_delta_pct:+.2f}%" in result.output
    assert "degraded" in result.output


def test_reference_text_is_a_few_hundred_tokens(tmp_path: Path):
    model, variant = Catalog.load().variant("smollm2-135m-instruct-q4_1-gguf-cpu:1")
    path = ModelStore(tmp_path).resolve(model, variant)
    ids = fidelity.tokenize(path, fidelity.reference_text(), max_tokens=10_000)
    assert 300 <= len(ids) <= fidelity.MAX_TOKENS
