"""One source for settings: serve's flags and README's tables come from the code."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import Field
from typer.testing import CliRunner

from foundry_local_py.cli import docs
from foundry_local_py.cli.main import app
from foundry_local_py.cli.serve import make_serve_command
from foundry_local_py.config import Settings, setting_specs

README = Path(__file__).resolve().parents[2] / "README.md"


def _capture(settings_cls: type[Settings] = Settings):
    import typer

    seen: list[Settings] = []
    cli = typer.Typer()
    cli.command()(make_serve_command(settings_cls, run=seen.append))
    return cli, seen


def test_every_setting_is_a_documented_flag():
    result = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200", "TERM": "dumb"})
    assert result.exit_code == 0, result.output
    text = " ".join(line.strip(" │") for line in result.output.splitlines())
    for spec in setting_specs():
        assert spec.help, f"Settings.{spec.name} has no description"
        assert spec.flags[0] in result.output, spec.name
    assert "(default: 5273; env FOUNDRY_LOCAL_PORT)" in " ".join(text.split())


def test_existing_flag_names_and_aliases_reach_the_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    for key in [k for k in __import__("os").environ if k.startswith("FOUNDRY_LOCAL_")]:
        monkeypatch.delenv(key)
    cli, seen = _capture()
    args = ["--model", "gemma3-270m", "--host", "0.0.0.0", "--port", "8080", "--api-key", "k",
            "--cache-dir", str(tmp_path), "--catalog", str(tmp_path / "c.json"), "--n-threads", "3",
            "--n-ctx", "2048", "--max-batch", "5", "--max-queue", "7", "--queue-timeout", "9.5",
            "--device", "cpu", "--ep", "cpu", "--allowed-host", "example.test", "--cors-origin",
            "http://a.test", "--no-preload", "--log-level", "debug", "--prompt-cache-mib", "0"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    s = seen[0]
    assert (s.default_model, s.host, s.port, s.api_key_value()) == ("gemma3-270m", "0.0.0.0", 8080, "k")
    assert (s.cache_dir, s.catalog_path) == (tmp_path, tmp_path / "c.json")
    assert (s.n_threads, s.n_ctx, s.parallel, s.max_queue, s.queue_timeout_s) == (3, 2048, 5, 7, 9.5)
    assert (s.device, s.ep, s.preload, s.log_level, s.prompt_cache_mib) == ("cpu", "cpu", False, "debug", 0)
    assert "example.test" in s.allowed_hosts and "127.0.0.1" in s.allowed_hosts  # added to the defaults
    assert s.cors_origins == ["http://a.test"]
    # the other spellings
    assert CliRunner().invoke(cli, ["--parallel", "6", "-m", "x"]).exit_code == 0
    assert (seen[1].parallel, seen[1].default_model) == (6, "x")


def test_flags_override_the_environment_which_overrides_defaults(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("FOUNDRY_LOCAL_PORT", "9999")
    monkeypatch.setenv("FOUNDRY_LOCAL_MAX_QUEUE", "3")
    cli, seen = _capture()
    assert CliRunner().invoke(cli, ["--port", "7000"]).exit_code == 0
    assert (seen[0].port, seen[0].max_queue) == (7000, 3)


def test_a_bad_value_names_the_flag():
    cli, _ = _capture()
    result = CliRunner().invoke(cli, ["--n-ctx", "10"])
    assert result.exit_code == 2
    assert "--n-ctx" in result.output
    result = CliRunner().invoke(cli, ["--device", "tpu"])
    assert result.exit_code == 2


def test_a_new_setting_becomes_a_flag_and_a_row_by_itself(monkeypatch: pytest.MonkeyPatch):
    class More(Settings):
        allow_unauthenticated_remote: bool = Field(False, description="Serve a remote client without a key.")
        responses_store_max: int = Field(1000, ge=0, description="Stored responses kept.")

    cli, seen = _capture(More)
    result = CliRunner().invoke(cli, ["--allow-unauthenticated-remote", "--responses-store-max", "5"])
    assert result.exit_code == 0, result.output
    assert seen[0].allow_unauthenticated_remote is True and seen[0].responses_store_max == 5
    monkeypatch.setattr(docs, "setting_specs", lambda: setting_specs(More))
    table = docs.settings_table()
    assert "`--responses-store-max`" in table and "Stored responses kept." in table
    assert "`FOUNDRY_LOCAL_ALLOW_UNAUTHENTICATED_REMOTE`" in table


def test_readme_tables_are_what_the_code_generates():
    """Fails when a setting, metric or route changed without ./scripts/gen-docs (or the table
    was edited by hand)."""
    text = README.read_text(encoding="utf-8")
    assert docs.stale_blocks(text) == [], "README is out of date: run ./scripts/gen-docs"


def test_a_hand_edit_of_a_table_is_caught(tmp_path: Path):
    text = README.read_text(encoding="utf-8")
    edited = text.replace("| `port` |", "| `port` (edited) |", 1)
    assert edited != text
    assert docs.stale_blocks(edited) == ["settings"]
    edited = text.replace("`foundry_local_requests_total`", "`foundry_local_requests`", 1)
    assert docs.stale_blocks(edited) == ["metrics"]
    # the CLI verb agrees, and rewriting repairs it
    path = tmp_path / "README.md"
    path.write_text(edited, encoding="utf-8")
    assert CliRunner().invoke(app, ["docs", "--check", "--readme", str(path)]).exit_code == 1
    assert CliRunner().invoke(app, ["docs", "--readme", str(path)]).exit_code == 0
    assert path.read_text(encoding="utf-8") == text
    assert CliRunner().invoke(app, ["docs", "--check", "--readme", str(path)]).exit_code == 0


def test_tables_cover_every_metric_and_route():
    names = {name for name, *_ in docs.metric_families()}
    assert {"foundry_local_requests_total", "foundry_local_requests_running",
            "foundry_local_cache_size_bytes", "foundry_local_prefix_cache_hits_total"} <= names
    routes = docs.routes_table()
    for path in ("/v1/chat/completions", "/openai/download", "/metrics", "/health"):
        assert f"`{path}`" in routes
