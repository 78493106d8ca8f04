"""Any Hugging Face GGUF by name (hf.co/<owner>/<repo>[:<quant>]) against the fake hub's listing
API, with huggingface-hub's real client; shipped catalog entries resolve the same way."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from foundry_local_py.cache.acquire import ensure_variant
from foundry_local_py.cache.catalog import (
    Catalog,
    HuggingFaceSource,
    load_catalog,
    read_catalog_file,
    shipped_catalog_path,
)
from foundry_local_py.cache.gguf_info import read_gguf_info
from foundry_local_py.cache.hub import (
    ensure_hub_model,
    list_repo,
    parse_hub_name,
    pick_gguf,
    quant_of,
    resolved_source,
)
from foundry_local_py.cache.store import ModelStore
from foundry_local_py.errors import DownloadError, InvalidRequestError
from tests.support.fake_hub import FakeHub
from tests.support.hub_catalog import write_gguf

MULTI = "acme/Tiny-Chat-GGUF"
SPLIT = "acme/Big-GGUF"
ONLY_Q8 = "acme/Only-Q8-GGUF"
NO_GGUF = "acme/tiny-transformers"
ONNX = "acme/tiny-onnx"


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    d = tmp_path_factory.mktemp("hubfiles")
    hub = FakeHub()
    for i, quant in enumerate(["Q2_K", "Q4_K_M", "Q5_K_M", "Q8_0", "f16"]):
        path = write_gguf(d / f"tiny-{quant}.gguf", context_length=1024 * (i + 1), filler=20_000 + i)
        hub.add_file(MULTI, f"Tiny-Chat-{quant}.gguf", path)
    hub.add_file(MULTI, "mmproj-Tiny-Chat-f16.gguf", write_gguf(d / "mmproj.gguf"))
    hub.add_file(MULTI, "README.md", _text(d / "readme", "# tiny"))
    # a split Q8_0 in three parts (in a folder, as bartowski does), an incomplete Q6_K split, a Q4_0
    for n in (1, 2, 3):
        hub.add_file(SPLIT, f"Q8_0/Big-Q8_0-0000{n}-of-00003.gguf",
                     write_gguf(d / f"big-q8-{n}.gguf", filler=30_000 + n))
    hub.add_file(SPLIT, "Big-Q6_K-00001-of-00002.gguf", write_gguf(d / "big-q6.gguf"))
    hub.add_file(SPLIT, "Big-Q4_0.gguf", write_gguf(d / "big-q4_0.gguf", chat_template=None))
    hub.add_file(ONLY_Q8, "only.Q8_0.gguf", write_gguf(d / "only.gguf"))
    hub.add_file(ONLY_Q8, "only.F16.gguf", write_gguf(d / "only16.gguf", filler=100))
    hub.add_file(NO_GGUF, "config.json", _text(d / "config.json", "{}"))
    hub.add_file(NO_GGUF, "model.safetensors", _text(d / "st", "x" * 20_000))
    hub.add_file(ONNX, "cpu_and_mobile/cpu-int4/genai_config.json", _text(d / "genai.json", '{"model": {}}'))
    hub.add_file(ONNX, "cpu_and_mobile/cpu-int4/model.onnx", _text(d / "m.onnx", "o" * 12_000))
    hub.add_file(ONNX, "cpu_and_mobile/cpu-int4/tokenizer.json", _text(d / "tok.json", "{}"))
    hub.add_file(ONNX, "cuda/cuda-int4/model.onnx", _text(d / "m2.onnx", "c" * 12_000))
    hub.add_file(ONNX, "README.md", _text(d / "readme2", "# onnx"))
    with hub:
        yield hub


def _text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture(autouse=True)
def _endpoint(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")


def test_names_parse():
    assert parse_hub_name("hf.co/acme/Tiny-Chat-GGUF").repo == MULTI
    ref = parse_hub_name("huggingface.co/acme/Tiny-Chat-GGUF:q8_0")
    assert (ref.repo, ref.quant, ref.name) == (MULTI, "q8_0", "hf.co/acme/Tiny-Chat-GGUF:Q8_0")
    assert parse_hub_name("hf.co/acme/x:latest").quant is None
    for bad in ("hf.co/acme", "hf.co/../x", "hf.co/a/b/c", "hf.co/a/b:bad tag", "acme/x"):
        with pytest.raises(InvalidRequestError):
            parse_hub_name(bad)


def test_quant_is_read_from_file_names_and_folders():
    assert quant_of("Qwen2.5-0.5B-Instruct-Q4_K_M.gguf") == "q4_k_m"
    assert quant_of("SmolLM2-135M-Instruct.Q4_1.gguf") == "q4_1"
    assert quant_of("Q8_0/Big-00001-of-00003.gguf") == "q8_0"
    assert quant_of("Llama-3.2-1B-Instruct-IQ4_XS.gguf") == "iq4_xs"
    assert quant_of("gemma-3-270m-it-BF16.gguf") == "bf16"


def test_listing_is_pinned_to_a_commit_and_carries_lfs_sha256(hub: FakeHub):
    hub.listing_pages = 3  # the hub paginates big listings: every page is read
    try:
        listing = list_repo(MULTI)
    finally:
        hub.listing_pages = 1
    assert listing.commit == hub.commit
    assert len(listing.files) == 7
    q4 = listing.files["Tiny-Chat-Q4_K_M.gguf"]
    hosted = hub.repos[MULTI]["Tiny-Chat-Q4_K_M.gguf"]
    assert (q4.sha256, q4.size) == (hosted.sha256, hosted.size)


def test_default_quant_is_q4_k_m_and_an_explicit_one_is_honoured():
    listing = list_repo(MULTI)
    assert [p.path for p in pick_gguf(listing, None).parts] == ["Tiny-Chat-Q4_K_M.gguf"]
    assert [p.path for p in pick_gguf(listing, "Q8_0").parts] == ["Tiny-Chat-Q8_0.gguf"]
    assert [p.path for p in pick_gguf(listing, "f16").parts] == ["Tiny-Chat-f16.gguf"]  # not the mmproj
    with pytest.raises(InvalidRequestError, match="no Q3_K_S GGUF; it has: F16, Q2_K, Q4_K_M, Q5_K_M, Q8_0"):
        pick_gguf(listing, "q3_k_s")


def test_without_a_q4_the_default_is_the_next_best():
    assert pick_gguf(list_repo(ONLY_Q8), None).quant == "q8_0"


def test_split_gguf_takes_every_part_in_order_and_skips_incomplete_splits():
    listing = list_repo(SPLIT)
    choice = pick_gguf(listing, "Q8_0")
    assert [p.path for p in choice.parts] == [f"Q8_0/Big-Q8_0-0000{n}-of-00003.gguf" for n in (1, 2, 3)]
    with pytest.raises(InvalidRequestError, match="no Q6_K"):
        pick_gguf(listing, "q6_k")  # one part of two: not offered
    assert pick_gguf(listing, None).quant == "q4_0"


def test_a_repo_without_gguf_is_a_clear_error():
    with pytest.raises(InvalidRequestError, match=r"hf\.co/acme/tiny-transformers has no GGUF file"):
        pick_gguf(list_repo(NO_GGUF), None)
    with pytest.raises(InvalidRequestError, match="ONNX GenAI folders \\(cpu_and_mobile/cpu-int4\\)"):
        pick_gguf(list_repo(ONNX), None)
    with pytest.raises(DownloadError, match="not found"):
        list_repo("acme/does-not-exist")


def test_onnx_subfolder_resolves_to_its_own_files():
    src = HuggingFaceSource(repo=ONNX, subfolder="cpu_and_mobile/cpu-int4")
    resolved = resolved_source(src)
    assert sorted(f.path for f in resolved.files) == ["genai_config.json", "model.onnx", "tokenizer.json"]
    assert resolved.revision != "main" and resolved.entry is None
    with pytest.raises(DownloadError, match=r"no genai_config\.json"):
        resolved_source(HuggingFaceSource(repo=ONNX, subfolder="cuda/cuda-int4"))


def test_a_name_downloads_registers_and_reads_the_file(tmp_path: Path, hub: FakeHub):
    store, catalog = ModelStore(tmp_path), load_catalog(tmp_path)
    model, fixed = ensure_hub_model(tmp_path, catalog, "hf.co/acme/Tiny-Chat-GGUF")
    assert fixed is None and model.alias == "hf.co/acme/Tiny-Chat-GGUF"
    variant = model.variants[0]
    assert variant.precision == "q4_k_m" and variant.source.revision == hub.commit  # type: ignore[union-attr]
    seen: list[str] = []
    path = ensure_variant(store, catalog, model, variant, progress=lambda p: seen.append(p.stage))
    assert path.name == "Tiny-Chat-Q4_K_M.gguf" and "done" in seen
    # the user catalog now has it, with the file's context length; a fresh process finds it by name
    fresh = load_catalog(tmp_path)
    entry = fresh.model("HF.CO/acme/tiny-chat-gguf")
    assert entry is not None and entry.context_length == 2048 and entry.task == "chat-completion"
    hub.clear_log()
    again, _ = ensure_hub_model(tmp_path, Catalog([]), "hf.co/acme/Tiny-Chat-GGUF")
    assert again.alias == model.alias and hub.log == []  # from the user catalog: no hub request
    # an explicit quant is its own entry
    q8, _ = ensure_hub_model(tmp_path, fresh, "hf.co/acme/tiny-chat-gguf:q8_0")
    assert q8.alias == "hf.co/acme/Tiny-Chat-GGUF:Q8_0" and q8.variants[0].precision == "q8_0"
    saved = json.loads((tmp_path / "catalog.json").read_text())
    assert {m["alias"] for m in saved["models"]} == {
        "hf.co/acme/Tiny-Chat-GGUF", "hf.co/acme/Tiny-Chat-GGUF:Q8_0"}


def test_a_split_model_downloads_every_part(tmp_path: Path):
    store, catalog = ModelStore(tmp_path), load_catalog(tmp_path)
    model, _ = ensure_hub_model(tmp_path, catalog, "hf.co/acme/Big-GGUF:Q8_0")
    path = ensure_variant(store, catalog, model, model.variants[0])
    assert path.name == "Big-Q8_0-00001-of-00003.gguf"  # llama.cpp opens the first, finds the rest
    assert sorted(p.name for p in path.parent.glob("*.gguf")) == [
        f"Big-Q8_0-0000{n}-of-00003.gguf" for n in (1, 2, 3)]
    base, _ = ensure_hub_model(tmp_path, catalog, "hf.co/acme/Big-GGUF")
    ensure_variant(store, catalog, base, base.variants[0])
    assert load_catalog(tmp_path).model("hf.co/acme/Big-GGUF").task == "text-completion"  # type: ignore[union-attr]


def test_gguf_header_reader(tmp_path: Path):
    info = read_gguf_info(write_gguf(tmp_path / "a.gguf", context_length=4096, chat_template="{{ x }}"))
    assert (info.architecture, info.context_length, info.chat_template) == ("llama", 4096, "{{ x }}")
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 16)
    with pytest.raises(ValueError):
        read_gguf_info(tmp_path / "bad.gguf")


def test_shipped_hub_entries_name_a_quant_or_a_folder_never_files():
    for model in read_catalog_file(shipped_catalog_path()).models:
        for variant in model.variants:
            source = variant.source
            if not isinstance(source, HuggingFaceSource):
                continue
            assert source.files == [] and source.entry is None, variant.id
            if variant.format == "gguf":
                assert source.quant and source.quant.lower() == variant.precision, variant.id
                assert len(source.revision) == 40, variant.id  # pinned
            else:
                assert source.subfolder and source.quant is None, variant.id


def test_a_shipped_style_entry_resolves_through_the_listing(tmp_path: Path):
    entry = {
        "alias": "tiny", "display_name": "tiny", "publisher": "acme", "license": "mit",
        "context_length": 1024,
        "variants": [{"name": "tiny-q5", "format": "gguf", "precision": "q5_k_m",
                      "source": {"kind": "huggingface", "repo": MULTI, "quant": "Q5_K_M"}}],
    }
    (tmp_path / "catalog.json").write_text(json.dumps({"schema_version": 1, "models": [entry]}))
    catalog = load_catalog(tmp_path)
    model, variant = catalog.variant("tiny-q5:1")
    path = ensure_variant(ModelStore(tmp_path), catalog, model, variant)
    assert path.name == "Tiny-Chat-Q5_K_M.gguf"


def test_the_first_sdk_shape_takes_names_too(tmp_path: Path):
    from foundry_local_py import FoundryLocalManager
    from foundry_local_py.config import Settings

    manager = FoundryLocalManager(bootstrap=False, settings=Settings(cache_dir=tmp_path))
    info = manager.get_model_info("hf.co/acme/Tiny-Chat-GGUF:Q2_K")
    assert info is not None and info.alias == "hf.co/acme/Tiny-Chat-GGUF:Q2_K"
    assert info.id == "hf-acme-tiny-chat-gguf-q2_k:1"
