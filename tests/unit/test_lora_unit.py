"""LoRA adapters, fast parts: the store's validation (real GGUF LoRA files written with the ``gguf``
package, the real SmolLM2 GGUF as the base), the capability check (an engine without
``lora_adapters``, ONNX's, refuses with a 400 naming the field), model-name resolution and the
prompt cache's keying by adapter set. Serving on the real engine: tests/integration/test_lora_serving.py."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from foundry_local_py.cache.adapters import AdapterStore, check_name, read_lora
from foundry_local_py.engines.backends import backend_for
from foundry_local_py.engines.prompt_cache import PromptCache
from foundry_local_py.errors import FoundryError
from foundry_local_py.generation.request import ChatPrompt, GenerationAsk, LoraAsk
from foundry_local_py.generation.validate import lora_set
from foundry_local_py.server.app import create_app
from tests.support.fake_app import Loader, fake_settings, wait_health
from tests.support.hub_catalog import smol_gguf_path
from tests.support.lora import GEMMA_DIMS, truncate, write_lora
from tests.support.serving import SMOLLM, assert_openai_error

pytestmark = pytest.mark.timeout(120)


def _status(fn: Any) -> tuple[int, str, str | None]:
    with pytest.raises(FoundryError) as info:
        fn()
    return info.value.status, info.value.message, info.value.param


def test_register_lands_a_validated_adapter_with_its_manifest(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path / "cache")
    src = write_lora(tmp_path / "a.gguf", rank=4, alpha=8.0, layers=(0, 29))
    rec = store.register(src, base=SMOLLM, name="Support-Bot", extra={"final_loss": 0.9})
    assert rec.model_name == f"{SMOLLM}:Support-Bot"
    assert rec.base_variant == "smollm2-135m-instruct-q4_1-gguf-cpu:1"
    assert (rec.rank, rec.alpha, rec.architecture, rec.source) == (4, 8.0, "llama", "gguf")
    assert rec.targets == ["blk.0.attn_q.weight", "blk.0.attn_v.weight", "blk.29.attn_q.weight",
                           "blk.29.attn_v.weight"]
    assert rec.size == src.stat().st_size and len(rec.sha256) == 64 and len(rec.base_sha256) == 64
    assert rec.path.read_bytes() == src.read_bytes() and rec.extra == {"final_loss": 0.9}
    assert store.get("support-bot").sha256 == rec.sha256  # case-insensitive
    assert [r.name for r in store.list(base=SMOLLM)] == ["Support-Bot"]
    assert store.list(base="gemma3-270m") == []
    assert not any((tmp_path / "cache" / ".staging" / "adapters").iterdir())
    store.remove("support-bot")
    assert store.list() == []
    assert _status(lambda: store.get("support-bot"))[0] == 404


@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".hidden", "x" * 65, "123", "a b", "a\x00b", ""])
def test_unsafe_names_are_400s(name: str) -> None:
    status, message, param = _status(lambda: check_name(name))
    assert status == 400 and param == "name" and "adapter name" in message


def test_bad_files_are_refused_before_the_engine(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path / "cache")
    good = write_lora(tmp_path / "a.gguf")
    cases = {
        "truncated": (truncate(good, tmp_path / "t.gguf"), 400, "truncated"),
        "not gguf": (tmp_path / "x.bin", 400, "not a readable GGUF"),
        "a model": (smol_gguf_path(), 400, "not a LoRA adapter"),
        "gemma": (write_lora(tmp_path / "g.gguf", dims=GEMMA_DIMS), 409, "architecture 'gemma3'"),
        "dims": (write_lora(tmp_path / "d.gguf", dims={**GEMMA_DIMS, "arch": "llama"}), 409, "[576, 576]"),
        "layers": (write_lora(tmp_path / "l.gguf", layers=(30,)), 409, "has 30 layers"),
    }
    (tmp_path / "x.bin").write_bytes(b"hello, not a gguf file")
    for what, (path, status, text) in cases.items():
        got, message, _ = _status(lambda p=path: store.register(p, base=SMOLLM, name="bad"))
        assert (got, text in message) == (status, True), (what, got, message)
        assert "/tmp" not in message
    assert store.list() == []
    assert _status(lambda: store.register(good, base="no-such-model", name="x"))[0] == 404


def test_read_lora_reports_the_pairs(tmp_path: Path) -> None:
    info = read_lora(write_lora(tmp_path / "a.gguf", rank=2, layers=(3,)))
    assert info.pairs == {"blk.3.attn_q.weight": ((576, 2), (2, 576)),
                          "blk.3.attn_v.weight": ((576, 2), (2, 192))}


def _served(fmt: str, adapters: list[Any] | None = None, adapter: Any = None) -> Any:
    info = SimpleNamespace(capabilities=backend_for(fmt).capabilities, engine=fmt)
    return SimpleNamespace(alias="m", adapter=adapter, engine=SimpleNamespace(info=info),
                           adapters=lambda: adapters or [])


def test_an_engine_without_lora_refuses_naming_the_field() -> None:
    ask = GenerationAsk(model="m", prompt=ChatPrompt([]), lora=(LoraAsk(0),))
    status, message, param = _status(lambda: lora_set(ask, _served("onnx")))
    assert (status, param) == (400, "lora") and "LoRA" in message
    named = GenerationAsk(model="m:bot", prompt=ChatPrompt([]))
    record = SimpleNamespace(name="bot", path=Path("x"), sha256="s")
    assert _status(lambda: lora_set(named, _served("onnx", adapter=record)))[2] == "model"
    assert lora_set(GenerationAsk(model="m", prompt=ChatPrompt([])), _served("onnx")) == ()
    # llama.cpp: the named adapter plus the list, sorted; unknown ids are 404s naming the entry
    other = SimpleNamespace(name="two", path=Path("y"), sha256="a")
    both = lora_set(GenerationAsk(model="m:bot", prompt=ChatPrompt([]), lora=(LoraAsk("TWO", 0.5),)),
                    _served("gguf", [record, other], adapter=record))
    assert [(r.name, r.scale) for r in both] == [("two", 0.5), ("bot", 1.0)]
    missing = GenerationAsk(model="m", prompt=ChatPrompt([]), lora=(LoraAsk(5),))
    assert _status(lambda: lora_set(missing, _served("gguf", [record])))[:3:2] == (404, "lora[0].id")


def test_the_fake_engine_refuses_the_lora_field_over_http(tmp_path: Path) -> None:
    with TestClient(create_app(fake_settings(tmp_path), engine_loader=Loader()),
                    raise_server_exceptions=False) as c:
        assert wait_health(c) == 200
        body = {"model": "fake-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        assert_openai_error(c.post("/v1/chat/completions", json={**body, "lora": [{"id": 0}]}), 400,
                            param="lora")
        assert_openai_error(c.post("/v1/chat/completions", json={**body, "model": "fake-chat:nope"}), 404,
                            param="model")
        traversal = {**body, "model": "fake-chat:../../etc/passwd"}
        assert_openai_error(c.post("/v1/chat/completions", json=traversal), 400, param="model")
        assert c.post("/v1/chat/completions", json=body).status_code == 200


def test_the_prompt_cache_finds_only_states_of_the_same_adapter_set() -> None:
    cache = PromptCache(1 << 20)
    toks = list(range(1, 40))
    cache.put(toks, lambda: b"base")
    cache.put(toks, lambda: b"lora", key=(("sha", 1.0),))
    arr = np.asarray([*toks, 99], dtype=np.int32)
    found = cache.lookup(arr, 4)
    assert found is not None and found[0].state == b"base"
    found = cache.lookup(arr, 4, (("sha", 1.0),))
    assert found is not None and found[0].state == b"lora"
    assert cache.lookup(arr, 4, (("sha", 0.5),)) is None
    assert len(cache) == 2


def test_cli_register_list_info_remove(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from typer.testing import CliRunner

    from foundry_local_py.cli.main import app

    monkeypatch.setenv("FOUNDRY_LOCAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("COLUMNS", "200")
    runner = CliRunner()
    src = write_lora(tmp_path / "a.gguf")
    out = runner.invoke(app, ["adapter", "register", str(src), "--base", SMOLLM, "--name", "support-bot"])
    assert out.exit_code == 0 and f"{SMOLLM}:support-bot" in out.output, out.output
    listed = runner.invoke(app, ["adapter", "list", "--json"])
    assert [a["model"] for a in json.loads(listed.output)] == [f"{SMOLLM}:support-bot"]
    info = runner.invoke(app, ["adapter", "info", "support-bot"])
    assert info.exit_code == 0 and json.loads(info.output)["base"] == SMOLLM
    bad = runner.invoke(app, ["adapter", "register", str(write_lora(tmp_path / "g.gguf", dims=GEMMA_DIMS)),
                              "--base", SMOLLM, "--name", "gem"])
    assert bad.exit_code == 1 and "gemma3" in bad.output and "Traceback" not in bad.output
    assert runner.invoke(app, ["adapter", "remove", "support-bot", "--yes"]).exit_code == 0
    assert json.loads(runner.invoke(app, ["adapter", "list", "--json"]).output) == []
    assert runner.invoke(app, ["adapter", "info", "support-bot"]).exit_code == 1
