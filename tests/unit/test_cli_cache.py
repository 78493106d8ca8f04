"""`foundry-local model list|info|register` and `cache list|location|remove|verify` (no network)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from foundry_local_py.cli.main import app
from tests.support.hub_catalog import smol_gguf_path


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("FOUNDRY_LOCAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("COLUMNS", "200")
    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(app, list(args))

    return run


def test_cache_location_follows_the_environment(cli, tmp_path: Path):
    result = cli("cache", "location")
    assert result.exit_code == 0 and result.output.strip() == str(tmp_path / "cache")


def test_register_list_info_verify_remove(cli):
    gguf = str(smol_gguf_path())
    assert cli("model", "register", gguf, "--alias", "mine").exit_code == 0

    listing = cli("model", "list")
    assert listing.exit_code == 0
    assert "mine" in listing.output and "qwen2.5-0.5b-instruct" in listing.output

    info = cli("model", "info", "mine")
    assert info.exit_code == 0 and "Selected on this machine: mine-gguf-local:1" in info.output

    cached = cli("cache", "list")
    assert cached.exit_code == 0 and "mine" in cached.output and "registered" in cached.output

    verify = cli("cache", "verify", "--no-repair")
    assert verify.exit_code == 0 and "corrupt" not in verify.output

    removed = cli("cache", "remove", "mine", "--yes")
    assert removed.exit_code == 0 and "unregistered" in removed.output
    assert "mine" not in cli("cache", "list").output


def test_errors_are_one_line_without_traceback(cli):
    result = cli("model", "info", "no-such-model")
    assert result.exit_code == 1
    assert "does not exist" in result.output and "Traceback" not in result.output


def test_register_refuses_a_file_that_is_not_a_model(cli, tmp_path: Path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"nope")
    result = cli("model", "register", str(junk), "--alias", "junk")
    assert result.exit_code == 1 and "GGUF" in result.output
