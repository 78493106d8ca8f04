"""`foundry-local cache ...` commands: list, location, remove, verify."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from ..cache.inventory import cache_usage, list_cached, remove_model, verify_cache
from ..cache.progress import Progress
from .common import cli_errors, console, human_size, load_context

app = typer.Typer(no_args_is_help=True)


@app.command("location")
def location() -> None:
    """Print the cache folder (set it with FOUNDRY_LOCAL_CACHE)."""
    with cli_errors():
        console().print(str(load_context().settings.cache_dir), soft_wrap=True)


@app.command("list")
def list_cache() -> None:
    """List the models that can be used without a download."""
    with cli_errors():
        ctx = load_context()
        entries = list_cached(ctx.store, ctx.catalog)
        table = Table(title="Cached models")
        for column in ("Alias", "Variant", "Source", "Where", "Size"):
            table.add_column(column, justify="right" if column == "Size" else "left")
        for e in entries:
            alias = e.alias if e.in_catalog else f"{e.alias} (not in catalog)"
            table.add_row(alias, e.variant_id, e.kind, e.location, human_size(e.size_bytes))
        out = console()
        out.print(table)
        usage = cache_usage(ctx.store)
        partial = (
            f", {human_size(usage.partial_bytes)} in unfinished downloads" if usage.partial_bytes else ""
        )
        out.print(f"Cache folder uses {human_size(usage.total_bytes)}{partial}.")


@app.command("remove")
def remove(
    alias: Annotated[str, typer.Argument(help="Model alias or variant id.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Remove a model's cached files (registered models are only unregistered)."""
    with cli_errors():
        ctx = load_context()
        if not yes and not typer.confirm(f"Remove '{alias}' from the cache?"):
            raise typer.Exit(1)
        results = remove_model(ctx.store, ctx.catalog, alias)
        out = console()
        if not results:
            out.print(f"Nothing of '{alias}' is in the cache.")
        for r in results:
            out.print(f"{r.action}: {r.variant_id}" + (f" ({r.detail})" if r.detail else ""))


@app.command("verify")
def verify(
    repair: Annotated[
        bool, typer.Option("--repair/--no-repair", help="Re-download or rebuild what is damaged.")
    ] = True,
) -> None:
    """Re-hash every cached model against its manifest; repair what is damaged."""
    with cli_errors():
        ctx = load_context()
        out = console()

        def report(p: Progress) -> None:
            if p.stage == "done":
                out.print(f"  re-fetched {p.variant_id}")

        results = verify_cache(ctx.store, ctx.catalog, repair=repair, progress=report)
        table = Table(title="Cache verification")
        for column in ("Alias", "Variant", "Status", "Detail"):
            table.add_column(column)
        for r in results:
            style = {"ok": "green", "repaired": "yellow"}.get(r.status, "red")
            table.add_row(r.alias, r.variant_id, f"[{style}]{r.status}[/{style}]", r.detail)
        out.print(table)
        if any(r.status in ("corrupt", "removed") for r in results):
            raise typer.Exit(1)
