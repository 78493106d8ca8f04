"""Foundry Local's current Python SDK shape (``foundry-local-sdk`` 1.x), running in-process.

Code written for Foundry Local runs with one changed import::

    from foundry_local_sdk import Configuration, FoundryLocalManager      # Foundry Local
    from foundry_local_py.sdk.v1 import Configuration, FoundryLocalManager  # here

Inference runs in the calling process (the server's scheduler and engines, with continuous
batching: threads chatting at once share a batch); ``start_web_service()`` serves the full HTTP
API from the same process. The first SDK shape (a manager that starts a background service) is
``foundry_local_py.FoundryLocalManager``; both can be used in one process.
"""

from .catalog import Catalog
from .configuration import Configuration, LogLevel
from .exception import FoundryLocalException
from .manager import EpDownloadResult, EpInfo, FoundryLocalManager
from .model import Model, ModelInfo, ModelVariant

__all__ = [
    "Catalog",
    "Configuration",
    "EpDownloadResult",
    "EpInfo",
    "FoundryLocalException",
    "FoundryLocalManager",
    "LogLevel",
    "Model",
    "ModelInfo",
    "ModelVariant",
]
