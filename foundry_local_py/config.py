"""Settings: one source for CLI flags, environment variables and documentation.

Every field can be set by an environment variable ``FOUNDRY_LOCAL_<FIELD>`` (upper case) and most
by a flag of ``foundry-local serve``. Nothing here is global: a :class:`Settings` instance is built
once and handed to ``create_app(settings)``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic.fields import FieldInfo
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
"""Default bound on the KV cache of one model without a shared pool, in tokens (slots x context
per request)."""


def auto_parallel(n_ctx: int | None, cores: int | None = None) -> int:
    """Default slot count for a model with ``n_ctx`` tokens of context per request.

    Four per physical core, 4 to 16: decoding a small model is bound by memory traffic for the
    weights, which a step shares among all its sequences, so extra slots cost little per token.
    Without a shared KV pool (``n_ctx`` given: each slot has its own stream), at most
    ``KV_TOKEN_BUDGET // n_ctx``, so long contexts do not multiply the KV cache's memory; with the
    pool (``n_ctx`` None) slots cost no memory and only the cores count.
    """
    cores = cores or physical_cores()
    by_cores = min(16, max(4, 4 * cores))
    if n_ctx is None:
        return by_cores
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
        None,
        description="When set, every route but /health needs 'Authorization: Bearer <key>' "
                    "(or 'x-api-key: <key>').",
    )
    allowed_hosts: list[str] = Field(
        default_factory=lambda: ["127.0.0.1", "localhost", "[::1]", "::1"],
        description="Host header allowlist (DNS-rebinding guard). '*' allows any host. Each flag adds"
                    " one host to the default list.",
        json_schema_extra={"flags": ["--allowed-host"], "extend_default": True},
    )
    cors_origins: list[str] = Field(
        default_factory=list, description="Origins allowed by CORS (never '*' with credentials).",
        json_schema_extra={"flags": ["--cors-origin"]},
    )
    max_body_bytes: int = Field(8 * 1024 * 1024, gt=0, description="Largest request body accepted.")
    max_header_bytes: int = Field(64 * 1024, gt=0, description="Largest total size of request headers.")
    max_header_count: int = Field(256, gt=0, description="Most request header fields accepted.")
    allow_unauthenticated_remote: bool = Field(
        False, description="Allow a non-loopback `host` without an API key (else `serve` refuses to start).")
    header_timeout_s: float = Field(
        10.0, gt=0, description="Seconds a client may take to send a request's headers; then the "
        "connection is closed (slowloris).", json_schema_extra={"flags": ["--header-timeout"]})
    body_timeout_s: float = Field(
        30.0, gt=0, description="Seconds a client may take to send a request's body; then 408.",
        json_schema_extra={"flags": ["--body-timeout"]})
    drain_timeout_s: float = Field(
        30.0, ge=0, description="On SIGTERM, seconds running requests may take to finish; then they "
        "end with finish_reason 'length'. A second SIGTERM exits at once.",
        json_schema_extra={"flags": ["--drain-timeout"]})

    # --- models and cache ----------------------------------------------------------------
    cache_dir: Path = Field(
        default_factory=default_cache_dir,
        validation_alias=AliasChoices("FOUNDRY_LOCAL_CACHE", "FOUNDRY_LOCAL_CACHE_DIR", "cache_dir"),
        description="Where downloaded and converted models live (and the user catalog).",
        json_schema_extra={"default_doc": "~/.foundry-local-py/models", "env": "FOUNDRY_LOCAL_CACHE"},
    )
    catalog_path: Path | None = Field(
        None, description="Extra catalog file merged over the shipped one (and the user catalog).",
        json_schema_extra={"flags": ["--catalog"]},
    )
    default_model: str = Field(
        DEFAULT_MODEL, description="Model loaded when the server starts.",
        json_schema_extra={"flags": ["--model", "-m"]},
    )
    preload: bool = Field(True, description="Load the default model at start-up (--no-preload: don't).")
    device: Literal["auto", "cpu", "gpu", "npu"] = Field("auto", description="Device preference.")
    ep: str | None = Field(
        None, description="Force an execution provider (cpu, cuda, dml, ...).",
        json_schema_extra={"default_doc": "auto"},
    )
    model_ttl_s: float = Field(600.0, ge=0, description="Unload a model idle this long (0: never).")
    max_loaded_models: int = Field(3, ge=1, description="LRU bound on models loaded at once.")
    memory_budget_bytes: int | None = Field(
        None, description="Memory budget for loaded models; beyond it the least recently used is unloaded.",
        json_schema_extra={"default_doc": "75% of RAM"},
    )
    probe_models: bool = Field(
        True, description="Load each new model file once in a child process first (crash isolation).")
    probe_timeout_s: float = Field(180.0, gt=0, description="Longest a model probe may take (seconds).",
                                   json_schema_extra={"flags": ["--probe-timeout"]})
    probe_verdicts: Path | None = Field(
        None, description="Where probe verdicts are kept.",
        json_schema_extra={"default_doc": "<cache>/.probe-verdicts.json"})

    # --- engine --------------------------------------------------------------------------
    n_threads: int = Field(
        default_factory=physical_cores, ge=1,
        description="llama.cpp decode threads (llama_cpp.server's default of half the cores costs ~30%).",
        json_schema_extra={"default_doc": "all cores"},
    )
    n_ctx: int | None = Field(
        None, ge=64, description="Longest request (prompt + completion). With the shared KV pool "
        "(llama.cpp) it is capped by kv_tokens; without one (ONNX, deterministic mode) each slot "
        "has a KV stream of this many tokens.",
        json_schema_extra={"default_doc": "the model's (per-slot streams: capped at 4096)"},
    )
    parallel: int | None = Field(
        None, ge=1, le=64,
        validation_alias=AliasChoices("parallel", "max_batch_size", "FOUNDRY_LOCAL_PARALLEL",
                                      "FOUNDRY_LOCAL_MAX_BATCH_SIZE"),
        description="Slots: sequences decoded together per model. Default: 4 per core, 4 to 16 (per-slot"
                    " KV streams: at most 32768 / n_ctx).",
        json_schema_extra={"flags": ["--parallel", "--max-batch", "--max-batch-size"],
                           "default_doc": "from cores (and context)"},
    )
    kv_tokens: int | None = Field(
        None, ge=256, description="Tokens in a model's shared KV pool (llama.cpp, outside "
        "deterministic mode): all slots draw on it, one request may use up to its model's context; "
        "a request waits in the queue until its prompt fits. Default: the model's context, 4096 to "
        "16384, at most 1/8 of the memory budget.",
        json_schema_extra={"default_doc": "from the model's context and memory"},
    )
    kv_cache_type: Literal["auto", "f16", "q8_0", "q4_0", "q8_0/f16"] = Field(
        "auto", description="KV cache element types (llama.cpp's -ctk/-ctv, Ollama's "
        "OLLAMA_KV_CACHE_TYPE), for K and V or as K/V. auto: K in q8_0 and V in f16 on the CPU "
        "(a 24% smaller pool; decoding as fast, prefill of long prompts slower: 0.72x f16's at "
        "768 tokens, 0.58x at 2048), f16 on a GPU. q8_0 halves the KV memory, q4_0 quarters it, "
        "at some fidelity cost. f16: the fastest prefill of long prompts.")
    prompt_cache_mib: int | None = Field(
        None, ge=0, description="Host memory per model for KV states of finished requests (0: off). "
        "With the shared KV pool, finished requests stay in the pool's free cells first. ONNX "
        "models: the KV of finished greedy requests' generators, reused for prompts that start "
        "alike.",
        json_schema_extra={"default_doc": "0 with the shared KV pool; per-slot streams: 1/8 of the KV "
                                          "cache, at most 256; ONNX: 64"})
    deterministic: bool = Field(
        False, description="Deterministic mode: at temperature 0 or with a seed, the same request "
        "gives the same tokens whatever else runs, is cached or arrived first (llama.cpp on the "
        "CPU only; one KV stream of n_ctx tokens per slot instead of the shared pool, so more "
        "memory; prefills long new prompts ~1.2x slower).")
    allow_batch_dependent_outputs: bool = Field(
        False, description="Batch concurrent sequences of a model even where its runtime computes a "
        "batched sequence's logits differently from the same sequence alone (checked at load; "
        "e.g. onnxruntime's 4-bit MatMulNBits on AVX2 CPUs). Off: such a model decodes one "
        "sequence at a time, so every output is what the request gives alone.")
    max_loras: int = Field(
        4, ge=1, description="LoRA adapters kept loaded per model (least recently used idle ones "
        "are freed beyond it; more may be held while requests use them).")
    lora_ttl_s: float = Field(
        600.0, ge=0, description="Free a loaded LoRA adapter idle this long (0: keep it while its "
        "model is loaded).")
    allow_runtime_lora_updating: bool = Field(
        False, description="Let POST /v1/load_lora_adapter register an adapter from a file path "
        "on this machine (vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING); off: only registered "
        "adapters can be loaded.")

    # --- scheduling ----------------------------------------------------------------------
    max_queue: int = Field(64, ge=0, description="Requests waiting per model before 429.")
    queue_timeout_s: float = Field(
        120.0, gt=0, description="Longest wait for a slot (seconds) before 503.",
        json_schema_extra={"flags": ["--queue-timeout"]},
    )

    # --- request limits ------------------------------------------------------------------
    max_stop_sequences: int = Field(4, ge=0, description="Most `stop` strings a request may give.")
    max_stop_length: int = Field(256, ge=1, description="Longest `stop` string, in characters.")
    max_logit_bias: int = Field(300, ge=0, description="Most `logit_bias` entries a request may give.")
    max_top_logprobs: int = Field(20, ge=0, description="Largest `top_logprobs` a request may ask for.")
    max_tools: int = Field(128, ge=0, description="Most tools one request may declare.")
    max_schema_bytes: int = Field(
        256 * 1024, gt=0, description="Largest JSON schema (`response_format`, or one tool's parameters).")
    template_timeout_s: float = Field(2.0, gt=0, description="Cap on rendering a chat template.")

    # --- stored responses (/v1/responses with store=true) ---------------------------------
    responses_max_stored: int = Field(
        10_000, ge=0, description="Most stored responses kept (oldest dropped first; 0: store none).")
    responses_max_age_s: float = Field(
        30 * 24 * 3600.0, gt=0, description="Stored responses older than this are dropped (30 days).")

    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Server log level.")

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


# --- one description of every setting, for the CLI and the docs ----------------------------------


@dataclass(frozen=True)
class SettingSpec:
    """How one :class:`Settings` field is set and documented. ``foundry-local serve`` builds its
    flags from these and ``foundry-local docs`` the README's configuration table, so a field added
    to :class:`Settings` (with a ``description``) becomes a flag and a documented row by itself.

    A field's ``json_schema_extra`` may carry ``flags`` (extra flag spellings; the first is the one
    documented), ``default_doc`` (the default in words, for defaults that depend on the machine),
    ``env`` (the documented variable when it is not ``FOUNDRY_LOCAL_<NAME>``) and
    ``extend_default`` (list flags add to the default list instead of replacing it)."""

    name: str
    flags: tuple[str, ...]
    """Every spelling of the flag; the first is the one the docs show."""
    env: str
    kind: str
    """``bool``, ``int``, ``float``, ``str``, ``path``, ``secret``, ``choice``, ``list`` or ``json``."""
    choices: tuple[str, ...]
    default: str
    help: str
    extend_default: bool = False

    @property
    def type_doc(self) -> str:
        if self.kind == "choice":
            return "|".join(self.choices)
        return {"secret": "str", "list": "str, repeatable", "json": "JSON"}.get(self.kind, self.kind)


def _kind(annotation: Any) -> tuple[str, tuple[str, ...]]:
    args = [a for a in get_args(annotation) if a is not type(None)]
    origin = get_origin(annotation)
    if origin in (Union, UnionType) and len(args) == 1:
        return _kind(args[0])
    if origin is Literal:
        return "choice", tuple(str(a) for a in get_args(annotation))
    if origin in (list, tuple, set, frozenset) and all(a is str for a in args):
        return "list", ()
    simple = {bool: "bool", int: "int", float: "float", str: "str", Path: "path", SecretStr: "secret"}
    if isinstance(annotation, type) and annotation in simple:
        return simple[annotation], ()
    return "json", ()


def _default_text(info: FieldInfo, kind: str) -> str:
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    if "default_doc" in extra:
        return str(extra["default_doc"])
    try:
        value = info.default_factory() if info.default_factory is not None else info.default  # type: ignore[call-arg]
    except TypeError:  # a factory that reads the other fields: no single default to show
        return "computed"
    if value is None:
        return "none"
    if kind == "bool":
        return "on" if value else "off"
    if kind == "list":
        return ", ".join(str(v) for v in value) if value else "none"
    if isinstance(value, SecretStr):
        return "(set)"
    return str(value)


def setting_specs(settings_cls: type[BaseSettings] | None = None) -> list[SettingSpec]:
    """Every field of ``settings_cls`` (default :class:`Settings`), in declaration order."""
    cls = settings_cls or Settings
    prefix = str(cls.model_config.get("env_prefix", ""))
    specs = []
    for name, info in cls.model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        kind, choices = _kind(info.annotation)
        plain = "--" + name.replace("_", "-")
        given = [str(f) for f in extra.get("flags", [])]  # type: ignore[union-attr]
        flags = tuple(dict.fromkeys([*given, plain])) if kind != "bool" else (plain,)
        specs.append(
            SettingSpec(
                name=name,
                flags=flags,
                env=str(extra.get("env") or f"{prefix}{name.upper()}"),
                kind=kind,
                choices=choices,
                default=_default_text(info, kind),
                help=(info.description or "").strip(),
                extend_default=bool(extra.get("extend_default", False)),
            )
        )
    return specs
