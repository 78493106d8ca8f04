"""``foundry-local model convert NAME``: build a converted variant locally and show its fidelity.

NAME is a converted variant of the catalog, or a model alias / base variant, optionally with
``--precision`` and ``--format`` to pick among its converted variants (CPU ones first, then catalog
order). The base is acquired first (assembled, downloaded or itself converted), then the conversion
runs in a worker process. The lead registers :func:`convert` under the ``model`` group:
``app.command("convert")(convert.convert)``.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from ..cache.acquire import ensure_variant
from ..cache.catalog import Catalog, CatalogModel, ConvertSource, Variant
from ..cache.convert import DEFAULT_THRESHOLD, build_variant, conversion_log_path
from ..cache.manifest import Fidelity
from ..cache.progress import Progress
from ..errors import ConversionError, InvalidRequestError
from .common import cli_errors, console, err_console, human_size, load_context


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
    converted = [v for v in model.variants if isinstance(v.source, ConvertSource)]
    candidates = [v for v in converted if fixed is None or _built_from(v, fixed)]
    if precision:
        candidates = [v for v in candidates if precision.lower() in _precisions(v)]
    if fmt:
        candidates = [v for v in candidates if v.format == fmt.lower()]
    if not candidates:
        available = ", ".join(f"{v.name} ({v.format} {v.precision})" for v in converted)
        raise InvalidRequestError(
            f"no converted variant of '{model.alias}' matches"
            + (f"; the catalog has: {available}" if available else "; the catalog lists none")
        )
    # CPU variants first: they can be built and validated on any machine.
    candidates.sort(key=lambda v: v.device != "cpu")
    return model, candidates[0]


def _built_from(variant: Variant, base: Variant) -> bool:
    source = variant.source
    return isinstance(source, ConvertSource) and source.base.lower() in (base.id.lower(), base.name.lower())


def _precisions(variant: Variant) -> set[str]:
    source = variant.source
    extra = {source.precision.lower()} if isinstance(source, ConvertSource) else set()
    return {variant.precision.lower(), *extra}


def fidelity_table(fid: Fidelity) -> Table:
    """The fidelity of a converted variant as rows (also usable by ``model info``)."""
    table = Table(show_header=False, box=None, padding=(0, 2))
    table.add_row("top-1 agreement", f"{fid.top1_agreement:.1%}  (threshold {fid.threshold:.0%})")
    if fid.runtime_top1_agreement is not None:
        table.add_row("  vs source in llama.cpp", f"{fid.runtime_top1_agreement:.1%}")
    table.add_row(
        "perplexity",
        f"{fid.perplexity_source:.2f} -> {fid.perplexity_converted:.2f}  ({fid.perplexity_delta_pct:+.2f}%)",
    )
    table.add_row("measured", f"on {fid.n_tokens} tokens, against the {fid.reference}")
    table.add_row("status", "[red]degraded: not chosen automatically[/red]" if fid.degraded else "ok")
    return table


def convert(
    name: Annotated[str, typer.Argument(help="A converted variant, or a model alias / base variant.")],
    precision: Annotated[
        str | None,
        typer.Option("--precision", "-p", help="ONNX: int4, int8, fp16, fp32. GGUF: q4_0, q8_0, q3_k_m, ..."),
    ] = None,
    fmt: Annotated[str | None, typer.Option("--format", help="onnx or gguf.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even when it is already built.")] = False,
    threshold: Annotated[
        float,
        typer.Option(
            "--threshold", min=0.0, max=1.0,
            help="Minimum top-1 agreement with the source; below it the variant is marked degraded.",
        ),
    ] = DEFAULT_THRESHOLD,
) -> None:
    """Convert a model locally (GGUF -> ONNX GenAI, or GGUF re-quantization) and show its fidelity."""
    if fmt not in (None, "onnx", "gguf"):
        raise typer.BadParameter("--format must be onnx or gguf")
    with cli_errors():
        ctx = load_context()
    out = console()
    variant: Variant | None = None
    try:
        with cli_errors():
            model, variant = select_convert_variant(ctx.catalog, name, precision=precision, fmt=fmt)
            source = variant.source
            assert isinstance(source, ConvertSource)
            base_model, base_variant = ctx.catalog.variant(source.base)
            out.print(
                f"[bold]{base_variant.id}[/bold] -> [bold]{variant.id}[/bold] "
                f"({source.method}, {source.precision}, {source.execution_provider})"
            )
            with out.status("Preparing the source") as status:

                def show(event: Progress) -> None:
                    if event.stage != "done" and event.message:
                        status.update(event.message)
                        out.print(f"  [dim]{event.stage:8}[/dim] {event.message}")

                base_path = ensure_variant(ctx.store, ctx.catalog, base_model, base_variant, progress=show)
                path = build_variant(
                    ctx.store, model, variant, base_model, base_variant, base_path,
                    progress=show, force=force, threshold=threshold,
                )
    except typer.Exit:
        if variant is not None:
            log = conversion_log_path(ctx.store, variant)
            if log.is_file():
                err_console().print(f"The conversion log is at {log}")
        raise
    manifest = ctx.store.manifest(model, variant)
    out.print(f"Ready: {variant.id} at {path}")
    if manifest is None:
        raise ConversionError("the variant has no manifest")  # pragma: no cover - built just now
    out.print(f"  size: {human_size(manifest.total_size)} in {len(manifest.files)} files")
    if manifest.fidelity is not None:
        out.print(fidelity_table(manifest.fidelity))
        if manifest.fidelity.threshold != threshold:
            out.print(
                f"[dim]Measured when it was built, with threshold {manifest.fidelity.threshold:.0%}; "
                "--force rebuilds it.[/dim]"
            )
