"""Fast checks of the conversion pieces that need no model: fidelity arithmetic, recipe checks,
variant selection for ``model convert``, and how the store reads a conversion's manifest.
The real conversions are in tests/integration/test_convert.py."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from foundry_local_py.cache.catalog import Catalog
from foundry_local_py.cache.convert import fidelity
from foundry_local_py.cache.convert.build import check_recipe, missing_dependencies
from foundry_local_py.cache.convert.gguf_quantize import ftype_for
from foundry_local_py.cache.convert.onnx_builder import flatten_rope_config
from foundry_local_py.cache.manifest import Fidelity, Manifest, ManifestFile, write_manifest
from foundry_local_py.cache.store import ModelStore
from foundry_local_py.cli.convert import select_convert_variant
from foundry_local_py.errors import ConversionError, InvalidRequestError, ModelNotFoundError

INT8 = "smollm2-135m-instruct-int8-onnx-cpu"
INT4 = "smollm2-135m-instruct-int4-onnx-cpu"


def _logits(rng: np.random.Generator, n: int, vocab: int) -> np.ndarray:
    return rng.normal(size=(n, vocab)).astype(np.float32)


def test_identical_models_agree_fully_with_no_perplexity_change():
    rng = np.random.default_rng(0)
    ids = list(rng.integers(0, 50, size=40))
    logits = _logits(rng, 40, 50)
    a = fidelity.scores_from_logits(logits, ids)
    result = fidelity.compare(a, fidelity.scores_from_logits(logits.copy(), ids), threshold=0.9)
    assert result.top1_agreement == 1.0 and result.perplexity_delta_pct == 0.0 and not result.degraded
    assert result.n_tokens == 39  # the last position has no next token
    # perplexity = exp(mean negative log-likelihood of the actual next tokens)
    logp = logits[:-1] - np.log(np.exp(logits[:-1]).sum(axis=1, keepdims=True))
    expected = math.exp(-float(np.mean(logp[np.arange(39), ids[1:]])))
    assert result.perplexity_source == pytest.approx(expected, rel=1e-3)


def test_disagreeing_on_half_the_positions_is_degraded():
    rng = np.random.default_rng(1)
    ids = list(rng.integers(0, 20, size=21))
    source = _logits(rng, 21, 20)
    converted = source.copy()
    for i in range(0, 20, 2):  # move the argmax elsewhere at every other position
        top = int(np.argmax(converted[i]))
        converted[i, (top + 1) % 20] = converted[i, top] + 5.0
    result = fidelity.compare(
        fidelity.scores_from_logits(source, ids), fidelity.scores_from_logits(converted, ids), threshold=0.9
    )
    assert result.top1_agreement == 0.5 and result.degraded
    assert result.perplexity_converted != result.perplexity_source


def test_model_kind_rejects_unknown_formats(tmp_path: Path):
    (tmp_path / "x.bin").write_bytes(b"x")
    with pytest.raises(ConversionError):
        fidelity.model_kind(tmp_path / "x.bin")
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "genai_config.json").write_text("{}")
    assert fidelity.model_kind(tmp_path / "onnx") == "onnx"


def test_gguf_precision_names_map_to_llama_cpp_types():
    assert ftype_for("q4_0") == 2
    assert ftype_for("Q8_0") == 7
    assert ftype_for("q3_k_m") == 12
    assert ftype_for("f32") == 0
    for bad in ("q9_9", "../q4_0", ""):
        with pytest.raises(ConversionError):
            ftype_for(bad)


def test_gemma3_rope_settings_are_flattened_for_the_builder():
    config = SimpleNamespace(
        architectures=["Gemma3ForCausalLM"],
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
    )
    flatten_rope_config(config)
    assert config.rope_theta == 1_000_000.0
    assert config.rope_local_base_freq == 10_000.0
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 1_000_000.0}
    llama = SimpleNamespace(architectures=["LlamaForCausalLM"], rope_parameters={"rope_type": "default"})
    flatten_rope_config(llama)
    assert llama.rope_parameters == {"rope_type": "default"} and not hasattr(llama, "rope_theta")


def test_recipes_are_checked_against_formats():
    catalog = Catalog.load()
    _, gguf = catalog.variant("smollm2-135m-instruct-q4_1-gguf-cpu")
    _, onnx = catalog.variant(INT8)
    _, requant = catalog.variant("smollm2-135m-instruct-q4_0-gguf-cpu")
    assert check_recipe(onnx, gguf).method == "onnx-builder"
    assert check_recipe(requant, gguf).method == "gguf-quantize"
    with pytest.raises(ConversionError):
        check_recipe(gguf, gguf)  # not a converted variant
    with pytest.raises(ConversionError):
        check_recipe(onnx, onnx)  # an ONNX model is not rebuilt
    with pytest.raises(ConversionError):
        check_recipe(requant, onnx)
    assert missing_dependencies("gguf-quantize") == []


def test_convert_command_picks_a_variant():
    catalog = Catalog.load()
    assert select_convert_variant(catalog, "smollm2-135m")[1].name == INT8  # first CPU conversion
    assert select_convert_variant(catalog, "smollm2-135m", precision="int4")[1].name == INT4
    assert select_convert_variant(catalog, "smollm2-135m", precision="fp16")[1].device == "gpu"
    base = "smollm2-135m-instruct-q4_1-gguf-cpu"
    assert select_convert_variant(catalog, base, fmt="gguf")[1].precision == "q4_0"
    assert select_convert_variant(catalog, INT4)[1].name == INT4
    with pytest.raises(InvalidRequestError):
        select_convert_variant(catalog, INT4, precision="int8")
    with pytest.raises(InvalidRequestError, match="the catalog has"):
        select_convert_variant(catalog, "gemma3-270m", fmt="gguf")
    with pytest.raises(ModelNotFoundError):
        select_convert_variant(catalog, "no-such-model")


def _fake_build(store: ModelStore, name: str, *, degraded: bool, precision: str | None = None) -> Path:
    """A converted folder as build_variant leaves it (fake files: the store only stats them)."""
    catalog = Catalog.load()
    model, variant = catalog.variant(name)
    folder = store.variant_dir(model, variant)
    folder.mkdir(parents=True)
    (folder / "genai_config.json").write_text("{}")
    (folder / "model.onnx").write_bytes(b"\0" * 100)
    source = variant.source
    assert source.kind == "convert"
    write_manifest(
        folder,
        Manifest(
            variant_id=variant.id,
            alias=model.alias,
            kind="convert",
            files=[ManifestFile(path="genai_config.json", size=2), ManifestFile(path="model.onnx", size=100)],
            source={
                "base": source.base,
                "method": source.method,
                "precision": precision or source.precision,
                "execution_provider": source.execution_provider,
            },
            fidelity=Fidelity(
                top1_agreement=0.6 if degraded else 0.95, perplexity_source=25.0, perplexity_converted=30.0,
                perplexity_delta_pct=20.0, n_tokens=400, threshold=0.9, degraded=degraded,
            ),
        ),
    )
    return folder


def test_store_resolves_a_built_conversion_and_reads_its_fidelity(tmp_path: Path):
    store = ModelStore(tmp_path)
    catalog = Catalog.load()
    folder = _fake_build(store, INT4, degraded=True)
    _fake_build(store, INT8, degraded=False)
    int4 = catalog.variant(INT4)
    int8 = catalog.variant(INT8)
    assert store.resolve(*int4) == folder
    assert store.is_degraded(*int4) and not store.is_degraded(*int8)
    fid = store.fidelity(*int4)
    assert fid is not None and fid.top1_agreement == 0.6
    unbuilt = catalog.variant("smollm2-135m-instruct-fp32-onnx-cpu")
    assert store.fidelity(*unbuilt) is None and not store.is_degraded(*unbuilt)
    with pytest.raises(ModelNotFoundError, match="model convert"):
        store.resolve(*unbuilt)
    # a missing file makes it unavailable until rebuilt
    (folder / "model.onnx").unlink()
    with pytest.raises(ModelNotFoundError, match="incomplete"):
        store.resolve(*int4)
    assert store.is_available(*int4)  # the cheap check does not stat the files


def test_a_build_by_another_recipe_is_not_used(tmp_path: Path):
    store = ModelStore(tmp_path)
    _fake_build(store, INT8, degraded=False, precision="int4")
    with pytest.raises(ModelNotFoundError, match="older recipe"):
        store.resolve(*Catalog.load().variant(INT8))
