"""``foundry-local serve``: run the server in the foreground.

Its flags are generated from :class:`~foundry_local_py.config.Settings` (names, types, defaults,
help) through :func:`~foundry_local_py.config.setting_specs`: a field added to ``Settings`` is a
flag here with nothing else to edit. Flags override environment variables (``FOUNDRY_LOCAL_*``),
which override defaults.
"""

from __future__ import annotations

import inspect
import json
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from pydantic_settings import BaseSettings

from ..config import Settings, SettingSpec, setting_specs

_PY_TYPES: dict[str, Any] = {
    "bool": bool, "int": int, "float": float, "str": str, "path": Path, "secret": str,
    "choice": str, "list": list[str], "json": str,
}


def build_settings(**overrides: Any) -> Settings:
    """Settings from the environment with the flags that were given on top."""
    given = {k: v for k, v in overrides.items() if v is not None and v != []}
    return Settings(**given)


def _help(spec: SettingSpec) -> str:
    env = f"env {spec.env}"
    # Parentheses, not brackets: typer's rich help would read "[...]" as markup and drop it.
    tail = f"(default: {spec.default}; {env})"
    return f"{spec.help} {tail}" if spec.help else tail


def _parameter(spec: SettingSpec) -> inspect.Parameter:
    if spec.kind == "bool":
        decls = [f"{spec.flags[0]}/--no-{spec.flags[0][2:]}"]
        option = typer.Option(*decls, help=_help(spec), show_default=False)
    else:
        option = typer.Option(*spec.flags, help=_help(spec), show_default=False)
    py_type = Literal[spec.choices] if spec.kind == "choice" else _PY_TYPES[spec.kind]
    annotation = Annotated[py_type | None, option]  # type: ignore[valid-type]
    return inspect.Parameter(spec.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=annotation)


def settings_from_flags(values: dict[str, Any], settings_cls: type[BaseSettings] = Settings
                        ) -> BaseSettings:
    """The settings for the flags given (None: not given), over the environment and defaults."""
    specs = {s.name: s for s in setting_specs(settings_cls)}
    base = None
    given: dict[str, Any] = {}
    for name, raw in values.items():
        if raw is None or raw == []:
            continue
        spec = specs[name]
        value = raw
        if spec.kind == "json":
            try:
                value = json.loads(raw)
            except ValueError as exc:
                raise typer.BadParameter(f"{spec.flags[0]} takes JSON: {exc}") from exc
        elif spec.kind == "list" and spec.extend_default:
            base = base or settings_cls()
            value = [*getattr(base, name), *raw]
        given[name] = value
    try:
        return settings_cls(**given)
    except ValueError as exc:  # pydantic's ValidationError: name the flag, not the field
        raise typer.BadParameter(_short_validation(exc, specs)) from None


def _short_validation(exc: ValueError, specs: dict[str, SettingSpec]) -> str:
    errors: list[dict[str, Any]] = getattr(exc, "errors", list)()
    if not errors:
        return str(exc)
    first = errors[0]
    field = str(first.get("loc", ("?",))[0])
    flag = specs[field].flags[0] if field in specs else field
    return f"{flag}: {first.get('msg', 'invalid value')}"


def make_serve_command(settings_cls: type[BaseSettings] = Settings,
                       run: Callable[[Any], None] | None = None) -> Callable[..., None]:
    """A typer command whose parameters are the settings' fields. ``run`` receives the settings
    (default: serve them); tests pass another settings class or ``run`` to see what a flag did."""

    def serve(**values: Any) -> None:
        settings = settings_from_flags(values, settings_cls)
        (run or _run)(settings)

    params = [_parameter(spec) for spec in setting_specs(settings_cls)]
    serve.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    serve.__annotations__ = {p.name: p.annotation.__origin__ for p in params}
    serve.__doc__ = "Run the server in the foreground. Every flag is also FOUNDRY_LOCAL_<NAME>."
    return serve


def _run(settings: Any) -> None:
    import uvicorn

    from ..server.app import create_app
    from ..server.transport import Drain, DrainingServer, http_protocol, is_loopback

    assert isinstance(settings, Settings)
    if not is_loopback(settings.host) and settings.api_key is None:
        if not settings.allow_unauthenticated_remote:
            typer.secho(
                f"error: refusing to listen on {settings.host} without an API key: anyone who can "
                "reach this address could use the server. Set --api-key (or FOUNDRY_LOCAL_API_KEY), "
                "bind 127.0.0.1, or pass --allow-unauthenticated-remote "
                "(FOUNDRY_LOCAL_ALLOW_UNAUTHENTICATED_REMOTE=1) if that is what you want.",
                err=True, fg=typer.colors.RED)
            raise typer.Exit(2)
        typer.secho(f"warning: listening on {settings.host} without an API key "
                    "(--allow-unauthenticated-remote)", err=True, fg=typer.colors.YELLOW)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    typer.echo(f"foundry-local-py serving on http://{settings.host}:{settings.port}/v1 "
               f"(model {settings.default_model})", err=True)
    # The first SIGTERM drains (transport.DrainingServer), then the server shuts down; a second
    # SIGTERM exits at once. A signal handler left by uvicorn runs as a clean exit, so a drained
    # shutdown ends with status 0, not "killed".
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    drain = Drain()
    app = create_app(settings, drain=drain)

    def truncate() -> int:
        core = getattr(app.state, "core", None)
        return sum(lm.scheduler.truncate_running() for lm in core.manager.loaded()) if core else 0

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=10,
        access_log=settings.log_level == "debug",
        http=http_protocol(settings.header_timeout_s),
    )
    DrainingServer(config, drain, drain_timeout_s=settings.drain_timeout_s, truncate=truncate).run()


serve = make_serve_command()
