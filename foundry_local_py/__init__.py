"""foundry-local-py: a private, local, OpenAI-compatible inference server for small models."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["FoundryLocalManager", "__version__"]

if TYPE_CHECKING:
    from .sdk import FoundryLocalManager


def __getattr__(name: str) -> Any:
    # Lazy: importing the package for the server or CLI must not pull in the SDK's imports.
    if name == "FoundryLocalManager":
        from .sdk import FoundryLocalManager

        return FoundryLocalManager
    raise AttributeError(name)
