"""Settings: one source for CLI flags, environment variables and documentation.

Every field can be set by an environment variable ``FOUNDRY_LOCAL_<FIELD>`` (upper case) and most
by a flag of ``foundry-local serve``. Nothing here is global: a :class:`Settings` instance is built
once and handed to ``create_app(settings)``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_PORT = 5273
DEFAULT_MODEL = "smollm2-135m"


def default_cache_dir() -> Path:
    return Path.home() / ".foundry-local-py" / "models"


def physical_cores() -> int:
    """All the cores the process may use (llama_cpp.server's default of half costs ~30%)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS / Windows
        return max(1, os.cpu_count() or 1)


KV_TOKEN_BUDGET = 32768
"""Default bound on the KV cache of one model, in tokens (slots x context per request)."""


def auto_parallel(n_ctx: int, cores: int | None = None) -> int:
    """Default slot count for a model with ``n_ctx`` tokens of context per request.

    Four per physical core, 4 to 16: decoding a small model is bound by memory traffic for the
    weights, which a step shares among all its sequences, so extra slots cost little per token.
    At most ``KV_TOKEN_BUDGET // n_ctx``, so long contexts do not multiply the KV cache's memory.
    """
    cores = cores or physical_cores()
    by_cores = min(16, max(4, 4 * cores))
    by_ctx = max(1, KV_TOKEN_BUDGET // max(1, n_ctx))
    return min(by_cores, by_ctx)


class Settings(BaseSettings):
    """Server and runtime settings."""

    model_config = SettingsConfigDict(
        env_prefix="FOUNDRY_LOCAL_", env_file=None, extra="ignore", populate_by_name=True
    )

    # --- network -------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Address to bind. Loopback by default.")
    port: int = Field(DEFAULT_PORT, ge=0, le=65535, description="TCP port (0 picks a free one).")
    api_key: SecretStr | None = Field(
        None, description="When set, every route but /health needs 'Authorization: Bearer <key>'."
    )
    allowed_hosts: list[str] = Field(
        default_factory=lambda: ["127.0.0.1", "localhost", "[::1]", "::1"],
        description="Host header allowlist (DNS-rebinding guard). '*' allows any host.",
    )
    cors_origins: list[str] = Field(
        default_factory=list, description="Origins allowed by CORS (never '*' with credentials)."
    )
    max_body_bytes: int = Field(8 * 1024 * 1024, gt=0, description="Largest request body accepted.")
    max_header_bytes: int = Field(64 * 1024, gt=0, description="Largest total size of request headers.")
    max_header_count: int = Field(256, gt=0, description="Most request header fields accepted.")

    # --- models and cache ----------------------------------------------------------------
    cache_dir: Path = Field(
        default_factory=default_cache_dir,
        validation_alias=AliasChoices("FOUNDRY_LOCAL_CACHE", "FOUNDRY_LOCAL_CACHE_DIR", "cache_dir"),
        description="Where downloaded and converted models live.",
    )
    catalog_path: Path | None = Field(
        None, description="Extra catalog file merged over the shipped one (and the user catalog)."
    )
    default_model: str = Field(DEFAULT_MODEL, description="Model loaded when the server starts.")
    preload: bool = Field(True, description="Load the default model at start-up.")
    device: Literal["auto", "cpu", "gpu", "npu"] = Field("auto", description="Device preference.")
    ep: str | None = Field(None, description="Force an execution provider (cpu, cuda, dml, ...).")
    model_ttl_s: float = Field(600.0, ge=0, description="Unload a model idle this long (0: never).")
    max_loaded_models: int = Field(3, ge=1, description="LRU bound on models loaded at once.")
    memory_budget_bytes: int | None = Field(
        None, description="Memory budget for loaded models (default: 75% of RAM)."
    )

    # --- engine --------------------------------------------------------------------------
    n_threads: int = Field(default_factory=physical_cores, ge=1, description="Threads for decode.")
    n_ctx: int | None = Field(
        None, ge=64, description="Context per request (default: the model's, capped at 4096)."
    )
    parallel: int | None = Field(
        None, ge=1, le=64,
        validation_alias=AliasChoices("parallel", "max_batch_size", "FOUNDRY_LOCAL_PARALLEL",
                                      "FOUNDRY_LOCAL_MAX_BATCH_SIZE"),
        description="Sequences decoded together per model (slots). Default: from cores and context.",
    )

    prompt_cache_mib: int = Field(
        256, ge=0, description="Host memory per model for KV states of finished requests (0: off).")
    deterministic: bool = Field(
        False, description="Deterministic mode: at temperature 0 or with a seed, the same request "
        "gives the same tokens whatever else runs, is cached or arrived first (llama.cpp on the "
        "CPU only; costs some prefix reuse and prefill speed).")

    # --- scheduling ----------------------------------------------------------------------
    max_queue: int = Field(64, ge=0, description="Requests waiting per model before 429.")
    queue_timeout_s: float = Field(120.0, gt=0, description="Longest wait for a slot before 503.")

    # --- request limits ------------------------------------------------------------------
    max_stop_sequences: int = Field(4, ge=0)
    max_stop_length: int = Field(256, ge=1)
    max_logit_bias: int = Field(300, ge=0)
    max_top_logprobs: int = Field(20, ge=0)
    template_timeout_s: float = Field(2.0, gt=0, description="Cap on rendering a chat template.")

    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("cache_dir", mode="before")
    @classmethod
    def _expand(cls, value: object) -> object:
        if isinstance(value, str):
            return Path(value).expanduser()
        if isinstance(value, Path):
            return value.expanduser()
        return value

    def api_key_value(self) -> str | None:
        return self.api_key.get_secret_value() if self.api_key else None

    def to_env(self) -> dict[str, str]:
        """These settings as ``FOUNDRY_LOCAL_*`` variables: how a process started from code (the
        SDK's service) gets all of them, the API key included, without putting them on its
        command line (which any user can read with ``ps``)."""
        env: dict[str, str] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is None:
                continue
            key = "FOUNDRY_LOCAL_CACHE" if name == "cache_dir" else f"FOUNDRY_LOCAL_{name.upper()}"
            if isinstance(value, SecretStr):
                env[key] = value.get_secret_value()
            elif isinstance(value, (list, dict, bool)):
                env[key] = json.dumps(value)
            else:
                env[key] = str(value)
        return env
