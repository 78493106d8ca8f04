"""The manifest that marks a variant folder in the cache as complete.

A variant folder counts as cached only when ``manifest.json`` exists and parses: it is written
last, atomically (temp file + rename), after every file it lists was verified. Downloads and
conversions both write one.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

MANIFEST_NAME = "manifest.json"


class ManifestFile(BaseModel):
    path: str
    size: int
    sha256: str | None = None


class Fidelity(BaseModel):
    """How closely a converted variant follows its source, measured on a fixed text."""

    top1_agreement: float = Field(description="Share of positions whose argmax token matches.")
    perplexity_source: float
    perplexity_converted: float
    perplexity_delta_pct: float
    n_tokens: int
    threshold: float
    degraded: bool
    reference: str = Field(
        default="source", description="What the converted model was compared with."
    )
    runtime_top1_agreement: float | None = Field(
        default=None, description="Top-1 agreement with the source as its own engine (llama.cpp) runs it."
    )


class Manifest(BaseModel):
    schema_version: Literal[1] = 1
    variant_id: str
    alias: str
    kind: Literal["package", "huggingface", "convert", "local"]
    entry: str | None = Field(None, description="File the engine opens, relative; None: the folder.")
    files: list[ManifestFile] = Field(default_factory=list)
    source: dict[str, Any] = Field(default_factory=dict)
    created_at: float = Field(default_factory=time.time)
    tool_versions: dict[str, str] = Field(default_factory=dict)
    fidelity: Fidelity | None = None

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)


def read_manifest(folder: Path) -> Manifest | None:
    """The folder's manifest, or None when the folder is not a complete variant."""
    try:
        return Manifest.model_validate(json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8")))
    except (OSError, ValueError, ValidationError):
        return None


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """Write atomically: readers see the old manifest or the new one, never half of one."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".manifest-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(manifest.model_dump_json(indent=2))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / MANIFEST_NAME)
    finally:
        Path(tmp).unlink(missing_ok=True)


def dumps(manifest: Manifest) -> str:
    return json.dumps(manifest.model_dump(), indent=2)
