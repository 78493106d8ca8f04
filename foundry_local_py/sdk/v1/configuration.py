"""``Configuration``: what ``FoundryLocalManager.initialize`` takes (Foundry Local 1.x names)."""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ...config import Settings
from .exception import FoundryLocalException

_SAFE_APP_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


class LogLevel(str, Enum):
    """Foundry Local's level names, mapped onto the server's log levels."""

    VERBOSE = "Verbose"
    DEBUG = "Debug"
    INFORMATION = "Information"
    WARNING = "Warning"
    ERROR = "Error"
    FATAL = "Fatal"

    def __str__(self) -> str:
        return self.value

    @property
    def server_level(self) -> str:
        return {"Verbose": "debug", "Debug": "debug", "Information": "info", "Warning": "warning"
                }.get(self.value, "error")


class Configuration:
    """Settings of the in-process runtime.

    ``app_name``: a plain name (letters, digits, ``._-``). ``model_cache_dir``: where models live;
    default: this project's cache (``FOUNDRY_LOCAL_CACHE``, else ``~/.foundry-local-py/models``),
    shared with the ``foundry-local`` CLI and service, so a model downloaded by either is found
    (Foundry Local's default is a per-app folder). ``web``: where ``start_web_service`` binds
    (default ``http://127.0.0.1:0``, a free port). ``additional_settings``: any field of the
    server's settings by name (``{"n_ctx": "2048", "parallel": "4"}``); see README's table.
    ``app_data_dir``, ``logs_dir`` and ``foundry_local_core_path`` are accepted for compatibility
    and unused (there is no native core library here; logs go to Python's ``logging``).
    """

    class WebService:
        def __init__(self, urls: str | None = None, external_url: str | None = None) -> None:
            self.urls = urls
            self.external_url = external_url

    def __init__(  # noqa: PLR0917 - Foundry Local's positional order
        self,
        app_name: str,
        foundry_local_core_path: str | None = None,
        app_data_dir: str | None = None,
        model_cache_dir: str | None = None,
        logs_dir: str | None = None,
        log_level: LogLevel | None = LogLevel.WARNING,
        web: Configuration.WebService | None = None,
        additional_settings: dict[str, str] | None = None,
    ) -> None:
        self.app_name = app_name
        self.foundry_local_core_path = foundry_local_core_path
        self.app_data_dir = app_data_dir
        self.model_cache_dir = model_cache_dir
        self.logs_dir = logs_dir
        self.log_level = log_level
        self.web = web
        self.additional_settings = additional_settings

    def validate(self) -> None:
        if not self.app_name:
            raise FoundryLocalException("Configuration AppName must be set to a valid application name.")
        if not _SAFE_APP_NAME.match(self.app_name):
            raise FoundryLocalException("Configuration AppName value contains invalid characters.")
        if self.web is not None and self.web.external_url is not None:
            parsed = urlparse(self.web.external_url)
            if not parsed.port:
                raise FoundryLocalException("Configuration Web.ExternalUrl has invalid port.")

    def bind_address(self) -> tuple[str, int]:
        """(host, port) for the web service: the first of ``web.urls`` (``;``-separated)."""
        urls = (self.web.urls if self.web else None) or "http://127.0.0.1:0"
        first = urls.split(";")[0].strip()
        parsed = urlparse(first if "://" in first else f"http://{first}")
        if parsed.scheme not in ("http", ""):
            raise FoundryLocalException("Configuration Web.Urls: only http:// URLs can be served")
        try:
            port = parsed.port or 0
        except ValueError as exc:
            raise FoundryLocalException(f"Configuration Web.Urls has an invalid port: {first}") from exc
        return parsed.hostname or "127.0.0.1", port

    def to_settings(self) -> Settings:
        """The server settings this configuration stands for (environment, then these values)."""
        values: dict[str, Any] = dict(self.additional_settings or {})
        if self.model_cache_dir:
            values["cache_dir"] = Path(self.model_cache_dir).expanduser()
        if self.log_level is not None:
            values["log_level"] = LogLevel(self.log_level).server_level
        host, port = self.bind_address()
        values.setdefault("host", host)
        values.setdefault("port", port)
        values["preload"] = False
        unknown = sorted(set(values) - set(Settings.model_fields) - {"cache_dir"})
        if unknown:
            raise FoundryLocalException(f"unknown additional_settings: {', '.join(unknown)}")
        try:
            return Settings(**values)
        except ValueError as exc:
            raise FoundryLocalException(f"invalid configuration: {exc}") from exc
