"""`foundry-local adapter ...`: LoRA adapters in the cache (register, list, info, remove).

A registered adapter is served as ``BASE_ALIAS:NAME`` on every API (and by index or name in a
request's ``lora`` list). ``train`` (the ``[finetune]`` extra) is added by ``cli/finetune.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..cache.adapters import AdapterStore, describe
from .common import cli_errors, console, human_size, load_context

app = typer.Typer(no_args_is_help=True)


def _store() -> AdapterStore:
    ctx = load_context()
    return AdapterStore(ctx.settings.cache_dir, ctx.catalog)


@app.command("register")
def register(
    source: Annotated[Path, typer.Argument(help="A GGUF LoRA file or a PEFT adapter folder.")],
    base: Annotated[str, typer.Option("--base", help="The base model's alias (or a GGUF variant id).")],
    name: Annotated[str, typer.Option("--name", help="The adapter's name (letters, digits, . _ -).")],
) -> None:
    """Check an adapter against its base model and add it to the cache."""
    with cli_errors():
        record = _store().register(source.expanduser().resolve(), base=base, name=name)
        out = console()
        out.print(f"Registered [bold]{record.model_name}[/bold]: rank {record.rank}, "
                  f"{len(record.targets)} tensors, {human_size(record.size)} (base {record.base_variant}).")
        out.print(f"Use it as the model '{record.model_name}' on any API.")


@app.command("list")
def list_adapters(
    base: Annotated[str | None, typer.Option("--base", help="Only this base model's adapters.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List registered adapters (the index is the id a request's lora list may use)."""
    with cli_errors():
        records = _store().list(base=base)
        if as_json:
            console().print_json(json.dumps(describe(records)))
            return
        table = Table(title="LoRA adapters")
        for column in ("Model", "Base variant", "Rank", "Alpha", "Size", "Source", "Created"):
            table.add_column(column)
        for r in records:
            alpha = "" if r.alpha is None else f"{r.alpha:g}"
            table.add_row(r.model_name, r.base_variant, str(r.rank), alpha, human_size(r.size), r.source,
                          r.created)
        console().print(table)


@app.command("info")
def info(name: Annotated[str, typer.Argument(help="The adapter's name.")]) -> None:
    """Show an adapter's manifest."""
    with cli_errors():
        record = _store().get(name)
        console().print_json(record.model_dump_json())


@app.command("remove")
def remove(
    name: Annotated[str, typer.Argument(help="The adapter's name.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Remove an adapter from the cache."""
    with cli_errors():
        store = _store()
        record = store.get(name)
        if not yes and not typer.confirm(f"Remove adapter '{record.model_name}'?"):
            raise typer.Exit(1)
        store.remove(name)
        console().print(f"Removed {record.model_name}.")
