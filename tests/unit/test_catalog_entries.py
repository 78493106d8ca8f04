"""The shipped catalog's hub entries and the user catalog merge."""

from __future__ import annotations

import json
from pathlib import Path

from foundry_local_py.cache.catalog import (
    Catalog,
    HuggingFaceSource,
    load_catalog,
    read_catalog_file,
    shipped_catalog_path,
    user_catalog_path,
)
from foundry_local_py.cache.inventory import fallback_variant
from foundry_local_py.cache.store import ModelStore

EXPECTED_ALIASES = {
    "smollm2-135m",
    "gemma3-270m",
    "qwen2.5-0.5b-instruct",
    "phi-4-mini",
    "llama-3.2-1b-instruct",
}


def test_shipped_catalog_has_the_models_users_expect():
    catalog = Catalog.load()
    assert {m.alias for m in catalog.models} >= EXPECTED_ALIASES


def test_hub_variants_are_complete_enough_to_download():
    """Hub variants name a quant (GGUF) or an ONNX GenAI subfolder; the files come from the
    repo's listing at download time (tests/unit/test_hub_names.py), so no path can be wrong."""
    for model in read_catalog_file(shipped_catalog_path()).models:
        for variant in model.variants:
            source = variant.source
            if not isinstance(source, HuggingFaceSource):
                continue
            if variant.format == "gguf":
                assert source.quant is not None and not source.files, variant.id
            else:
                assert source.subfolder is not None and not source.files, variant.id


def test_every_alias_has_a_cpu_variant():
    for model in Catalog.load().models:
        assert any(v.device == "cpu" for v in model.variants), model.alias


def test_user_catalog_in_the_cache_dir_is_merged_over_the_shipped_one(tmp_path: Path):
    entry = {
        "alias": "phi-4-mini",
        "display_name": "my phi",
        "publisher": "me",
        "license": "mit",
        "context_length": 4096,
        "variants": [
            {
                "name": "my-phi",
                "format": "gguf",
                "precision": "q8_0",
                "source": {
                    "kind": "huggingface",
                    "repo": "me/phi",
                    "files": [{"path": "phi.gguf"}],
                    "entry": "phi.gguf",
                },
            }
        ],
    }
    user_catalog_path(tmp_path).write_text(json.dumps({"schema_version": 1, "models": [entry]}))
    catalog = load_catalog(tmp_path)
    model = catalog.model("PHI-4-MINI")
    assert model is not None and model.display_name == "my phi"
    assert catalog.model("qwen2.5-0.5b-instruct") is not None


def test_fallback_prefers_what_is_usable_then_cpu_gguf(tmp_path: Path):
    catalog = Catalog.load()
    store = ModelStore(tmp_path)
    llama = catalog.model("llama-3.2-1b-instruct")
    assert llama is not None
    assert fallback_variant(store, llama).id == "llama-3.2-1b-instruct-q4_k_m-gguf-cpu:1"
    smol = catalog.model("smollm2-135m")
    assert smol is not None
    assert fallback_variant(store, smol).source.kind == "package"
