"""One exception tree for the whole project, and the one place that maps it to HTTP.

Every error a client can cause or see is a :class:`FoundryError` carrying the OpenAI error fields
(``status``, ``type``, ``code``, ``param``). Messages must never hold filesystem paths, tracebacks
or addresses: they are shown to clients as they are.
"""

from __future__ import annotations

from typing import Any, ClassVar


class FoundryError(Exception):
    """Base class. ``message`` is safe to show to a client."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


# --- 4xx: the client's mistake --------------------------------------------------------------


class InvalidRequestError(FoundryError):
    status = 400
    type = "invalid_request_error"


class ContextLengthExceededError(InvalidRequestError):
    default_code = "context_length_exceeded"


class AuthenticationError(FoundryError):
    status = 401
    type = "authentication_error"
    default_code = "invalid_api_key"


class PermissionDeniedError(FoundryError):
    status = 403
    type = "permission_error"
    default_code = "forbidden"


class NotFoundError(FoundryError):
    status = 404
    type = "invalid_request_error"
    default_code = "not_found"


class ModelNotFoundError(NotFoundError):
    default_code = "model_not_found"

    def __init__(self, model: str, *, param: str | None = "model", detail: str | None = None) -> None:
        text = f"The model '{model}' does not exist or is not available."
        if detail:
            text = f"{text} {detail}"
        super().__init__(text, param=param)
        self.model = model


class ConflictError(FoundryError):
    status = 409
    type = "invalid_request_error"
    default_code = "conflict"


class RateLimitError(FoundryError):
    """The admission queue is full. ``retry_after`` seconds goes into the Retry-After header."""

    status = 429
    type = "rate_limit_error"
    default_code = "queue_full"

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


# --- 5xx: ours ------------------------------------------------------------------------------


class ServiceUnavailableError(FoundryError):
    status = 503
    type = "server_error"
    default_code = "service_unavailable"


class QueueTimeoutError(ServiceUnavailableError):
    default_code = "queue_timeout"


class ModelLoadError(FoundryError):
    """A model could not be loaded (corrupt file, unsupported format, provider failure)."""

    status = 500
    type = "server_error"
    default_code = "model_load_failed"


class EngineError(FoundryError):
    status = 500
    type = "server_error"
    default_code = "engine_error"


# --- cache / download (also surfaced through the CLI) ---------------------------------------


class UnsafePathError(InvalidRequestError):
    default_code = "unsafe_path"


class DownloadError(FoundryError):
    status = 502
    type = "server_error"
    default_code = "download_failed"


class IntegrityError(DownloadError):
    default_code = "checksum_mismatch"


class InsufficientDiskSpaceError(FoundryError):
    status = 507
    type = "server_error"
    default_code = "insufficient_storage"


class ConversionError(FoundryError):
    status = 500
    type = "server_error"
    default_code = "conversion_failed"
