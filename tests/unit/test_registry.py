"""Registering local models: safe paths, real formats, the user catalog file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from foundry_local_py.cache.catalog import load_catalog, user_catalog_path
from foundry_local_py.cache.inventory import list_cached, remove_model, verify_cache
from foundry_local_py.cache.registry import register_local, unregister_local
from foundry_local_py.cache.store import ModelStore
from foundry_local_py.errors import ConflictError, InvalidRequestError, UnsafePathError
from tests.support.hub_catalog import smol_gguf_path


def test_register_a_gguf_file_and_resolve_it(tmp_path: Path):
    gguf = smol_gguf_path()
    model = register_local(tmp_path, gguf.resolve(), "my-smol", catalog=load_catalog(tmp_path))

    data = json.loads(user_catalog_path(tmp_path).read_text())
    assert [m["alias"] for m in data["models"]] == ["my-smol"]
    catalog = load_catalog(tmp_path)
    found, _ = catalog.lookup("my-smol")
    assert found == model and found.variants[0].format == "gguf"
    store = ModelStore(tmp_path)
    assert store.resolve(found, found.variants[0]) == gguf.resolve()
    entries = [e for e in list_cached(store, catalog) if e.alias == "my-smol"]
    assert [(e.location, e.size_bytes) for e in entries] == [("registered", gguf.stat().st_size)]
    assert {r.variant_id: r.status for r in verify_cache(store, catalog)}[found.variants[0].id] == "ok"


def test_register_an_onnx_folder(tmp_path: Path):
    folder = tmp_path / "genai"
    folder.mkdir()
    (folder / "genai_config.json").write_text("{}")
    (folder / "model.onnx").write_bytes(b"onnx")
    model = register_local(tmp_path / "cache", folder, "tiny")
    assert model.variants[0].format == "onnx"


def test_duplicate_alias_needs_replace(tmp_path: Path):
    gguf = smol_gguf_path().resolve()
    register_local(tmp_path, gguf, "dup")
    with pytest.raises(ConflictError):
        register_local(tmp_path, gguf, "dup", catalog=load_catalog(tmp_path))
    with pytest.raises(ConflictError):
        register_local(tmp_path, gguf, "smollm2-135m", catalog=load_catalog(tmp_path))
    register_local(tmp_path, gguf, "dup", catalog=load_catalog(tmp_path), replace=True, context_length=2048)
    model = load_catalog(tmp_path).model("dup")
    assert model is not None and model.context_length == 2048


@pytest.mark.parametrize("alias", ["../x", "a/b", "a..b", "x\x00", ""])
def test_unsafe_alias_is_refused_and_nothing_written(tmp_path: Path, alias: str):
    with pytest.raises((UnsafePathError, InvalidRequestError)):
        register_local(tmp_path, smol_gguf_path().resolve(), alias)
    assert not user_catalog_path(tmp_path).exists()


@pytest.mark.parametrize("path", ["relative.gguf", "/tmp/../etc/passwd", "/tmp/a\x00.gguf"])
def test_unsafe_path_is_refused(tmp_path: Path, path: str):
    with pytest.raises(UnsafePathError):
        register_local(tmp_path, path, "x")


def test_not_a_model_is_refused(tmp_path: Path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file")
    with pytest.raises(InvalidRequestError):
        register_local(tmp_path, junk, "junk")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InvalidRequestError):
        register_local(tmp_path, empty, "empty")
    with pytest.raises(InvalidRequestError):
        register_local(tmp_path, tmp_path / "missing.gguf", "missing")


def test_folder_with_a_symlink_out_is_refused(tmp_path: Path):
    folder = tmp_path / "genai"
    folder.mkdir()
    (folder / "genai_config.json").write_text("{}")
    (folder / "model.onnx").symlink_to("/etc/passwd")
    with pytest.raises(UnsafePathError):
        register_local(tmp_path / "cache", folder, "leaky")


def test_remove_unregisters_and_leaves_the_file(tmp_path: Path):
    gguf = smol_gguf_path().resolve()
    register_local(tmp_path, gguf, "mine")
    results = remove_model(ModelStore(tmp_path), load_catalog(tmp_path), "mine")
    assert [r.action for r in results] == ["unregistered"]
    assert load_catalog(tmp_path).model("mine") is None
    assert gguf.is_file()
    assert unregister_local(tmp_path, "mine") is False
