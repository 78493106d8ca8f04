"""Helpers shared by the CLI verb modules: settings, store and catalog, errors, sizes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import typer
from rich.console import Console

from ..cache.catalog import Catalog, load_catalog
from ..cache.store import ModelStore
from ..config import Settings
from ..errors import FoundryError


@dataclass(frozen=True)
class CliContext:
    settings: Settings
    store: ModelStore
    catalog: Catalog


def load_context(settings: Settings | None = None) -> CliContext:
    """Settings from flags/env, the store at the cache folder, the merged catalog."""
    settings = settings or Settings()  # fields come from env and defaults
    return CliContext(
        settings=settings,
        store=ModelStore(settings.cache_dir),
        catalog=load_catalog(settings.cache_dir, settings.catalog_path),
    )


def console() -> Console:
    return Console(highlight=False)


def err_console() -> Console:
    return Console(stderr=True, highlight=False)


@contextmanager
def cli_errors() -> Iterator[None]:
    """Show our errors as one red line and exit 1 (no traceback)."""
    try:
        yield
    except FoundryError as exc:
        err_console().print(f"[red]Error:[/red] {exc.message}")
        raise typer.Exit(1) from exc


def human_size(n: int | None) -> str:
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"  # pragma: no cover
