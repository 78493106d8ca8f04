"""LoRA adapters in the cache: registered against a base model, validated, landed like a download.

An adapter is a GGUF LoRA file (``general.type = adapter``, ``adapter.type = lora``), llama.cpp's
format. A PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``) is converted first
by :func:`foundry_local_py.finetune.export.peft_to_gguf` (the ``[finetune]`` extra).

Nothing reaches the engine before :func:`check_lora` passed: the file is a readable GGUF LoRA,
its architecture is the base's, every ``lora_a`` / ``lora_b`` pair matches a base tensor's
dimensions (so the layer count and, for token embeddings, the vocabulary too) and the pairs'
ranks agree. A file that is not a LoRA is a 400; one made for another base is a 409 naming
what differs.

Layout: ``<cache>/adapters/<name>/adapter.gguf`` and ``adapter.json`` (the manifest: name, base
alias and variant id, the base file's sha256, the adapter's sha256 and size, architecture,
rank / alpha, target tensors, source, created, and ``extra``: training config, final loss).
A registration is staged in ``<cache>/.staging/adapters/``, under a cross-process file lock,
and installed by one atomic rename; the manifest is written last.

Names: ``[A-Za-z0-9][A-Za-z0-9._-]*`` (at most 64), not all digits (``ALIAS:N`` is a Foundry
version), case-insensitive. A request addresses an adapter as ``BASE_ALIAS:NAME``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..errors import ConflictError, InvalidRequestError, ModelNotFoundError, NotFoundError
from .catalog import Catalog, CatalogModel, Variant, load_catalog
from .gguf_info import read_gguf_header
from .layout import ensure_within, safe_join
from .store import STAGING_DIR, ModelStore, discard_folder, sha256_file

ADAPTERS_DIR = "adapters"
ADAPTER_FILE = "adapter.gguf"
ADAPTER_MANIFEST = "adapter.json"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class AdapterNotFoundError(NotFoundError):
    default_code = "adapter_not_found"


class AdapterRecord(BaseModel):
    """A registered adapter (its manifest, plus where its file is)."""

    model_config = ConfigDict(extra="ignore")

    name: str
    base: str
    """The base model's alias."""
    base_variant: str
    """The base variant id the adapter was checked against (and is served with)."""
    base_sha256: str
    sha256: str
    size: int
    architecture: str
    rank: int
    alpha: float | None = None
    targets: list[str] = Field(default_factory=list)
    """Base tensors the adapter changes (``blk.0.attn_q.weight``, ...)."""
    source: str = "gguf"
    """'gguf' (a GGUF LoRA file), 'peft' (a converted PEFT folder) or 'runtime' (loaded by path)."""
    created: str = ""
    extra: dict[str, Any] = Field(default_factory=dict)
    path: Path = Field(default=Path(), exclude=True)

    @property
    def model_name(self) -> str:
        """How requests name it: ``BASE_ALIAS:NAME``."""
        return f"{self.base}:{self.name}"


@dataclass(frozen=True)
class LoraInfo:
    architecture: str
    alpha: float | None
    rank: int
    pairs: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]
    """Base tensor name -> (lora_a shape, lora_b shape), GGML order."""


def check_name(name: str, *, param: str = "name") -> str:
    """A safe adapter name (400 otherwise); returns it unchanged."""
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name or name.isdigit():
        raise InvalidRequestError(
            "an adapter name must be 1-64 characters of letters, digits, '.', '_' or '-', start "
            "with a letter or digit, contain no '..' and not be a number", param=param)
    return name


def read_lora(path: Path) -> LoraInfo:
    """The LoRA a GGUF file holds (read with the ``gguf`` package's reader); 400 when the file is
    not a readable GGUF LoRA adapter."""
    try:
        from gguf import GGUFReader
    except ImportError as exc:  # a core dependency; only a broken install lacks it
        raise InvalidRequestError("the 'gguf' package is needed to read adapters") from exc
    if not path.is_file():
        raise InvalidRequestError("the adapter is not a file")
    try:  # the header first: fast, and a model file is told apart before its vocabulary is parsed
        kind = read_gguf_header(path).values
    except (OSError, ValueError):
        raise InvalidRequestError(
            "the adapter is not a readable GGUF file (truncated, corrupt or another format)") from None
    if kind.get("general.type") != "adapter" or kind.get("adapter.type") != "lora":
        raise InvalidRequestError(
            "the file is a GGUF model, not a LoRA adapter (general.type must be 'adapter' and "
            f"adapter.type 'lora'; it has {kind.get('general.type')!r} / {kind.get('adapter.type')!r})")
    try:
        reader = GGUFReader(path)
        fields = {name: f.contents() for name, f in reader.fields.items()
                  if name.startswith(("general.", "adapter."))}
        shapes = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}
        # the reader maps tensor data lazily: touch the end of the last one (a truncated file)
        if reader.tensors:
            last = max(reader.tensors, key=lambda t: int(t.data_offset))
            if int(last.data_offset) + int(last.n_bytes) > os.path.getsize(path):
                raise ValueError("truncated")
    except Exception:
        raise InvalidRequestError(
            "the adapter is not a readable GGUF file (truncated, corrupt or another format)") from None
    arch = fields.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise InvalidRequestError("the adapter has no general.architecture")
    alpha = fields.get("adapter.lora.alpha")
    pairs = _pairs(shapes)
    ranks = {a[1] for a, _ in pairs.values()}
    return LoraInfo(arch, float(alpha) if isinstance(alpha, (int, float)) else None,
                    max(ranks), pairs)


def _pairs(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    pairs: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    for name, shape in shapes.items():
        if name.endswith(".lora_a"):
            base = name[: -len(".lora_a")]
            b = shapes.get(base + ".lora_b")
            if b is None:
                raise InvalidRequestError(f"the adapter has {name[:80]} without its lora_b")
            pairs[base] = (shape, b)
        elif name.endswith(".lora_b"):
            if name[: -len(".lora_b")] + ".lora_a" not in shapes:
                raise InvalidRequestError(f"the adapter has {name[:80]} without its lora_a")
        else:
            raise InvalidRequestError(f"the adapter holds a tensor that is not a LoRA pair: {name[:80]}")
    if not pairs:
        raise InvalidRequestError("the adapter holds no lora_a / lora_b tensors")
    for base, (a, b) in pairs.items():
        if len(a) != 2 or len(b) != 2 or a[1] != b[0]:
            raise InvalidRequestError(f"the adapter's {base[:80]} pair is not a LoRA pair (lora_a {list(a)}, "
                                      f"lora_b {list(b)}: lora_a's rank must equal lora_b's)")
    return pairs


def check_lora(info: LoraInfo, base_gguf: Path, base_name: str) -> None:
    """409 naming what differs when the adapter was not made for ``base_gguf``."""
    try:
        header = read_gguf_header(base_gguf)
    except (OSError, ValueError):
        raise ConflictError(f"the base model '{base_name}' file could not be read") from None
    arch = header.values.get("general.architecture")
    if info.architecture != arch:
        raise ConflictError(f"the adapter is for architecture '{info.architecture}', the base model "
                            f"'{base_name}' is '{arch}'")
    n_layer = header.values.get(f"{arch}.block_count")
    for target, (a, b) in sorted(info.pairs.items()):
        m = re.match(r"blk\.(\d+)\.", target)
        if m and isinstance(n_layer, int) and int(m.group(1)) >= n_layer:
            raise ConflictError(f"the adapter changes layer {m.group(1)}; the base model '{base_name}' "
                                f"has {n_layer} layers")
        shape = header.tensors.get(target)
        if shape is None:
            raise ConflictError(f"the adapter changes {target}, which the base model '{base_name}' "
                                "does not have")
        if len(shape) < 2 or a[0] != shape[0] or b[1] != shape[1]:
            what = "vocabulary / embedding" if target.startswith(("token_embd", "output.")) else "dimensions"
            raise ConflictError(
                f"the adapter's {target} does not match the base model '{base_name}' ({what}): "
                f"the base tensor is {list(shape[:2])}, the adapter's lora_a x lora_b give "
                f"{[a[0], b[1]]}")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class AdapterStore:
    """Registered adapters under ``<cache_dir>/adapters``."""

    def __init__(self, cache_dir: Path, catalog: Catalog | None = None) -> None:
        self.root = cache_dir
        self.models = ModelStore(cache_dir)
        self._catalog = catalog

    @property
    def catalog(self) -> Catalog:
        if self._catalog is None:
            self._catalog = load_catalog(self.root)
        return self._catalog

    # --- queries --------------------------------------------------------------------------

    def folder(self, name: str) -> Path:
        return safe_join(self.root, ADAPTERS_DIR, check_name(name).lower())

    def get(self, name: str) -> AdapterRecord:
        """The adapter called ``name`` (case-insensitive); 404 when none is registered."""
        folder = self.folder(name)
        record = self._read(folder)
        if record is None:
            raise AdapterNotFoundError(f"no adapter named '{name}' is registered", param="model")
        return record

    def list(self, base: str | None = None) -> list[AdapterRecord]:
        """Every registered adapter (of ``base``, an alias or variant id, when given), by name."""
        top = self.root / ADAPTERS_DIR
        if not top.is_dir():
            return []
        out: list[AdapterRecord] = []
        for folder in sorted(top.iterdir()):
            record = self._read(folder)
            if record is not None and (base is None or base.lower() in (
                    record.base.lower(), record.base_variant.lower(),
                    record.base_variant.split(":")[0].lower())):
                out.append(record)
        return sorted(out, key=lambda r: r.name.lower())

    def _read(self, folder: Path) -> AdapterRecord | None:
        try:
            data = json.loads((folder / ADAPTER_MANIFEST).read_text(encoding="utf-8"))
            record = AdapterRecord.model_validate(data)
        except (OSError, ValueError):
            return None
        path = folder / ADAPTER_FILE
        if not path.is_file():
            return None
        return record.model_copy(update={"path": path})

    # --- changes --------------------------------------------------------------------------

    def base_file(self, base: str) -> tuple[CatalogModel, Variant, Path]:
        """The cached GGUF variant of ``base`` (an alias or a variant id) adapters attach to."""
        model, fixed = self.catalog.lookup(base)
        candidates = [fixed] if fixed is not None else [v for v in model.variants if v.format == "gguf"]
        for variant in candidates:
            if variant.format != "gguf":
                raise InvalidRequestError(
                    f"LoRA adapters attach to GGUF models (llama.cpp); '{variant.id}' is {variant.format}",
                    param="base")
            if self.models.is_available(model, variant):
                return model, variant, self.models.resolve(model, variant)
        if not candidates:
            raise InvalidRequestError(f"'{model.alias}' has no GGUF variant to attach a LoRA adapter to",
                                      param="base")
        raise ModelNotFoundError(base, param="base", detail=(
            f"Its GGUF variant is not in the cache; run 'foundry-local model download {candidates[0].id}'."))

    def register(self, source: Path, *, base: str, name: str, extra: dict[str, Any] | None = None,
                 replace: bool = True, origin: str | None = None) -> AdapterRecord:
        """Validate ``source`` (a GGUF LoRA file or a PEFT folder) against ``base`` and land it as
        adapter ``name``. 400: bad name or file; 409: made for another base (or, with
        ``replace=False``, the name is taken). ``origin`` overrides the recorded source kind
        ('runtime': loaded through the API)."""
        check_name(name)
        model, variant, base_path = self.base_file(base)
        folder = self.folder(name)
        staging = safe_join(self.root, STAGING_DIR, ADAPTERS_DIR, f"{name.lower()}-{uuid.uuid4().hex[:8]}")
        staging.mkdir(parents=True, exist_ok=False)
        try:
            target = staging / ADAPTER_FILE
            kind = "gguf"
            converted: dict[str, Any] = {}
            if source.is_dir():
                kind = "peft"
                converted = _convert_peft(source, target, base_path)
            elif source.is_file():
                shutil.copyfile(source, target)
            else:
                raise InvalidRequestError("the adapter source is neither a file nor a folder")
            info = read_lora(target)
            check_lora(info, base_path, model.alias)
            record = AdapterRecord(
                name=name, base=model.alias, base_variant=variant.id,
                base_sha256=self._base_sha256(model, variant, base_path),
                sha256=sha256_file(target), size=target.stat().st_size,
                architecture=info.architecture, rank=info.rank, alpha=info.alpha,
                targets=sorted(info.pairs), source=origin or kind, created=_now(),
                extra={**({"export": converted} if converted else {}), **(extra or {})},
            )
            (staging / ADAPTER_MANIFEST).write_text(record.model_dump_json(indent=2), encoding="utf-8")
            with self.models.lock(f"adapter-{name.lower()}"):
                if not replace and self._read(folder) is not None:
                    raise ConflictError(f"an adapter named '{name}' is already registered")
                folder.parent.mkdir(parents=True, exist_ok=True)
                ensure_within(self.root, folder.parent)
                if folder.exists() or folder.is_symlink():
                    discard_folder(self.models, folder)
                os.replace(staging, folder)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        return record.model_copy(update={"path": folder / ADAPTER_FILE})

    def remove(self, name: str) -> AdapterRecord:
        """Delete adapter ``name``; 404 when it is not registered."""
        record = self.get(name)
        with self.models.lock(f"adapter-{name.lower()}"):
            discard_folder(self.models, self.folder(name))
        return record

    def _base_sha256(self, model: CatalogModel, variant: Variant, path: Path) -> str:
        known = getattr(variant.source, "sha256", None)
        if isinstance(known, str) and known:
            return known
        manifest = self.models.manifest(model, variant)
        if manifest is not None:
            for f in manifest.files:
                if f.sha256 and (path.name == Path(f.path).name):
                    return f.sha256
        return sha256_file(path)


def _convert_peft(source: Path, target: Path, base_gguf: Path) -> dict[str, Any]:
    try:
        from ..finetune.export import peft_to_gguf  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raise InvalidRequestError(
            "registering a PEFT folder converts it to GGUF, which needs the [finetune] extra: "
            "pip install 'foundry-local-py[finetune]' (or register a GGUF LoRA file)") from None
    result = peft_to_gguf(source, target, base_gguf=base_gguf)
    return dict(result) if isinstance(result, dict) else {}


def describe(records: Iterable[AdapterRecord]) -> list[dict[str, Any]]:
    """JSON-ready summaries (the CLI's list)."""
    return [{"name": r.name, "model": r.model_name, "base_variant": r.base_variant, "rank": r.rank,
             "alpha": r.alpha, "size": r.size, "source": r.source, "created": r.created} for r in records]
