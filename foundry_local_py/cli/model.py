"""`foundry-local model ...` commands: list, info, download, register, run, load, unload.

``run``, ``load`` and ``unload`` talk to the background service (started on demand, as Foundry
Local's ``foundry model run`` does); the others work on the cache directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.progress import Progress as RichProgress
from rich.table import Table

from ..cache.acquire import ensure_variant
from ..cache.catalog import CatalogModel, HuggingFaceSource, PackageSource, Variant
from ..cache.convert import describe_fidelity
from ..cache.hub import ensure_hub_model
from ..cache.inventory import fallback_variant
from ..cache.progress import Progress
from ..cache.registry import register_local
from ..cache.store import ModelStore
from ..config import Settings
from ..errors import FoundryError, ModelNotFoundError
from ..hardware import choose_for_cache, detect_hardware
from ..sdk.client import ServiceClient
from ..sdk.service import ServiceInfo, find_service, start_service
from .common import cli_errors, console, err_console, human_size, load_context
from .convert import convert as convert_command

app = typer.Typer(no_args_is_help=True)
app.command("convert")(convert_command)


def loaded_variant_ids(settings: Settings) -> set[str] | None:
    """Variant ids loaded in the running service; empty when no service runs, None if unknown."""
    info = find_service(settings)
    if info is None:
        return set()
    try:
        return {m["name"] for m in ServiceClient(info.base_url, api_key=settings.api_key_value()
                                                 ).loaded_models()}
    except FoundryError:
        return None


def pick_variant(store: ModelStore, model: CatalogModel, *, settings: Settings | None = None,
                 prefer_cached: bool = True) -> Variant:
    """The variant this machine would use for an alias: the hardware-aware choice (Foundry
    Local's priority, fidelity, memory), falling back to the simple ranking when none fits."""
    s = settings or Settings()
    choice = choose_for_cache(model, detect_hardware(), store, device=s.device, ep=s.ep,
                              prefer_cached=prefer_cached)
    return choice.variant or fallback_variant(store, model)


def _device(variant: Variant) -> str:
    provider = variant.execution_provider.removesuffix("ExecutionProvider").lower()
    return variant.device if provider == variant.device else f"{variant.device}/{provider}"


def _cached_size(store: ModelStore, model: CatalogModel, variant: Variant) -> int | None:
    manifest = store.manifest(model, variant)
    if manifest is not None:
        return manifest.total_size
    if isinstance(variant.source, PackageSource):
        return variant.source.size
    return variant.size_bytes


@app.command("list")
def list_models() -> None:
    """List catalog models with their variants, device, size and whether they are cached."""
    with cli_errors():
        ctx = load_context()
        loaded = loaded_variant_ids(ctx.settings)
        table = Table(title="Models", show_lines=False)
        table.add_column("Alias", no_wrap=True)
        table.add_column("Variant", overflow="fold")
        table.add_column("Device", no_wrap=True)
        table.add_column("Size", justify="right", no_wrap=True)
        table.add_column("Cached")
        table.add_column("Loaded")
        for model in ctx.catalog.models:
            for i, variant in enumerate(model.variants):
                available = ctx.store.is_available(model, variant)
                is_loaded = "?" if loaded is None else ("yes" if variant.id in loaded else "")
                table.add_row(
                    model.alias if i == 0 else "",
                    variant.id,
                    _device(variant),
                    human_size(_cached_size(ctx.store, model, variant)),
                    "yes" if available else "",
                    is_loaded,
                )
        console().print(table)


def describe_batching(verdict: dict[str, object]) -> str:
    """The engine's load-time batch verdict (``ModelStore.batching``) in words."""
    when = f" (measured at load, {verdict.get('measured', '?')})"
    if not verdict.get("batching"):
        reason = verdict.get("reason") or ("on this machine the runtime computes a batched row "
                                           "differently from the row alone, so batching would change outputs")
        return f"one sequence at a time: {reason}{when}"
    if verdict.get("allowed_dependent"):
        return "batched: allow_batch_dependent_outputs is on, outputs may depend on neighbours" + when
    return "batched, outputs do not depend on neighbours" + when


@app.command("info")
def info(
    alias: Annotated[str, typer.Argument(help="Model alias or variant id.")],
    license_text: Annotated[bool, typer.Option("--license", help="Show the license only.")] = False,
) -> None:
    """Show a model's details and the variant this machine would use."""
    with cli_errors():
        ctx = load_context()
        model, fixed = ensure_hub_model(ctx.store.root, ctx.catalog, alias)
        out = console()
        if license_text:
            extra = f": {model.license_description}" if model.license_description else ""
            out.print(f"{model.license}{extra}")
            return
        chosen = fixed or pick_variant(ctx.store, model, settings=ctx.settings)
        out.print(f"[bold]{model.display_name}[/bold] ({model.alias})")
        out.print(f"  publisher:     {model.publisher}")
        out.print(f"  task:          {model.task}")
        out.print(f"  license:       {model.license}")
        out.print(f"  context:       {model.context_length} tokens")
        out.print(f"  tool calling:  {'yes' if model.supports_tool_calling else 'no'}")
        if model.description:
            out.print(f"  about:         {model.description}")
        table = Table(show_lines=False)
        table.add_column("Variant", overflow="fold")
        for column in ("Format", "Device", "Precision", "Size", "Source", "Cached"):
            table.add_column(column, overflow="fold")
        for variant in model.variants:
            source = variant.source
            if isinstance(source, HuggingFaceSource):
                where = f"hf:{source.repo}@{source.revision[:12]}"
            elif isinstance(source, PackageSource):
                where = f"pip:{source.distribution}"
            else:
                where = source.kind
            table.add_row(
                ("* " if variant is chosen else "  ") + variant.id,
                variant.format,
                _device(variant),
                variant.precision,
                human_size(_cached_size(ctx.store, model, variant)),
                where,
                "yes" if ctx.store.is_available(model, variant) else "",
            )
        out.print(table)
        for variant in model.variants:
            fid = ctx.store.fidelity(model, variant)
            if fid is not None:
                out.print(f"  fidelity of {variant.id}: {describe_fidelity(fid)}")
            verdict = ctx.store.batching(model, variant)
            if verdict is not None:
                out.print(f"  batching of {variant.id}: {describe_batching(verdict)}")
        out.print(f"Selected on this machine: [bold]{chosen.id}[/bold]")


@app.command("download")
def download(
    alias: Annotated[str, typer.Argument(help="Model alias or variant id.")],
    force: Annotated[bool, typer.Option("--force", help="Download again even if cached.")] = False,
) -> None:
    """Download a model's variant into the cache (resumes an interrupted download)."""
    with cli_errors():
        ctx = load_context()
        model, fixed = ensure_hub_model(ctx.store.root, ctx.catalog, alias)
        variant = fixed or pick_variant(ctx.store, model, settings=ctx.settings, prefer_cached=False)
        out = console()
        columns = (
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
        )
        with RichProgress(*columns, console=out, transient=False) as bar:
            task: TaskID = bar.add_task(variant.id, total=None)

            def report(p: Progress) -> None:
                label = {"wait": "waiting", "verify": "verifying", "convert": "building"}.get(p.stage)
                description = f"{variant.id} ({label})" if label else variant.id
                bar.update(task, description=description, completed=p.done_bytes, total=p.total_bytes)

            path = ensure_variant(ctx.store, ctx.catalog, model, variant, progress=report, force=force)
        size = path.stat().st_size if path.is_file() else None
        out.print(f"Ready: {variant.id}" + (f" ({human_size(size)})" if size else ""))


@app.command("register")
def register(  # noqa: PLR0917 - typer maps parameters to CLI arguments and options
    path: Annotated[Path, typer.Argument(help="A GGUF file or an ONNX GenAI folder.")],
    alias: Annotated[str, typer.Option("--alias", help="Name to use for the model.")],
    fmt: Annotated[str | None, typer.Option("--format", help="gguf or onnx (detected when omitted).")] = None,
    context_length: Annotated[int, typer.Option("--context-length", min=64)] = 4096,
    completion_only: Annotated[
        bool, typer.Option("--completion-only", help="A base model without a chat template.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace a model with the same alias.")] = False,
) -> None:
    """Register a local model file or folder under an alias (it stays where it is)."""
    with cli_errors():
        from ..engines.backends import FORMATS

        if fmt is not None and fmt not in FORMATS:
            raise typer.BadParameter(f"--format must be one of {', '.join(FORMATS)}")
        ctx = load_context()
        if "\x00" in str(path):
            from ..errors import UnsafePathError

            raise UnsafePathError("path must contain no NUL byte")
        resolved = path.expanduser().resolve()
        model = register_local(
            ctx.settings.cache_dir,
            resolved,
            alias,
            fmt=fmt,
            catalog=ctx.catalog,
            context_length=context_length,
            chat=not completion_only,
            replace=force,
        )
        console().print(f"Registered [bold]{model.alias}[/bold] ({model.variants[0].id})")


# --- commands served by the background service -------------------------------------------------


def _service(settings: Settings, *, start: bool = True) -> tuple[ServiceInfo, ServiceClient]:
    info = find_service(settings)
    if info is None:
        if not start:
            raise ModelNotFoundError("service", detail="The service is not running.")
        err_console().print("Starting the service ...")
        info = start_service(settings)
    return info, ServiceClient(info.base_url, api_key=settings.api_key_value(), timeout=None)


def _load(client: ServiceClient, name: str, *, ttl: float | None, ep: str | None) -> dict[str, object]:
    """Load ``name`` in the service, downloading it first when it is not cached."""
    try:
        return client.load(name, ttl=ttl, ep=ep)
    except ModelNotFoundError as exc:
        if "download" not in exc.message:
            raise
    err_console().print(f"Downloading {name} ...")
    client.download(name, on_progress=lambda line: err_console().print(line))
    return client.load(name, ttl=ttl, ep=ep)


@app.command("load")
def load(
    alias: Annotated[str, typer.Argument(help="Model alias or variant id.")],
    ttl: Annotated[float | None, typer.Option(help="Unload after this many idle seconds.")] = None,
    ep: Annotated[str | None, typer.Option(help="Execution provider (cpu, cuda, dml, ...).")] = None,
) -> None:
    """Load a model into the service (downloading it if needed)."""
    with cli_errors():
        ctx = load_context()
        _, client = _service(ctx.settings)
        result = _load(client, alias, ttl=ttl, ep=ep)
        console().print(f"Loaded {result['name']} in {result['loadSeconds']}s")


@app.command("unload")
def unload(
    alias: Annotated[str, typer.Argument(help="Model alias or variant id.")],
    force: Annotated[bool, typer.Option("--force", help="Unload even while it serves requests.")] = False,
) -> None:
    """Unload a model from the service."""
    with cli_errors():
        ctx = load_context()
        _, client = _service(ctx.settings, start=False)
        result = client.unload(alias, force=force)
        console().print(f"Unloaded {result['name']}")


@app.command("run")
def run(  # noqa: PLR0917 - typer maps parameters to CLI arguments and options
    alias: Annotated[str, typer.Argument(help="Model alias or variant id.")],
    prompt: Annotated[str | None, typer.Argument(help="Answer this one prompt and exit.")] = None,
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    temperature: Annotated[float | None, typer.Option(min=0.0, max=2.0)] = None,
    max_tokens: Annotated[int | None, typer.Option(min=1)] = None,
    ttl: Annotated[float | None, typer.Option(help="Unload after this many idle seconds.")] = None,
    ep: Annotated[str | None, typer.Option(help="Execution provider (cpu, cuda, dml, ...).")] = None,
) -> None:
    """Chat with a model in the terminal (streams as it generates); with PROMPT, answer once."""
    with cli_errors():
        ctx = load_context()
        model, _ = ensure_hub_model(ctx.store.root, ctx.catalog, alias)
        _, client = _service(ctx.settings)
        _load(client, alias, ttl=ttl, ep=ep)
        sampling: dict[str, object] = {"model": alias}
        if temperature is not None:
            sampling["temperature"] = temperature
        if max_tokens is not None:
            sampling["max_tokens"] = max_tokens
        if not model.chat:
            if prompt is None:
                raise typer.BadParameter(f"'{alias}' is a completion model: give a PROMPT to continue")
            for chunk in client.stream("/v1/completions", {**sampling, "prompt": prompt}):
                for choice in chunk.get("choices", []):
                    typer.echo(choice.get("text", ""), nl=False)
            typer.echo()
            return
        history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        if prompt is not None:
            _chat_turn(client, sampling, history, prompt)
            return
        err_console().print(f"Chatting with {alias}. Type /exit to quit, /clear to forget the chat.")
        while True:
            try:
                line = input(">>> ")
            except EOFError:
                typer.echo()
                return
            text = line.strip()
            if text in ("/exit", "/quit", "/bye"):
                return
            if text == "/clear":
                history = history[:1] if system else []
                continue
            if text:
                _chat_turn(client, sampling, history, text)


def _chat_turn(client: ServiceClient, sampling: dict[str, object], history: list[dict[str, str]],
               text: str) -> None:
    history.append({"role": "user", "content": text})
    parts: list[str] = []
    for chunk in client.stream("/v1/chat/completions", {**sampling, "messages": history}):
        for choice in chunk.get("choices", []):
            piece = (choice.get("delta") or {}).get("content") or ""
            if piece:
                parts.append(piece)
                typer.echo(piece, nl=False)
    typer.echo()
    history.append({"role": "assistant", "content": "".join(parts)})
