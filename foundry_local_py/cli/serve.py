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
    deterministic: Annotated[bool, typer.Option(
        "--deterministic", help="Same tokens for the same request at temperature 0 or with a seed, "
        "whatever else runs or is cached")] = False,
    no_preload: Annotated[bool, typer.Option("--no-preload", help="Do not load a model at start")] = False,
    log_level: Annotated[str | None, typer.Option(help="debug|info|warning|error")] = None,
) -> None:
    import uvicorn

    from ..server.app import create_app

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
        deterministic=True if deterministic else None,
    )
    if settings.host not in ("127.0.0.1", "localhost", "::1") and settings.api_key is None:
        typer.secho(f"warning: listening on {settings.host} without an API key", err=True,
                    fg=typer.colors.YELLOW)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    typer.echo(f"foundry-local-py serving on http://{settings.host}:{settings.port}/v1 "
               f"(model {settings.default_model})", err=True)
    # uvicorn drains on SIGTERM, then re-raises the signal it caught so the previous handler runs:
    # make that handler a clean exit, so a drained shutdown ends with status 0, not "killed".
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=60,
        access_log=settings.log_level == "debug",
    )
