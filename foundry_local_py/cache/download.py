"""Download a Hugging Face catalog variant into the cache: resumable, verified, atomic.

How this uses huggingface-hub (2.x), and why not ``hf_hub_download``:
``hf_hub_download`` writes each file to a *process-unique* temporary name and deletes it when the
call fails (``_download_to_tmp_and_move``), so a download interrupted by a crash, a kill or a
network failure that outlasts its in-call retries starts again from byte 0 in the next process.
We keep huggingface-hub for everything protocol-shaped -- ``hf_hub_url`` and
``get_hf_file_metadata`` (HEAD on ``/resolve``: ``X-Repo-Commit``, ``X-Linked-Etag``,
``X-Linked-Size``, redirects, ``HF_TOKEN`` through ``build_hf_headers``, ``HF_ENDPOINT``) and
``file_download.http_get`` (streaming GET with ``Range`` resume, in-call retries on dropped
connections, recovery when a server ignores ``Range``) -- and own the files:

- partial data lives at ``<root>/.staging/<publisher>/<variant>/<file>.incomplete`` next to a
  sidecar recording the remote ETag, so any later process resumes it with ``Range`` (a changed
  ETag discards it);
- each finished file is checked against the catalog's sha256, else the hub's LFS sha256
  (``X-Linked-Etag``), else the git blob sha1 (the ETag of non-LFS files); a mismatch deletes it;
- when every file is verified the staging folder is renamed into place and ``manifest.json`` is
  written last: a variant without a manifest is never "cached";
- the whole operation holds a cross-process lock (``ModelStore.download_lock``), so two processes
  pulling the same variant end with one copy: the second waits, then finds it complete.

Offline (``HF_HUB_OFFLINE``): a cached variant resolves without any request; anything else
fails fast with a clear message. Xet storage is not used: files come over plain HTTP (the
fallback huggingface-hub itself uses without ``hf_xet``), which is what makes resume possible.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ..errors import (
    DownloadError,
    FoundryError,
    InsufficientDiskSpaceError,
    IntegrityError,
    InvalidRequestError,
    ModelNotFoundError,
)
from .catalog import CatalogModel, HubFile, HuggingFaceSource, Variant
from .layout import ensure_within, safe_join
from .manifest import MANIFEST_NAME, Manifest, ManifestFile, read_manifest, write_manifest
from .progress import Progress, ProgressCallback
from .store import HASH_CHUNK, ModelStore, discard_folder

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SHA1 = re.compile(r"^[0-9a-f]{40}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
INCOMPLETE_SUFFIX = ".incomplete"
SIDECAR_SUFFIX = ".incomplete.json"
DISK_RESERVE_BYTES = 64 * 1024 * 1024
"""Free space kept beyond the model's size, so a download never fills the disk to the last byte."""


# --- environment ----------------------------------------------------------------------------


def hub_endpoint() -> str:
    """``HF_ENDPOINT`` read now (huggingface-hub reads it once, at import)."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def offline_mode() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``), read now as well as at import."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.is_offline_mode() or env.strip().upper() in {"1", "ON", "YES", "TRUE"}


# --- metadata -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteFile:
    """One file to fetch, with what the hub said about it."""

    local: str
    """Path inside the variant folder (the catalog's ``HubFile.path``)."""
    url: str
    headers: dict[str, str]
    etag: str
    commit: str | None
    size: int | None
    sha256: str | None
    """Expected sha256: the catalog's, else the hub's LFS sha256 (``X-Linked-Etag``)."""
    git_sha1: str | None
    """Expected git blob sha1 for small non-LFS files (their ETag), when no sha256 is known."""


def _remote_file(
    source: HuggingFaceSource, file: HubFile, revision: str, endpoint: str, catalog_id: str, *,
    token: str | None = None,
) -> RemoteFile:
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    url = hf_hub_url(source.repo, source.repo_path(file), revision=revision, endpoint=endpoint)
    # The caller's token, else HF_TOKEN / the stored one when there is one.
    headers = build_hf_headers(token=token) if token else build_hf_headers()
    with _hub_errors(source, file.path):
        meta = get_hf_file_metadata(url, headers=headers, endpoint=endpoint)
    if meta.etag is None:
        raise DownloadError(f"the hub sent no ETag for '{file.path}' of {source.repo}")
    etag = meta.etag.lower()
    size = meta.size
    if file.size is not None and size is not None and file.size != size:
        raise IntegrityError(
            f"'{file.path}' of {source.repo} is {size} bytes on the hub but {file.size} in the catalog;"
            f" the catalog entry for '{catalog_id}' is out of date"
        )
    lfs_sha = etag if _SHA256.match(etag) else None
    if file.sha256 is not None and lfs_sha is not None and file.sha256 != lfs_sha:
        raise IntegrityError(
            f"'{file.path}' of {source.repo} has a different sha256 on the hub than in the catalog;"
            f" the catalog entry for '{catalog_id}' is out of date"
        )
    location = meta.location or url
    get_headers = dict(headers)
    if urlparse(location).netloc != urlparse(url).netloc:
        get_headers.pop("authorization", None)  # never send the token to a CDN
    return RemoteFile(
        local=file.path,
        url=location,
        headers=get_headers,
        etag=etag,
        commit=meta.commit_hash,
        size=size if size is not None else file.size,
        sha256=file.sha256 or lfs_sha,
        git_sha1=etag if (file.sha256 is None and lfs_sha is None and _SHA1.match(etag)) else None,
    )


@contextmanager
def _hub_errors(source: HuggingFaceSource, name: str) -> Iterator[None]:
    """Map huggingface-hub / network errors to ours, with messages fit for a client."""
    import httpx2
    from huggingface_hub import errors as hf

    where = f"'{name}' of {source.repo}@{source.revision}"
    try:
        yield
    except FoundryError:
        raise
    except hf.GatedRepoError as exc:
        raise DownloadError(
            f"{source.repo} is gated: accept its license on the hub and set HF_TOKEN"
        ) from exc
    except hf.RepositoryNotFoundError as exc:
        raise DownloadError(
            f"the repository {source.repo} was not found (or is private: set HF_TOKEN)"
        ) from exc
    except hf.RevisionNotFoundError as exc:
        raise DownloadError(f"revision '{source.revision}' of {source.repo} was not found") from exc
    except hf.RemoteEntryNotFoundError as exc:
        raise DownloadError(f"{where} was not found on the hub") from exc
    except hf.OfflineModeIsEnabled as exc:
        raise DownloadError("offline mode is on (HF_HUB_OFFLINE); cannot download") from exc
    except hf.HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise DownloadError(f"the hub answered HTTP {status} for {where}; try again later") from exc
    except (httpx2.HTTPError, OSError) as exc:
        raise DownloadError(
            f"downloading {where} failed ({type(exc).__name__}); run the download again to resume"
        ) from exc


# --- progress -------------------------------------------------------------------------------


class _Reporter:
    """Turns byte counts into :class:`Progress` reports for the whole variant."""

    def __init__(self, variant_id: str, callback: ProgressCallback | None) -> None:
        self.variant_id = variant_id
        self.callback = callback
        self.total: int | None = None
        self.finished = 0  # bytes of files already complete
        self.current = 0  # bytes of the file in flight
        self.file = ""

    def emit(self, stage: str, message: str = "", new_bytes: int = 0) -> None:
        if self.callback is not None:
            self.callback(
                Progress(
                    variant_id=self.variant_id,
                    stage=stage,
                    done_bytes=self.finished + self.current,
                    total_bytes=self.total,
                    message=message or self.file,
                    new_bytes=new_bytes,
                )
            )


class _ProgressFile:
    """The file object handed to ``http_get``: writes through and reports every chunk.

    ``http_get`` may ``seek``/``truncate`` (a server that ignored ``Range``), so the reported
    position is the file's real position, never a running sum.
    """

    def __init__(self, f: Any, reporter: _Reporter) -> None:
        self._f = f
        self._reporter = reporter

    def write(self, data: bytes) -> int:
        n: int = self._f.write(data)
        self._reporter.current = self._f.tell()
        self._reporter.emit("download", new_bytes=n)
        return n

    def tell(self) -> int:
        return int(self._f.tell())

    def seek(self, offset: int, whence: int = 0) -> int:
        return int(self._f.seek(offset, whence))

    def truncate(self, size: int | None = None) -> int:
        result = int(self._f.truncate(size))
        self._reporter.current = self._f.tell()
        return result

    def flush(self) -> None:
        self._f.flush()


# --- the download ---------------------------------------------------------------------------


def download_variant(
    store: ModelStore,
    model: CatalogModel,
    variant: Variant,
    *,
    progress: ProgressCallback | None = None,
    force: bool = False,
    token: str | None = None,
) -> Path:
    """Fetch a Hugging Face variant into the cache and return the path an engine opens.

    Returns at once when the variant is already cached (unless ``force``). Raises
    :class:`DownloadError` (network, hub, offline), :class:`IntegrityError` (sha256 or size
    mismatch; the bad file is deleted), :class:`InsufficientDiskSpaceError`, or
    :class:`UnsafePathError`. Interrupted downloads resume from their partial files.

    ``progress`` is called in this thread for every chunk written (``stage`` 'wait', 'download',
    'verify', 'done'); an exception it raises aborts the download and propagates unchanged,
    keeping the partial data for a later resume -- that is how a caller cancels. Blocking: run
    it in a worker thread from async code.
    """
    source = variant.source
    if not isinstance(source, HuggingFaceSource):
        raise InvalidRequestError(f"'{variant.id}' is not downloaded from Hugging Face")
    folder = store.variant_dir(model, variant)
    reporter = _Reporter(variant.id, progress)

    if not force and is_cached(store, model, variant):
        return _done(store, model, variant, reporter)
    if offline_mode():
        raise DownloadError(f"'{variant.id}' is not in the cache and offline mode is on (HF_HUB_OFFLINE)")

    with _variant_lock(store, variant, reporter):
        if not force and is_cached(store, model, variant):
            return _done(store, model, variant, reporter)  # another process finished it
        staging = store.staging_dir(model, variant)
        if force and staging.exists():
            shutil.rmtree(staging)
        _adopt_unfinished(store, folder, staging, force=force)
        staging.mkdir(parents=True, exist_ok=True)
        ensure_within(store.root, staging)

        from .hub import resolved_source

        # A catalog entry with a quant or subfolder names no files: list the repo (at its
        # revision, pinned to a commit) and take the GGUF or the folder's files from it.
        source = resolved_source(source, token=token)
        endpoint = hub_endpoint()
        remote: list[RemoteFile] = []
        revision = source.revision
        for file in source.files:
            rf = _remote_file(source, file, revision, endpoint, variant.id, token=token)
            if rf.commit and _COMMIT.match(rf.commit) and not _COMMIT.match(revision):
                revision = rf.commit  # every further file from the same commit
            remote.append(rf)
        sizes = [rf.size for rf in remote]
        reporter.total = sum(s for s in sizes if s is not None) if None not in sizes else None
        _check_disk_space(store.root, staging, remote)

        manifest_files = [_fetch(rf, staging, source, reporter) for rf in remote]
        _install(store, staging, folder)
        write_manifest(
            folder,
            Manifest(
                variant_id=variant.id,
                alias=model.alias,
                kind="huggingface",
                entry=source.entry,
                files=manifest_files,
                source={
                    "repo": source.repo,
                    "revision": source.revision,
                    "subfolder": source.subfolder,
                    "commit": remote[0].commit if remote else None,
                },
                tool_versions={"huggingface_hub": _hf_version()},
            ),
        )
        return _done(store, model, variant, reporter)


def is_cached(store: ModelStore, model: CatalogModel, variant: Variant) -> bool:
    """Complete in the cache: a manifest, and every file it lists present with its size."""
    try:
        store.resolve(model, variant)
    except ModelNotFoundError:
        return False
    return True


def _done(store: ModelStore, model: CatalogModel, variant: Variant, reporter: _Reporter) -> Path:
    path = store.resolve(model, variant)
    manifest = store.manifest(model, variant)
    if manifest is not None:
        reporter.total = manifest.total_size
        reporter.finished, reporter.current = manifest.total_size, 0
    reporter.emit("done", message="complete")
    return path


@contextmanager
def _variant_lock(store: ModelStore, variant: Variant, reporter: _Reporter) -> Iterator[None]:
    from filelock import Timeout

    lock = store.download_lock(variant)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        reporter.emit("wait", message="waiting for another download of this model to finish")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _adopt_unfinished(store: ModelStore, folder: Path, staging: Path, *, force: bool) -> None:
    """Turn a variant folder that is not a usable copy into staging data.

    That is a folder without a manifest (interrupted between install and manifest) or one whose
    files no longer match it. Its files are re-verified against the hub before reuse. A complete
    copy being re-downloaded (``force``) stays in place until the new one is installed.
    """
    if not folder.exists() and not folder.is_symlink():
        return
    ensure_within(store.root, folder)
    if force and read_manifest(folder) is not None:
        return
    (folder / MANIFEST_NAME).unlink(missing_ok=True)  # uncached from here on
    if not staging.exists():
        staging.parent.mkdir(parents=True, exist_ok=True)
        os.replace(folder, staging)
    else:
        discard_folder(store, folder)


def _check_disk_space(root: Path, staging: Path, remote: list[RemoteFile]) -> None:
    needed = 0
    for rf in remote:
        if rf.size is None:
            continue
        target = safe_join(staging, rf.local)
        partial = _partial_path(target)
        have = (
            target.stat().st_size
            if target.is_file()
            else (partial.stat().st_size if partial.is_file() else 0)
        )
        needed += max(rf.size - have, 0)
    if needed == 0:
        return
    free = shutil.disk_usage(root).free
    if free < needed + DISK_RESERVE_BYTES:
        raise InsufficientDiskSpaceError(
            f"not enough disk space for this model: {_mib(needed)} MiB needed"
            f" (plus {_mib(DISK_RESERVE_BYTES)} MiB reserve), {_mib(free)} MiB free"
        )


def _partial_path(target: Path) -> Path:
    return target.with_name(target.name + INCOMPLETE_SUFFIX)


def _sidecar_path(target: Path) -> Path:
    return target.with_name(target.name + SIDECAR_SUFFIX)


def _fetch(rf: RemoteFile, staging: Path, source: HuggingFaceSource, reporter: _Reporter) -> ManifestFile:
    """Bring one file into ``staging`` (resuming a partial one), verified, and describe it."""
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import silent_tqdm

    target = safe_join(staging, rf.local)
    partial, sidecar = _partial_path(target), _sidecar_path(target)
    reporter.file, reporter.current = rf.local, 0

    if target.is_file() and not target.is_symlink():
        # Finished in an earlier run (or adopted): trust it only after re-checking.
        reporter.emit("verify")
        digest = _check(target, rf)
        if digest is not None:
            reporter.finished += target.stat().st_size
            return ManifestFile(path=rf.local, size=target.stat().st_size, sha256=digest)
        target.unlink()

    target.parent.mkdir(parents=True, exist_ok=True)
    ensure_within(staging, target.parent)
    if partial.is_symlink() or sidecar.is_symlink():
        raise IntegrityError("a partial download file was replaced by a link; remove the cache folder")
    if partial.exists() and (
        _read_sidecar(sidecar).get("etag") != rf.etag
        or (rf.size is not None and partial.stat().st_size > rf.size)
    ):
        partial.unlink()  # another version of the file (or garbage): start over
    sidecar.write_text(json.dumps({"etag": rf.etag, "size": rf.size}), encoding="utf-8")

    resume = partial.stat().st_size if partial.exists() else 0
    reporter.current = resume
    reporter.emit("download")
    with partial.open("r+b" if resume else "wb") as f:
        f.seek(resume)
        writer = _ProgressFile(f, reporter)
        try:
            with _hub_errors(source, rf.local):
                http_get(
                    rf.url,
                    writer,  # type: ignore[arg-type]
                    resume_size=resume,
                    headers=rf.headers,
                    expected_size=rf.size,
                    displayed_filename=rf.local,
                    tqdm_class=silent_tqdm,
                )
        finally:
            f.flush()
            os.fsync(f.fileno())
            if rf.size is not None and f.tell() > rf.size:
                f.truncate(0)  # more bytes than the file has: nothing here is reusable

    reporter.emit("verify")
    digest = _check(partial, rf)
    if digest is None:
        partial.unlink(missing_ok=True)
        sidecar.unlink(missing_ok=True)
        raise IntegrityError(
            f"'{rf.local}' of {source.repo} failed its integrity check (sha256/size mismatch);"
            " the corrupt file was deleted, run the download again"
        )
    size = partial.stat().st_size
    os.replace(partial, target)
    sidecar.unlink(missing_ok=True)
    reporter.finished += size
    reporter.current = 0
    return ManifestFile(path=rf.local, size=size, sha256=digest)


def _check(path: Path, rf: RemoteFile) -> str | None:
    """The file's sha256 when it matches everything known about it, else None."""
    size = path.stat().st_size
    if rf.size is not None and size != rf.size:
        return None
    sha256 = hashlib.sha256()
    sha1 = hashlib.sha1(f"blob {size}\0".encode(), usedforsecurity=False) if rf.git_sha1 else None
    with path.open("rb") as f:
        while block := f.read(HASH_CHUNK):
            sha256.update(block)
            if sha1 is not None:
                sha1.update(block)
    digest = sha256.hexdigest()
    if rf.sha256 is not None and digest != rf.sha256:
        return None
    if sha1 is not None and sha1.hexdigest() != rf.git_sha1:
        return None
    return digest


def _read_sidecar(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _install(store: ModelStore, staging: Path, folder: Path) -> None:
    """Move the verified staging folder into place (atomic rename); the manifest comes after."""
    for leftover in staging.rglob(f"*{SIDECAR_SUFFIX}"):
        leftover.unlink()
    folder.parent.mkdir(parents=True, exist_ok=True)
    ensure_within(store.root, folder.parent)
    if folder.exists() or folder.is_symlink():
        discard_folder(store, folder)  # the old complete copy (force) goes only now
    os.replace(staging, folder)


def _mib(n: int) -> int:
    return (n + (1 << 20) - 1) >> 20


def _hf_version() -> str:
    from huggingface_hub import __version__

    return str(__version__)
