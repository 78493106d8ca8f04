"""Python SDK: ``FoundryLocalManager`` (Foundry Local's surface) and the service helpers."""

from .manager import FoundryLocalManager, FoundryModelInfo

__all__ = ["FoundryLocalManager", "FoundryModelInfo"]
