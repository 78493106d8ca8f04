"""``FoundryLocalManager`` of the 1.x surface: a singleton owning the in-process runtime.

    from foundry_local_py.sdk.v1 import Configuration, FoundryLocalManager

    FoundryLocalManager.initialize(Configuration(app_name="my_app"))
    manager = FoundryLocalManager.instance
    model = manager.catalog.get_model("smollm2-135m")
    model.download(lambda pct: print(f"{pct:.1f}%")); model.load()
    print(model.get_chat_client().complete_chat([{"role": "user", "content": "Hi"}]))
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from ...cache.catalog import Catalog as CacheCatalog
from ...cache.store import ModelStore
from ...config import Settings
from .catalog import Catalog
from .configuration import Configuration
from .exception import FoundryLocalException
from .runtime import Runtime

# Execution providers as Foundry Local names them, and the pip extra that brings each here.
_EP_EXTRAS = {
    "CPUExecutionProvider": None,
    "CUDAExecutionProvider": "cuda",
    "DmlExecutionProvider": None,
    "QNNExecutionProvider": None,
    "OpenVINOExecutionProvider": None,
    "WebGpuExecutionProvider": None,
}


@dataclass(frozen=True)
class EpInfo:
    name: str
    is_registered: bool


@dataclass(frozen=True)
class EpDownloadResult:
    success: bool
    status: str
    registered_eps: list[str] = field(default_factory=list)
    failed_eps: list[str] = field(default_factory=list)
    messages: dict[str, str] = field(default_factory=dict)
    """Why each failed provider is unavailable (what to install)."""


class FoundryLocalManager:
    """Call :meth:`initialize` once, then use :attr:`instance`."""

    _lock: ClassVar[threading.Lock] = threading.Lock()
    instance: ClassVar[FoundryLocalManager | None] = None

    @staticmethod
    def initialize(config: Configuration) -> None:
        FoundryLocalManager(config)

    def __init__(self, config: Configuration) -> None:
        with FoundryLocalManager._lock:
            if FoundryLocalManager.instance is not None:
                raise FoundryLocalException(
                    "FoundryLocalManager is a singleton and has already been initialized."
                )
            config.validate()
            self.config = config
            self._settings: Settings = config.to_settings()
            self._runtime = Runtime(self._settings)
            self._core = self._runtime.core
            self._catalog: CacheCatalog = self._core.catalog
            self._store: ModelStore = self._core.store
            self.catalog = Catalog(self)
            self.urls: list[str] | None = None
            FoundryLocalManager.instance = self

    # --- execution providers ------------------------------------------------------------------

    def discover_eps(self) -> list[EpInfo]:
        """The execution providers Foundry Local knows, and whether this install can use each.

        There is nothing to download here: providers come with pip packages (the ``[cuda]``
        extra brings CUDA), and llama.cpp's GPU offload comes with its build."""
        available = self._available_eps()
        return [EpInfo(name, name in available) for name in _EP_EXTRAS]

    def _available_eps(self) -> set[str]:
        inv = self._core.inventory
        # Azure's provider is a remote-call shim, not a device: Foundry Local does not list it.
        found = {"CPUExecutionProvider", *inv.onnxruntime.providers} - {"AzureExecutionProvider"}
        if inv.llama_cpp.gpu_offload and inv.nvidia_gpus:
            found.add("CUDAExecutionProvider")
        return found

    def download_and_register_eps(
        self,
        names: list[str] | None = None,
        progress_callback: Callable[[str, float], None] | None = None,
        cancel_event: threading.Event | None = None,
    ) -> EpDownloadResult:
        """Foundry Local downloads provider plug-ins here. This project's providers come with pip
        packages, so the equivalent is to re-detect what the installed packages and hardware
        provide: each provider asked for (default: every one available) is reported through
        ``progress_callback(name, percent)`` at 0 and 100 when usable; the others are listed in
        ``failed_eps`` with what to install."""
        from ...hardware import detect_hardware

        self._core.inventory = detect_hardware()
        self._core.manager.inventory = self._core.inventory
        available = self._available_eps()
        wanted = list(names) if names else (
            [n for n in _EP_EXTRAS if n in available] + sorted(available - set(_EP_EXTRAS)))
        registered: list[str] = []
        failed: list[str] = []
        messages: dict[str, str] = {}
        for name in wanted:
            if cancel_event is not None and cancel_event.is_set():
                raise FoundryLocalException("Error downloading execution providers: cancelled")
            if name not in available:
                failed.append(name)
                extra = _EP_EXTRAS.get(name)
                messages[name] = (f"install foundry-local-py[{extra}] on a machine with the device"
                                  if extra else "not available in this build")
                continue
            if progress_callback is not None:
                progress_callback(name, 0.0)
                progress_callback(name, 100.0)
            registered.append(name)
        status = "Completed" if not failed else ("Partial" if registered else "Failed")
        return EpDownloadResult(success=not failed, status=status, registered_eps=registered,
                                failed_eps=failed, messages=messages)

    # --- web service --------------------------------------------------------------------------

    def start_web_service(self) -> None:
        """Serve the full HTTP API (OpenAI and Foundry routes) from this process, on
        ``Configuration.web.urls`` (default a free port on 127.0.0.1); :attr:`urls` then holds
        the bound URLs. Models loaded in-process are the ones it serves."""
        with FoundryLocalManager._lock:
            self.urls = self._runtime.start_web()

    def stop_web_service(self) -> None:
        with FoundryLocalManager._lock:
            if self.urls is None:
                raise FoundryLocalException("Web service is not running.")
            self._runtime.stop_web()
            self.urls = None

    # --- not in Foundry Local's SDK -----------------------------------------------------------

    def close(self) -> None:
        """Stop the web service, unload every model, end the runtime's thread; a later
        :meth:`initialize` starts afresh. (Foundry Local's SDK has no equivalent: its manager
        lives as long as the process.)"""
        with FoundryLocalManager._lock:
            self._runtime.close()
            self.urls = None
            if FoundryLocalManager.instance is self:
                FoundryLocalManager.instance = None
