"""``foundry-local model convert NAME``: build a converted variant locally and show its fidelity.

NAME is a converted variant of the catalog, or a model alias / base variant together with
``--precision`` (and ``--format``) to pick one of its converted variants. The base is acquired
first (assembled, downloaded or itself converted), then the conversion runs in a worker process.
The lead registers :func:`convert` under the ``model`` group.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from ..cache.acquire import Progress, ensure_variant
from ..cache.catalog import Catalog, CatalogModel, ConvertSource, Variant
from ..cache.convert import DEFAULT_THRESHOLD, build_variant, conversion_log_path
from ..cache.manifest import Fidelity
from ..cache.store import ModelStore
from ..config import Settings
from ..errors import ConversionError, FoundryError, InvalidRequestError


def select_convert_variant(
    catalog: Catalog, name: str, *, precision: str | None = None, fmt: str | None = None
) -> tuple[CatalogModel, Variant]:
    """The converted variant NAME designates (see the module docstring)."""
    model, fixed = catalog.lookup(name)
    if fixed is not None and isinstance(fixed.source, ConvertSource):
        if precision and precision.lower() not in (fixed.precision.lower(), fixed.source.precision.lower()):
            raise InvalidRequestError(
                f"'{fixed.name}' is built as {fixed.source.precision}; name another variant for {precision}"
            )
        if fmt and fmt.lower() != fixed.format:
            raise InvalidRequestError(f"'{fixed.name}' is a {fixed.format} variant")
        return model, fixed
    candidates = [v for v in model.variants if isinstance(v.source, ConvertSource)]
    if fixed is not None:
        candidates = [v for v in candidates if _is_base(v, fixed)]
    if precision:
        p = precision.lower()
        candidates = [
            v for v in candidates
            if isinstance(v.source, ConvertSource) and p in (v.precision.lower(), v.source.precision.lower())
        ]
    if fmt:
        candidates = [v for v in candidates if v.format == fmt.lower()]
    if not candidates:
        available = ", ".join(
            f"{v.name} ({v.format} {v.precision})" for v in model.variants if isinstance(v.source, ConvertSource)
        )
        raise InvalidRequestError(
            f"no converted variant of '{model.alias}' matches"
            + (f"; the catalog has: {available}" if available else "; the catalog lists none")
        )
    # CPU variants first: they can be built and validated on any machine.
    candidates.sort(key=lambda v: v.device != "cpu")
    return model, candidates[0]


def _is_base(variant: Variant, base: Variant) -> bool:
    source = variant.source
    return isinstance(source, ConvertSource) and source.base.lower() in (base.id.lower(), base.name.lower())


def fidelity_table(fid: Fidelity) -> Table:
    table = Table(show_header=False, box=None, padding=(0, 2))
    table.add_row("top-1 agreement", f"{fid.top1_agreement:.1%}  (threshold {fid.threshold:.0%})")
    if fid.runtime_top1_agreement is not None:
        table.add_row("  vs source in llama.cpp", f"{fid.runtime_top1_agreement:.1%}")
    table.add_row(
        "perplexity",
        f"{fid.perplexity_source:.2f} -> {fid.perplexity_converted:.2f}  ({fid.perplexity_delta_pct:+.2f}%)",
    )
    table.add_row("measured on", f"{fid.n_tokens} tokens, against the {fid.reference}")
    table.add_row("status", "[red]DEGRADED: not auto-selected[/red]" if fid.degraded else "[green]ok[/green]")
    return table


def convert(
    name: str = typer.Argument(..., help="A converted variant, or an alias/base variant with --precision."),
    precision: str | None = typer.Option(
        None, "--precision", "-p", help="ONNX: int4, int8, fp16, fp32. GGUF: q4_0, q8_0, q3_k_m, ..."
    ),
    fmt: str | None = typer.Option(None, "--format", help="onnx or gguf."),
    force: bool = typer.Option(False, "--force", help="Rebuild even when it is already built."),
    threshold: float = typer.Option(
        DEFAULT_THRESHOLD, "--threshold", min=0.0, max=1.0,
        help="Minimum top-1 agreement with the source; below it the variant is marked degraded.",
    ),
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help="Model cache (default: settings)."),
    catalog_path: Path | None = typer.Option(None, "--catalog", help="Extra catalog file."),
) -> None:
    """Convert a model locally (GGUF -> ONNX, or GGUF re-quantization) and show its fidelity."""
    console = Console()
    settings = Settings()
    root = cache_dir or settings.cache_dir
    store = ModelStore(root)
    variant: Variant | None = None
    try:
        catalog = Catalog.load(root / "catalog.json", catalog_path or settings.catalog_path)
        model, variant = select_convert_variant(catalog, name, precision=precision, fmt=fmt)
        source = variant.source
        assert isinstance(source, ConvertSource)
        base_model, base_variant = catalog.variant(source.base)
        console.print(
            f"Converting [bold]{base_variant.name}[/bold] -> [bold]{variant.name}[/bold] "
            f"({source.method}, {source.precision}, {source.execution_provider})"
        )
        with console.status("Preparing the source") as status:

            def show(event: Progress) -> None:
                if event.message:
                    status.update(event.message)
                    if event.stage != "done":
                        console.print(f"  [dim]{event.stage}[/dim] {event.message}")

            base_path = ensure_variant(store, catalog, base_model, base_variant, progress=show)
            path = build_variant(
                store, model, variant, base_model, base_variant, base_path,
                progress=show, force=force, threshold=threshold,
            )
    except FoundryError as exc:
        console.print(f"[red]error:[/red] {exc.message}")
        if isinstance(exc, ConversionError) and variant is not None:
            log = conversion_log_path(store, variant)
            if log.is_file():
                console.print(f"details: {log}")
        raise typer.Exit(1) from exc
    manifest = store.manifest(model, variant)
    console.print(f"[green]built[/green] {variant.id} at {path}")
    if manifest is not None:
        console.print(f"size: {manifest.total_size / 1e6:.1f} MB in {len(manifest.files)} files")
        if manifest.fidelity is not None:
            console.print(fidelity_table(manifest.fidelity))
            if manifest.fidelity.threshold != threshold:
                console.print(
                    f"[dim]measured when it was built, with threshold {manifest.fidelity.threshold:.0%}; "
                    "--force rebuilds it[/dim]"
                )
