"""``foundry-local serve``: run the server in the foreground.

Flags override environment variables (``FOUNDRY_LOCAL_*``), which override defaults.
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from ..config import DEFAULT_MODEL, DEFAULT_PORT, Settings


def build_settings(**overrides: Any) -> Settings:
    """Settings from the environment with the flags that were given on top."""
    given = {k: v for k, v in overrides.items() if v is not None and v != []}
    return Settings(**given)


def serve(  # noqa: PLR0917 - one parameter per flag, as typer wants
    model: Annotated[str | None, typer.Option("--model", "-m", help=f"Model to preload [{DEFAULT_MODEL}]")
                     ] = None,
    host: Annotated[str | None, typer.Option(help="Address to bind [127.0.0.1]")] = None,
    port: Annotated[int | None, typer.Option(help=f"Port [{DEFAULT_PORT}]")] = None,
    api_key: Annotated[str | None, typer.Option(help="Require 'Authorization: Bearer KEY'",
                                                envvar="FOUNDRY_LOCAL_API_KEY")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Model cache directory")] = None,
    catalog: Annotated[Path | None, typer.Option(help="Extra catalog file")] = None,
    n_threads: Annotated[int | None, typer.Option(help="Decode threads [all cores]")] = None,
    n_ctx: Annotated[int | None, typer.Option(help="Context length per request")] = None,
    parallel: Annotated[int | None, typer.Option(
        "--parallel", "--max-batch",
        help="Slots: sequences decoded together per model [from cores and context]")] = None,
    max_queue: Annotated[int | None, typer.Option(help="Waiting requests before 429")] = None,
    queue_timeout: Annotated[float | None, typer.Option(
        help="Seconds a request may wait for a slot before 503")] = None,
    device: Annotated[str | None, typer.Option(help="auto|cpu|gpu|npu")] = None,
    ep: Annotated[str | None, typer.Option(help="Force an execution provider")] = None,
    allowed_host: Annotated[list[str] | None, typer.Option(help="Extra allowed Host header")] = None,
    cors_origin: Annotated[list[str] | None, typer.Option(help="CORS origin to allow")] = None,
    no_preload: Annotated[bool, typer.Option("--no-preload", help="Do not load a model at start")] = False,
    allow_unauthenticated_remote: Annotated[bool, typer.Option(
        "--allow-unauthenticated-remote",
        help="Allow a non-loopback --host without an API key (refused otherwise)")] = False,
    drain_timeout: Annotated[float | None, typer.Option(
        help="Seconds running requests may take to finish after SIGTERM [30]")] = None,
    log_level: Annotated[str | None, typer.Option(help="debug|info|warning|error")] = None,
) -> None:
    import uvicorn

    from ..server.app import create_app
    from ..server.transport import Drain, DrainingServer, http_protocol, is_loopback

    base = Settings()
    hosts = None
    if allowed_host:
        hosts = [*base.allowed_hosts, *allowed_host]
    settings = build_settings(
        default_model=model, host=host, port=port, api_key=api_key, cache_dir=cache_dir,
        catalog_path=catalog, n_threads=n_threads, n_ctx=n_ctx, parallel=parallel,
        max_queue=max_queue, queue_timeout_s=queue_timeout, device=device, ep=ep, allowed_hosts=hosts,
        cors_origins=cors_origin,
        preload=False if no_preload else None, log_level=log_level,
        allow_unauthenticated_remote=True if allow_unauthenticated_remote else None,
        drain_timeout_s=drain_timeout,
    )
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
    # The first SIGTERM drains (transport.DrainingServer), then uvicorn re-raises the signal it
    # caught so the previous handler runs: make that handler a clean exit, so a drained shutdown
    # ends with status 0, not "killed". A second SIGTERM exits at once.
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
