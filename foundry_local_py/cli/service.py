"""``foundry-local service start|stop|restart|status|ps|logs``."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from ..sdk.client import ServiceClient
from ..sdk.service import find_service, start_service, stop_service
from .common import cli_errors, console, load_context

app = typer.Typer(no_args_is_help=True)


@app.command()
def start() -> None:
    """Start the service in the background (no-op when it already runs)."""
    with cli_errors():
        ctx = load_context()
        running = find_service(ctx.settings)
        info = running or start_service(ctx.settings)
        verb = "is running" if running else "started"
        console().print(f"Service {verb} on {info.endpoint}" + (f" (pid {info.pid})" if info.pid else ""))


@app.command()
def stop() -> None:
    """Stop the background service (running requests finish first)."""
    with cli_errors():
        ctx = load_context()
        if stop_service(ctx.settings):
            console().print("Service stopped.")
        else:
            console().print("No background service was running.")


@app.command()
def restart() -> None:
    """Stop and start the service."""
    with cli_errors():
        ctx = load_context()
        stop_service(ctx.settings)
        info = start_service(ctx.settings)
        console().print(f"Service restarted on {info.endpoint} (pid {info.pid})")


@app.command()
def status() -> None:
    """Is the service running, where, and what is loaded."""
    with cli_errors():
        ctx = load_context()
        info = find_service(ctx.settings)
        if info is None:
            console().print("Service is not running. Start it with 'foundry-local service start'.")
            raise typer.Exit(1)
        client = ServiceClient(info.base_url, api_key=ctx.settings.api_key_value())
        health = client.health()
        console().print(f"Service is running on {info.endpoint} ({health.get('status')})")
        console().print(f"Model cache: {ctx.settings.cache_dir}")
        for name in health.get("loaded", []):
            console().print(f"  loaded: {name}")


@app.command()
def ps() -> None:
    """Models loaded in the service, with their engine, device and load."""
    with cli_errors():
        ctx = load_context()
        info = find_service(ctx.settings)
        if info is None:
            console().print("Service is not running.")
            raise typer.Exit(1)
        loaded = ServiceClient(info.base_url, api_key=ctx.settings.api_key_value()).loaded_models()
        table = Table("Model", "Alias", "Engine", "Device", "EP", "Context", "Running", "Waiting", "TTL")
        for m in loaded:
            table.add_row(m["name"], m["alias"], m["engine"], m["device"], m["executionProvider"],
                          str(m["contextLength"]), str(m["running"]), str(m["waiting"]),
                          "-" if m["ttl"] is None else f"{m['ttl']:.0f}s")
        console().print(table if loaded else "No models loaded.")


@app.command()
def logs(lines: Annotated[int, typer.Option("--lines", "-n")] = 50) -> None:
    """The last lines of the background service's log."""
    with cli_errors():
        ctx = load_context()
        from ..sdk.service import read_state

        info = read_state(ctx.settings)
        if info is None or not info.log_path:
            console().print("No background service log.")
            raise typer.Exit(1)
        from pathlib import Path

        text = Path(info.log_path).read_text(errors="replace").splitlines()[-lines:]
        typer.echo("\n".join(text))
