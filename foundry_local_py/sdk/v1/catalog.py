"""``manager.catalog``: the models this runtime knows (shipped, user-registered, hub names)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...cache.catalog import CatalogModel, Variant
from ...cache.hub import ensure_hub_model, is_hub_name
from ...errors import FoundryError, ModelNotFoundError
from .exception import FoundryLocalException
from .model import Model, ModelVariant

if TYPE_CHECKING:
    from .manager import FoundryLocalManager


class Catalog:
    def __init__(self, manager: FoundryLocalManager) -> None:
        self._manager = manager
        self.name = "foundry-local-py"
        self._models: dict[str, Model] = {}

    def _model(self, entry: CatalogModel) -> Model:
        """One :class:`Model` per alias for the runtime's life (a selection sticks)."""
        key = entry.alias.lower()
        held = self._models.get(key)
        if held is None or held._model is not entry:
            held = Model(self._manager, entry, self._default_variant(entry))
            self._models[key] = held
        return held

    def _default_variant(self, entry: CatalogModel) -> Variant:
        from ...cache.inventory import fallback_variant
        from ...hardware import choose_for_cache

        m = self._manager
        s = m._settings
        choice = choose_for_cache(entry, m._core.inventory, m._store, device=s.device, ep=s.ep)
        return choice.variant or fallback_variant(m._store, entry)

    def list_models(self) -> list[Model]:
        return [self._model(entry) for entry in self._manager._catalog.models]

    def get_model(self, model_alias: str) -> Model | None:
        """The model for an alias, or ``hf.co/<owner>/<repo>[:<quant>]`` (resolved on the hub and
        added to the user catalog); None when unknown."""
        if not model_alias or not model_alias.strip():
            return None
        m = self._manager
        try:
            if is_hub_name(model_alias):
                entry, _ = ensure_hub_model(m._store.root, m._catalog, model_alias)
            else:
                found = m._catalog.model(model_alias)
                if found is None:
                    return None
                entry = found
        except ModelNotFoundError:
            return None
        except FoundryError as exc:
            raise FoundryLocalException(exc.message) from exc
        return self._model(entry)

    def get_model_variant(self, model_id: str) -> ModelVariant | None:
        if not model_id or not model_id.strip():
            return None
        try:
            entry, variant = self._manager._catalog.variant(model_id)
        except ModelNotFoundError:
            return None
        return next(v for v in self._model(entry).variants if v.id == variant.id)

    def get_latest_version(self, model_or_model_variant: Model | ModelVariant) -> Model | ModelVariant:
        """Every variant has one version here: the model itself."""
        return model_or_model_variant

    def get_cached_models(self) -> list[ModelVariant]:
        m = self._manager
        return [v for entry in m._catalog.models for v in self._model(entry).variants
                if m._store.is_available(entry, v._variant)]

    def get_loaded_models(self) -> list[ModelVariant]:
        loaded = [lm.id for lm in self._manager._core.manager.loaded()]
        found = (self.get_model_variant(i) for i in loaded)
        return [v for v in found if v is not None]
