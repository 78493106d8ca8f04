"""``FoundryLocalManager``: Foundry Local's Python SDK surface, on this project's service.

    from foundry_local_py import FoundryLocalManager
    import openai

    manager = FoundryLocalManager("smollm2-135m")      # starts the service, downloads, loads
    client = openai.OpenAI(base_url=manager.endpoint, api_key=manager.api_key)
    client.chat.completions.create(model=manager.get_model_info("smollm2-135m").id, ...)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..cache.catalog import CatalogModel, Variant, load_catalog
from ..cache.hub import ensure_hub_model
from ..cache.store import ModelStore
from ..config import Settings
from ..errors import ModelNotFoundError, ServiceUnavailableError
from ..hardware import choose_for_cache, detect_hardware
from .client import ServiceClient
from .service import find_service, start_service


@dataclass(frozen=True)
class FoundryModelInfo:
    """A catalog model as the SDK returns it: ``id`` is the variant this machine uses."""

    alias: str
    id: str
    version: int
    runtime: str
    """Device: 'CPU', 'GPU' or 'NPU'."""
    execution_provider: str
    file_size_mb: int
    supports_tool_calling: bool
    license: str
    task: str
    publisher: str

    @classmethod
    def of(cls, model: CatalogModel, variant: Variant) -> FoundryModelInfo:
        return cls(
            alias=model.alias, id=variant.id, version=variant.version, runtime=variant.device.upper(),
            execution_provider=variant.execution_provider,
            file_size_mb=round((variant.size_bytes or 0) / 2**20),
            supports_tool_calling=model.supports_tool_calling, license=model.license,
            task=model.task, publisher=model.publisher,
        )


class FoundryLocalManager:
    def __init__(
        self,
        alias_or_model_id: str | None = None,
        device: str | None = None,
        bootstrap: bool = True,
        timeout: float | None = None,
        settings: Settings | None = None,
    ) -> None:
        self.settings = settings or Settings()
        if device is not None:
            self.settings = self.settings.model_copy(update={"device": device})
        self.timeout = timeout
        self._client: ServiceClient | None = None
        if bootstrap:
            self.start_service()
            if alias_or_model_id is not None:
                self.download_model(alias_or_model_id)
                self.load_model(alias_or_model_id)

    # --- service ------------------------------------------------------------------------

    @property
    def service_uri(self) -> str:
        info = find_service(self.settings)
        if info is None:
            raise ServiceUnavailableError("the service is not running; call start_service()")
        return info.base_url

    @property
    def endpoint(self) -> str:
        return self.service_uri + "/v1"

    @property
    def api_key(self) -> str:
        return self.settings.api_key_value() or "OPENAI_API_KEY"

    def is_service_running(self) -> bool:
        return find_service(self.settings) is not None

    def start_service(self) -> None:
        info = start_service(self.settings, timeout=self.timeout or 120.0)
        self._client = ServiceClient(info.base_url, api_key=self.settings.api_key_value(),
                                     timeout=self.timeout)

    @property
    def client(self) -> ServiceClient:
        if self._client is None:
            self._client = ServiceClient(self.service_uri, api_key=self.settings.api_key_value(),
                                         timeout=self.timeout)
        return self._client

    # --- catalog and cache --------------------------------------------------------------

    def _catalog_and_store(self) -> tuple[Any, ModelStore]:
        return load_catalog(self.settings.cache_dir, self.settings.catalog_path), ModelStore(
            self.settings.cache_dir)

    def _choose(self, model: CatalogModel, store: ModelStore) -> Variant:
        return choose_for_cache(model, detect_hardware(), store, device=self.settings.device,
                                ep=self.settings.ep).require()

    def list_catalog_models(self) -> list[FoundryModelInfo]:
        catalog, store = self._catalog_and_store()
        out = []
        for model in catalog.models:
            try:
                out.append(FoundryModelInfo.of(model, self._choose(model, store)))
            except ModelNotFoundError:
                continue
        return out

    def refresh_catalog(self) -> None:
        """The catalog is read from disk on every call; nothing is cached to refresh."""

    def get_model_info(self, alias_or_model_id: str, raise_on_not_found: bool = False
                       ) -> FoundryModelInfo | None:
        catalog, store = self._catalog_and_store()
        try:
            # hf.co/<owner>/<repo>[:<quant>] names resolve on the hub (then from the user catalog)
            model, fixed = ensure_hub_model(store.root, catalog, alias_or_model_id)
            return FoundryModelInfo.of(model, fixed or self._choose(model, store))
        except ModelNotFoundError:
            if raise_on_not_found:
                raise
            return None

    def get_cache_location(self) -> str:
        return str(self.settings.cache_dir)

    def list_cached_models(self) -> list[FoundryModelInfo]:
        catalog, store = self._catalog_and_store()
        return [FoundryModelInfo.of(m, v) for m in catalog.models for v in m.variants
                if store.is_available(m, v)]

    def download_model(self, alias_or_model_id: str, token: str | None = None, force: bool = False
                       ) -> FoundryModelInfo:
        info = self.get_model_info(alias_or_model_id, raise_on_not_found=True)
        assert info is not None
        self.client.download(alias_or_model_id, force=force, token=token)
        return info

    def is_model_upgradeable(self, alias_or_model_id: str) -> bool:
        """True when the catalog's choice for this alias is newer than every cached variant."""
        catalog, store = self._catalog_and_store()
        model, _ = catalog.lookup(alias_or_model_id)
        best = max(model.variants, key=lambda v: v.version)
        cached = [v for v in model.variants if store.is_available(model, v)]
        return not cached or max(v.version for v in cached) < best.version

    def upgrade_model(self, alias_or_model_id: str, token: str | None = None) -> FoundryModelInfo:
        return self.download_model(alias_or_model_id, token=token)

    # --- loaded models ------------------------------------------------------------------

    def load_model(self, alias_or_model_id: str, ttl: int = 600) -> FoundryModelInfo:
        result = self.client.load(alias_or_model_id, ttl=ttl)
        catalog, _ = self._catalog_and_store()
        model, variant = catalog.variant(str(result["name"]))
        return FoundryModelInfo.of(model, variant)

    def unload_model(self, alias_or_model_id: str, force: bool = False) -> None:
        self.client.unload(alias_or_model_id, force=force)

    def list_loaded_models(self) -> list[FoundryModelInfo]:
        catalog, _ = self._catalog_and_store()
        out = []
        for entry in self.client.loaded_models():
            model, variant = catalog.variant(entry["name"])
            out.append(FoundryModelInfo.of(model, variant))
        return out
