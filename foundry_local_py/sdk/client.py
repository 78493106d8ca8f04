"""A small HTTP client for the service's management routes and streaming chat."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from ..errors import FoundryError, ModelNotFoundError, ServiceUnavailableError


class ServiceError(FoundryError):
    """An error the service returned, with its status and OpenAI error fields."""

    def __init__(self, status: int, message: str, code: str | None, param: str | None) -> None:
        super().__init__(message, code=code, param=param)
        self.status_code = status


def _raise_for(resp: httpx.Response) -> None:
    if resp.status_code < 400:
        return
    try:
        err = resp.json()["error"]
        message, code, param = err.get("message", ""), err.get("code"), err.get("param")
    except (ValueError, KeyError, TypeError):
        message, code, param = resp.text[:300], None, None
    if resp.status_code == 404 and code == "model_not_found":
        exc = ModelNotFoundError("?")
        exc.message = message
        raise exc
    raise ServiceError(resp.status_code, message, code, param)


class ServiceClient:
    def __init__(self, base_url: str, *, api_key: str | None = None, timeout: float | None = 600.0) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def _get(self, path: str, **params: Any) -> Any:
        try:
            resp = self._http.get(path, params={k: v for k, v in params.items() if v is not None})
        except httpx.HTTPError as exc:
            raise ServiceUnavailableError(f"the service at {self.base_url} is not reachable") from exc
        _raise_for(resp)
        return resp.json()

    def health(self) -> dict[str, Any]:
        resp = self._http.get("/health")
        return dict(resp.json())

    def catalog(self) -> list[dict[str, Any]]:
        return list(self._get("/foundry/list"))

    def cached_models(self) -> list[str]:
        return list(self._get("/openai/models"))

    def loaded_models(self) -> list[dict[str, Any]]:
        return list(self._get("/openai/loadedmodels"))

    def load(self, name: str, *, ttl: float | None = None, ep: str | None = None) -> dict[str, Any]:
        return dict(self._get(f"/openai/load/{name}", ttl=ttl, ep=ep))

    def unload(self, name: str, *, force: bool = False) -> dict[str, Any]:
        return dict(self._get(f"/openai/unload/{name}", force=str(force).lower()))

    def models(self) -> list[dict[str, Any]]:
        return list(self._get("/v1/models")["data"])

    def status(self) -> dict[str, Any]:
        return dict(self._get("/openai/status"))

    def download(self, name: str, *, force: bool = False, token: str | None = None,
                 on_progress: Callable[[str], None] | None = None) -> None:
        """POST /openai/download; progress lines go to ``on_progress``; raises on failure."""
        body: dict[str, Any] = {"model": {"Name": name}, "force": force}
        if token:
            body["token"] = token  # a Hugging Face token for this download (gated models)
        with self._http.stream("POST", "/openai/download", json=body, timeout=None) as resp:
            if resp.status_code >= 400:
                resp.read()
                _raise_for(resp)
            for line in resp.iter_lines():
                if line.startswith("{"):
                    result = json.loads(line)
                    if not result.get("Success"):
                        raise ServiceError(500, result.get("ErrorMessage") or "download failed", None, None)
                    return
                if on_progress is not None and line.strip():
                    on_progress(line.strip())
        raise ServiceError(500, "the download ended without a result", None, None)

    def stream(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """POST a streaming request and yield each SSE JSON chunk (errors raise)."""
        with self._http.stream("POST", path, json={**body, "stream": True}) as resp:
            if resp.status_code >= 400:
                resp.read()
                _raise_for(resp)
            for line in resp.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    err = chunk["error"]
                    raise ServiceError(500, err.get("message", "error"), err.get("code"), err.get("param"))
                yield chunk
