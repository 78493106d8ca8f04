"""Path safety for names and paths that reach the filesystem (Ollama CVE-2024-37032)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from foundry_local_py.cache.catalog import CatalogModel, HubFile, HuggingFaceSource, LocalSource
from foundry_local_py.cache.layout import (
    check_no_escaping_symlinks,
    check_registered_path,
    check_relative_path,
    safe_join,
)
from foundry_local_py.cache.store import ModelStore
from foundry_local_py.errors import UnsafePathError

UNSAFE_RELATIVE = [
    "",
    "../evil.gguf",
    "a/../../b",
    "./a",
    "a/./b",
    "/etc/passwd",
    "a\x00b",
    "a\\..\\b",
    "C:evil",
    "dir/",
    "a//b",
]


@pytest.mark.parametrize("value", UNSAFE_RELATIVE)
def test_unsafe_relative_paths_are_rejected(value: str):
    with pytest.raises(UnsafePathError):
        check_relative_path(value)


@pytest.mark.parametrize("value", ["model.gguf", "cpu_and_mobile/cpu-int4/model.onnx.data", "a..b/c"])
def test_plain_relative_paths_pass(value: str):
    assert check_relative_path(value) == value


@pytest.mark.parametrize("value", UNSAFE_RELATIVE)
def test_hub_file_names_from_a_catalog_are_rejected(value: str):
    with pytest.raises((UnsafePathError, ValidationError)):
        HubFile(path=value)


def test_hub_subfolder_is_checked_too():
    with pytest.raises(UnsafePathError):
        HuggingFaceSource(repo="a/b", subfolder="../x", files=[HubFile(path="m.gguf")])


@pytest.mark.parametrize("repo", ["../x", "a/../b", "a", "a/b/c", "/a/b", "a/b\x00"])
def test_repo_ids_must_be_owner_slash_name(repo: str):
    with pytest.raises(ValidationError):
        HuggingFaceSource(repo=repo, files=[HubFile(path="m.gguf")])


def test_revision_cannot_climb():
    with pytest.raises(ValidationError):
        HuggingFaceSource(repo="a/b", revision="main/../../x", files=[HubFile(path="m.gguf")])


@pytest.mark.parametrize("alias", ["../x", "a/b", "..", "a..b", "x\x00", "/abs", ""])
def test_unsafe_aliases_are_rejected(alias: str):
    with pytest.raises(ValidationError):
        CatalogModel(
            alias=alias,
            display_name="x",
            publisher="p",
            license="mit",
            context_length=128,
            variants=[
                {
                    "name": "v",
                    "format": "gguf",
                    "precision": "q4",
                    "source": {"kind": "local", "path": "/m.gguf"},
                }
            ],
        )


@pytest.mark.parametrize("value", ["relative/model.gguf", "/a/../etc/passwd", "/a/./b", "/a\x00b", ""])
def test_registered_paths_must_be_absolute_and_normalised(value: str):
    with pytest.raises(UnsafePathError):
        check_registered_path(value)
    with pytest.raises(UnsafePathError):
        LocalSource(path=value)


def test_safe_join_refuses_a_symlink_that_leaves_the_root(tmp_path: Path):
    root = tmp_path / "cache"
    (root / "pub").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "pub" / "variant").symlink_to(outside)

    with pytest.raises(UnsafePathError):
        safe_join(root, "pub", "variant")
    assert safe_join(root, "pub", "other") == root / "pub" / "other"


def test_store_refuses_a_planted_staging_link(tmp_path: Path):
    root = tmp_path / "cache"
    root.mkdir()
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", root / ".staging")
    model = CatalogModel(
        alias="m",
        display_name="m",
        publisher="p",
        license="mit",
        context_length=128,
        variants=[
            {
                "name": "v",
                "format": "gguf",
                "precision": "q4",
                "source": {"kind": "huggingface", "repo": "a/b", "files": [{"path": "m.gguf"}]},
            }
        ],
    )
    with pytest.raises(UnsafePathError):
        ModelStore(root).staging_dir(model, model.variants[0])


def test_symlinks_inside_a_model_folder_must_stay_inside(tmp_path: Path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "real.bin").write_bytes(b"x")
    (folder / "inner").symlink_to(folder / "real.bin")
    check_no_escaping_symlinks(folder)

    (tmp_path / "secret").write_text("s")
    (folder / "sub").mkdir()
    (folder / "sub" / "leak").symlink_to(tmp_path / "secret")
    with pytest.raises(UnsafePathError):
        check_no_escaping_symlinks(folder)
