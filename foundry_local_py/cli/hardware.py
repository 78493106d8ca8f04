"""``foundry-local hardware``: what this machine has and which variant each model would get."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..cache.catalog import Catalog
from ..cache.store import ModelStore
from ..config import Settings
from ..errors import FoundryError
from ..hardware.detect import detect_hardware
from ..hardware.report import hardware_report


def hardware(
    *,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the report as JSON (as GET /foundry/hardware does).")
    ] = False,
    device: Annotated[
        str | None, typer.Option("--device", help="Device preference: cpu, gpu, npu or auto.")
    ] = None,
    ep: Annotated[
        str | None,
        typer.Option("--ep", help="Execution provider: cpu, cuda, dml, qnn, webgpu, ... or a full name."),
    ] = None,
    catalog_path: Annotated[
        Path | None, typer.Option("--catalog", help="Extra catalog file merged over the shipped one.")
    ] = None,
    ignore_cache: Annotated[
        bool,
        typer.Option("--ignore-cache", help="Rank by hardware only, as a fresh download would."),
    ] = False,
    verify: Annotated[
        bool,
        typer.Option("--verify", help="Also start a one-node onnxruntime session on each provider."),
    ] = False,
) -> None:
    settings = Settings()  # fields come from the environment
    store = ModelStore(settings.cache_dir)
    err = Console(stderr=True)
    try:
        catalog = Catalog.load(settings.cache_dir / "catalog.json", catalog_path or settings.catalog_path)
        report = hardware_report(
            detect_hardware(verify_providers=verify),
            catalog,
            store,
            device=device if device is not None else settings.device,
            ep=ep if ep is not None else settings.ep,
            prefer_cached=not ignore_cache,
        )
    except FoundryError as exc:
        err.print(f"[red]error:[/red] {escape(exc.message)}")
        raise typer.Exit(2) from exc
    if json_output:
        typer.echo(json.dumps(report, indent=2))
        return
    _print_report(report, Console())


def _gib(n: int | None) -> str:
    return f"{n / 2**30:.1f} GiB" if n else "?"


def _print_report(report: dict[str, Any], console: Console) -> None:
    inv = report["inventory"]
    cpu, mem = inv["cpu"], inv["memory"]
    cores = f"{cpu['physical_cores']} physical / {cpu['logical_cores']} logical"
    if cpu["usable_cores"] != cpu["logical_cores"]:
        cores += f" ({cpu['usable_cores']} usable)"
    console.print(f"[bold]System[/bold]  {inv['system']} {cpu['arch']}")
    console.print(f"[bold]CPU[/bold]     {escape(cpu['model'])} ({cpu['vendor']}), {cores}")
    console.print(f"        features: {', '.join(cpu['features']) or 'unknown'} "
                  f"(from {cpu['features_source']})")
    console.print(f"[bold]RAM[/bold]     {_gib(mem['total_bytes'])} total, "
                  f"{_gib(mem['available_bytes'])} available")
    for line in report["accelerators"] or ["no GPU or NPU found"]:
        console.print(f"[bold]Accel[/bold]   {escape(line)}")
    ort, llama = inv["onnxruntime"], inv["llama_cpp"]
    if ort["installed"]:
        genai = f"{ort['genai_distribution']} {ort['genai_version']}" if ort["genai_installed"] else (
            "onnxruntime-genai not installed")
        console.print(f"[bold]ONNX[/bold]    {ort['distribution']} {ort['version']}: "
                      f"{', '.join(ort['providers'])}; {genai}")
    else:
        console.print("[bold]ONNX[/bold]    onnxruntime not installed")
    for check in ort["provider_checks"]:
        state = {True: "[green]ok[/green]", False: "[red]failed[/red]", None: "skipped"}[check["ok"]]
        console.print(f"        {check['provider']}: {state} ({escape(check['detail'])})")
    if llama["installed"]:
        offload = "GPU offload" if llama["gpu_offload"] else "CPU only"
        console.print(f"[bold]llama[/bold]   llama-cpp-python {llama['version']} ({offload})")
    else:
        console.print("[bold]llama[/bold]   llama-cpp-python not installed")
    for line in inv["errors"]:
        console.print(f"[yellow]probe failed[/yellow] {escape(line)}")
    overrides = {k: v for k, v in report["overrides"].items() if k != "prefer_cached" and v}
    if overrides:
        console.print(f"[bold]Overrides[/bold] {overrides}")

    for model in report["models"]:
        console.print()
        chosen = model["chosen"]
        if chosen:
            console.print(f"[bold]{escape(model['alias'])}[/bold] -> [green]{escape(chosen['variant'])}"
                          f"[/green] on {chosen['execution_provider']}")
            console.print(f"  {escape(chosen['reason'])}")
        else:
            console.print(f"[bold]{escape(model['alias'])}[/bold] -> [red]no usable variant[/red]")
            console.print(f"  {escape(model['error']['message'])}")
        table = Table(show_header=True, header_style="bold", box=None, padding=(0, 1))
        for col in ("", "variant", "class", "size", "cached", "why"):
            table.add_column(col, overflow="fold")
        for v in model["variants"]:
            mark = "[green]*[/green]" if v["chosen"] else ("+" if v["accepted"] else "[red]x[/red]")
            table.add_row(mark, escape(v["id"]), v["device_class"], _gib(v["size_bytes"]),
                          "yes" if v["cached"] else "no", escape(v["reason"]))
        console.print(table)
