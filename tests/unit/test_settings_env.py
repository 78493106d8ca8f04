"""Settings given in code reach a process started from code (the SDK's service) intact."""

from __future__ import annotations

from pathlib import Path

import pytest

from foundry_local_py.config import Settings


def test_settings_round_trip_through_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    given = Settings(port=4321, api_key="s3cret", cache_dir=tmp_path / "c", allowed_hosts=["a.lan", "b"],
                     device="cpu", ep="cpu", n_threads=3, n_ctx=1024, parallel=2, preload=False,
                     catalog_path=tmp_path / "cat.json", model_ttl_s=5.5, cors_origins=["http://x"])
    for key in list(__import__("os").environ):
        if key.startswith("FOUNDRY_LOCAL_"):
            monkeypatch.delenv(key)
    for key, value in given.to_env().items():
        monkeypatch.setenv(key, value)
    assert Settings() == given
    assert Settings().api_key_value() == "s3cret"


def test_unset_optional_settings_are_not_exported() -> None:
    env = Settings(api_key=None, n_ctx=None).to_env()
    assert "FOUNDRY_LOCAL_API_KEY" not in env and "FOUNDRY_LOCAL_N_CTX" not in env
