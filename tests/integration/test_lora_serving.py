"""LoRA adapters served per request, on real servers with the real SmolLM2 GGUF and real GGUF LoRA
files (tests/support/lora.py writes them with the ``gguf`` package; llama.cpp loads them).

What must hold: at temperature 0 an adapter's answer differs from the base's; the base's answer
is exactly the same before and after adapter requests; 8 concurrent requests mixing the base and
two adapters each return exactly what they return alone (deterministic mode; at today's
defaults the count is reported); every API addresses an adapter as ``ALIAS:ADAPTER``; bad
adapters get clear 400/404/409 and the server keeps serving; metrics carry the adapter label.
"""

from __future__ import annotations

import concurrent.futures as cf
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from foundry_local_py.cache.adapters import AdapterStore
from foundry_local_py.errors import FoundryError
from tests.conftest import TEST_SERVER_ARGS, ServerFactory
from tests.support.lora import GEMMA_DIMS, truncate, write_lora
from tests.support.serving import SMOLLM, ServerProcess, assert_no_leaks, assert_openai_error, scrape

pytestmark = pytest.mark.slow

P = "foundry_local_"
PROMPTS = ("Write a haiku about the sea.", "Name three colors.")
A, B = f"{SMOLLM}:bot-a", f"{SMOLLM}:bot-b"


def _register(cache: Path, files: Path) -> dict[str, Path]:
    files.mkdir(parents=True, exist_ok=True)
    a = write_lora(files / "a.gguf", seed=0)
    b = write_lora(files / "b.gguf", seed=1)
    store = AdapterStore(cache)
    store.register(a, base=SMOLLM, name="bot-a", extra={"training": {"rank": 8}, "final_loss": 1.5})
    store.register(b, base=SMOLLM, name="bot-b")
    return {"a": a, "b": b}


@pytest.fixture(scope="module")
def lora_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Deterministic mode, runtime adapter loading allowed, two adapters registered."""
    root = tmp_path_factory.mktemp("lora")
    _register(root / "cache", root / "files")
    proc = ServerProcess(cache_dir=root / "cache", log_path=root / "server.log",
                         extra_args=[*TEST_SERVER_ARGS, "--deterministic", "--allow-runtime-lora-updating",
                                     "--parallel", "8"]).start()
    proc.files = root / "files"  # type: ignore[attr-defined]
    yield proc
    proc.stop()


def _chat(base_url: str, model: str, prompt: str = PROMPTS[0], **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 16,
            "temperature": 0, **extra}
    return httpx.post(base_url + "/v1/chat/completions", json=body, timeout=180)


def _text(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["message"]["content"])


def test_adapter_changes_the_answer_and_the_base_stays_exact(lora_server: ServerProcess) -> None:
    url = lora_server.base_url
    base = _text(_chat(url, SMOLLM))
    r = _chat(url, A)
    a = _text(r)
    assert r.json()["model"] == A
    b = _text(_chat(url, B))
    assert a != base and b != base and a != b, (base, a, b)
    assert _text(_chat(url, SMOLLM)) == base  # the same request without the adapter: exact
    # llama.cpp's per-request list: by name and by index (as listed: bot-a, bot-b), scale 1
    assert _text(_chat(url, SMOLLM, lora=[{"id": "bot-a"}])) == a
    assert _text(_chat(url, SMOLLM, lora=[{"id": 1, "scale": 1.0}])) == b
    assert _text(_chat(url, SMOLLM, lora=[{"id": 0, "scale": 0.0}])) == base  # scale 0: off
    assert _text(_chat(url, SMOLLM, lora=[{"id": 0, "scale": 0.5}])) not in (base,)
    assert _text(_chat(url, SMOLLM)) == base


def test_every_api_addresses_the_adapter(lora_server: ServerProcess) -> None:
    url = lora_server.base_url
    chat_a = _text(_chat(url, A))
    r = httpx.post(url + "/v1/responses", json={"model": A, "input": PROMPTS[0], "max_output_tokens": 16,
                                                "temperature": 0}, timeout=180)
    assert r.status_code == 200, r.text
    assert r.json()["output"][0]["content"][0]["text"] == chat_a
    r = httpx.post(url + "/v1/messages", json={"model": A, "max_tokens": 16, "temperature": 0,
                                               "messages": [{"role": "user", "content": PROMPTS[0]}]},
                   timeout=180)
    assert r.status_code == 200, r.text
    assert r.json()["content"][0]["text"] == chat_a
    base_text = httpx.post(url + "/v1/completions", json={"model": SMOLLM, "prompt": "The sea is",
                                                          "max_tokens": 12, "temperature": 0}, timeout=180)
    a_text = httpx.post(url + "/v1/completions", json={"model": A, "prompt": "The sea is",
                                                       "max_tokens": 12, "temperature": 0}, timeout=180)
    assert base_text.status_code == a_text.status_code == 200, a_text.text
    assert base_text.json()["choices"][0]["text"] != a_text.json()["choices"][0]["text"]
    # the Foundry version suffix still names the base variant
    assert _text(_chat(url, "smollm2-135m-instruct-q4_1-gguf-cpu:1")) == _text(_chat(url, SMOLLM))


def _mix(url: str) -> list[tuple[str, str]]:
    return [(m, p) for p in PROMPTS for m in (SMOLLM, A, B)] + [(A, PROMPTS[0]), (SMOLLM, PROMPTS[1])]


def _alone_and_mixed(url: str) -> tuple[int, int, dict[tuple[str, str], str]]:
    jobs = _mix(url)
    assert len(jobs) == 8
    alone = {job: _text(_chat(url, *job)) for job in set(jobs)}
    with cf.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda job: _text(_chat(url, *job)), jobs))
    same = sum(alone[job] == out for job, out in zip(jobs, together, strict=True))
    return same, len(jobs), alone


def test_eight_concurrent_mixed_requests_match_alone_in_deterministic_mode(
        lora_server: ServerProcess) -> None:
    same, total, alone = _alone_and_mixed(lora_server.base_url)
    assert same == total
    for p in PROMPTS:  # the three model names really gave three answers per prompt
        assert len({alone[(SMOLLM, p)], alone[(A, p)], alone[(B, p)]}) == 3


def test_eight_concurrent_mixed_requests_at_default_settings(
        server_factory: ServerFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "cache-default"
    _register(cache, tmp_path / "files")
    proc = server_factory(cache_dir=cache)
    same, total, alone = _alone_and_mixed(proc.base_url)
    with capsys.disabled():
        print(f"\ndefault settings: {same}/{total} mixed base/adapter requests matched their alone output")
    # the adapters still act (no sequence decoded under another's adapter set gives the base's text)
    for p in PROMPTS:
        assert alone[(A, p)] != alone[(SMOLLM, p)]
    assert same >= total - 2, f"only {same}/{total} matched"
    # runtime loading from a path is off by default: 403 naming lora_path
    r = httpx.post(proc.url("/v1/load_lora_adapter"),
                   json={"lora_name": "x", "lora_path": str(tmp_path / "files" / "a.gguf")})
    assert_openai_error(r, 403, param="lora_path")


def test_models_list_adapters_with_their_parent(lora_server: ServerProcess) -> None:
    data = httpx.get(lora_server.url("/v1/models")).json()["data"]
    cards = {c["id"]: c for c in data}
    assert cards[A]["parent"] == SMOLLM and cards[A]["root"] == "bot-a"
    assert cards[SMOLLM]["parent"] is None
    one = httpx.get(lora_server.url(f"/v1/models/{A}"))
    assert one.status_code == 200 and one.json()["parent"] == SMOLLM
    assert_openai_error(httpx.get(lora_server.url(f"/v1/models/{SMOLLM}:nope")), 404)


def test_unknown_and_bad_adapters_are_refused_and_the_server_keeps_serving(
        lora_server: ServerProcess) -> None:
    url = lora_server.base_url
    files: Path = lora_server.files  # type: ignore[attr-defined]
    base = _text(_chat(url, SMOLLM))
    err = assert_openai_error(_chat(url, f"{SMOLLM}:nope"), 404, param="model")
    assert "nope" in err["message"]
    assert_openai_error(_chat(url, SMOLLM, lora=[{"id": 7}]), 404, param="lora[0].id")
    assert_openai_error(_chat(url, SMOLLM, lora=[{"id": "nope"}]), 404, param="lora[0].id")
    assert_openai_error(_chat(url, SMOLLM, lora=[{"id": 0, "scale": 99}]), 400)
    # Anthropic's shape on the Messages API
    r = httpx.post(url + "/v1/messages", json={"model": f"{SMOLLM}:nope", "max_tokens": 8,
                                               "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404 and r.json()["type"] == "error"
    assert r.json()["error"]["type"] == "not_found_error"
    # traversal in a name: in a model name, and at runtime registration
    assert_openai_error(_chat(url, f"{SMOLLM}:../../etc/passwd"), 400, param="model")
    load = url + "/v1/load_lora_adapter"
    assert_openai_error(httpx.post(load, json={"lora_name": "../../x", "lora_path": str(files / "a.gguf"),
                                               "model": SMOLLM}), 400, param="lora_name")
    # wrong base (Gemma's dimensions and architecture), truncated, not an adapter: 409 / 400
    gemma = write_lora(files / "gemma.gguf", dims=GEMMA_DIMS)
    r = httpx.post(load, json={"lora_name": "gem", "lora_path": str(gemma), "model": SMOLLM})
    err = assert_openai_error(r, 409)
    assert "gemma3" in err["message"] and "llama" in err["message"]
    same_arch = write_lora(files / "dims.gguf", dims={**GEMMA_DIMS, "arch": "llama"})
    err = assert_openai_error(httpx.post(load, json={"lora_name": "dims", "lora_path": str(same_arch),
                                                     "model": SMOLLM}), 409)
    assert "[576, 576]" in err["message"] and "[640, 1024]" in err["message"]
    cut = truncate(files / "a.gguf", files / "cut.gguf")
    err = assert_openai_error(httpx.post(load, json={"lora_name": "cut", "lora_path": str(cut),
                                                     "model": SMOLLM}), 400)
    assert "truncated" in err["message"]
    assert_no_leaks(err["message"])
    ids = {c["id"] for c in httpx.get(url + "/v1/models").json()["data"]}
    assert ids >= {A, B} and not any(i.endswith((":gem", ":cut", ":dims")) for i in ids)
    assert _text(_chat(url, SMOLLM)) == base
    assert _text(_chat(url, A)) != base


def test_runtime_load_and_unload(lora_server: ServerProcess) -> None:
    url = lora_server.base_url
    files: Path = lora_server.files  # type: ignore[attr-defined]
    c = write_lora(files / "c.gguf", seed=2)
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "bot-c", "lora_path": str(c),
                                                        "model": SMOLLM})
    assert r.status_code == 200, r.text
    assert f"{SMOLLM}:bot-c" in {m["id"] for m in httpx.get(url + "/v1/models").json()["data"]}
    assert scrape(url).get(P + "lora_adapters_loaded", model=SMOLLM) >= 1
    out_c = _text(_chat(url, f"{SMOLLM}:bot-c"))
    assert out_c != _text(_chat(url, SMOLLM))
    r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "bot-c"})
    assert r.status_code == 200 and r.json()["unregistered"] is True, r.text
    assert_openai_error(_chat(url, f"{SMOLLM}:bot-c"), 404, param="model")
    # a registered adapter: freed from memory, still registered, loaded again on its next request
    out_a = _text(_chat(url, A))
    r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "bot-a"})
    assert r.status_code == 200 and r.json()["unregistered"] is False
    card = httpx.get(url + f"/v1/models/{A}").json()
    assert card["loaded"] is False
    assert _text(_chat(url, A)) == out_a
    assert httpx.get(url + f"/v1/models/{A}").json()["loaded"] is True
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "bot-b"})  # by name: no path
    assert r.status_code == 200, r.text
    assert_openai_error(httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "nope"}), 404)


def test_metrics_carry_the_adapter(lora_server: ServerProcess) -> None:
    url = lora_server.base_url
    _text(_chat(url, A))
    _text(_chat(url, SMOLLM, lora=[{"id": "bot-b"}]))
    m = scrape(url)
    assert m.get(P + "requests_total", model=SMOLLM, adapter="bot-a", status="200") >= 1
    assert m.get(P + "requests_total", model=SMOLLM, adapter="bot-b", status="200") >= 1
    assert m.get(P + "requests_total", model=SMOLLM, adapter="", status="200") >= 1
    assert m.get(P + "generation_tokens_total", model=SMOLLM, adapter="bot-a") > 0
    info = [ls for ls in m.label_sets(P + "lora_requests_info") if ls.get("model") == SMOLLM]
    assert info and info[0]["max_lora"] == "4" and "running_lora_adapters" in info[0]
    assert m.get(P + "lora_adapters_loaded", model=SMOLLM) >= 1


def _export_available() -> bool:
    try:
        return importlib.util.find_spec("foundry_local_py.finetune.export") is not None
    except ImportError:
        return False


def test_peft_folder_with_unsupported_targets(tmp_path: Path) -> None:
    folder = tmp_path / "peft"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["not_a_module"]}')
    with pytest.raises(FoundryError) as info:
        AdapterStore(tmp_path / "cache").register(folder, base=SMOLLM, name="peft-bad")
    assert info.value.status in (400, 409)
    if not _export_available():  # the PEFT export (issue 14t) is not in this tree: a clear 400
        assert "[finetune]" in info.value.message
    assert not (tmp_path / "cache" / "adapters" / "peft-bad").exists()
