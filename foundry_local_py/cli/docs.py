"""``foundry-local docs``: README's reference tables, generated from the code they describe.

Three blocks of README.md sit between markers and are written only by this module:

- ``settings``: every :class:`~foundry_local_py.config.Settings` field (flag, variable, default,
  meaning), from :func:`~foundry_local_py.config.setting_specs`, the same source as the flags of
  ``foundry-local serve``;
- ``metrics``: every metric family of the app's Prometheus registry (:class:`Metrics`);
- ``routes``: every route of the app's OpenAPI document.

``foundry-local docs`` rewrites the blocks; ``--check`` exits 1 when README differs from what the
code generates (the test suite runs the same check), so neither a new setting nor a hand edit of
a table goes unnoticed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from ..config import setting_specs

BEGIN = "<!-- BEGIN GENERATED: {name} (foundry-local docs; do not edit by hand) -->"
END = "<!-- END GENERATED: {name} -->"
README = Path(__file__).resolve().parents[2] / "README.md"
T = TypeVar("T")


def _cell(text: str) -> str:
    # Markdown tables: escape the column separator, and '<...>' that a renderer would take for HTML.
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;").replace("\n", " ").strip()


def settings_table() -> str:
    rows = ["| setting | flag | environment variable | type | default | meaning |",
            "|---|---|---|---|---|---|"]
    for spec in setting_specs():
        flags = " ".join(f"`{f}`" for f in spec.flags)
        if spec.kind == "bool":
            flags = f"`{spec.flags[0]}` / `--no-{spec.flags[0][2:]}`"
        rows.append(
            f"| `{spec.name}` | {flags} | `{spec.env}` | {_cell(spec.type_doc)} | {_cell(spec.default)}"
            f" | {_cell(spec.help)} |"
        )
    return "\n".join(rows)


def metric_families() -> list[tuple[str, str, list[str], str]]:
    """(exposed name, type, labels, help) of every metric the app's registry exposes."""
    from prometheus_client.metrics import MetricWrapperBase

    from ..server.metrics import Metrics, ModelState

    metrics = Metrics()
    found: list[tuple[str, str, list[str], str]] = []
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            name = value._name + ("_total" if value._type == "counter" else "")
            found.append((str(name), str(value._type), list(value._labelnames), str(value._documentation)))
    # The gauges read at scrape time come from a collector: collect them with one model present.
    metrics.attach_state(lambda: [_sample_state(ModelState)], lambda: 0)
    known = {f[0] for f in found}
    for family in metrics.registry.collect():
        if family.type != "gauge" or family.name in known:
            continue
        labels = sorted({k for s in family.samples for k in s.labels}, key=_label_order)
        found.append((family.name, family.type, labels, family.documentation))
    return found


def _sample_state(cls: type[T]) -> T:
    """One instance of the state the collector reads, whatever fields it has grown: text fields
    get a name, numbers 0 (only the families and their labels matter here)."""
    import dataclasses

    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
            continue
        values[f.name] = "m" if f.type in (str, "str") else 0
    return cls(**values)


def _label_order(label: str) -> tuple[int, str]:
    return (0 if label == "model" else 1, label)


def metrics_table() -> str:
    rows = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    for name, kind, labels, doc in metric_families():
        rows.append(f"| `{name}` | {kind} | {', '.join(f'`{x}`' for x in labels)} | {_cell(doc)} |")
    return "\n".join(rows)


def routes_table() -> str:
    from ..config import Settings
    from ..server.app import create_app

    schema: dict[str, Any] = create_app(Settings(preload=False)).openapi()
    rows = ["| method | path | what it does |", "|---|---|---|"]
    for path, operations in schema.get("paths", {}).items():
        for method, op in operations.items():
            doc = (op.get("description") or op.get("summary") or "").strip().split("\n\n")[0]
            rows.append(f"| {method.upper()} | `{path}` | {_cell(doc)} |")
    return "\n".join(rows)


GENERATORS: dict[str, Callable[[], str]] = {
    "settings": settings_table,
    "metrics": metrics_table,
    "routes": routes_table,
}


def _block(name: str) -> re.Pattern[str]:
    return re.compile(re.escape(BEGIN.format(name=name)) + r"\n.*?" + re.escape(END.format(name=name)),
                      re.DOTALL)


def render(text: str, blocks: dict[str, str] | None = None) -> str:
    """``text`` with every generated block replaced by fresh output (missing markers: an error)."""
    blocks = blocks if blocks is not None else {name: gen() for name, gen in GENERATORS.items()}
    for name, body in blocks.items():
        pattern = _block(name)
        if not pattern.search(text):
            raise ValueError(f"README has no '{name}' block (markers {BEGIN.format(name=name)!r})")
        fresh = f"{BEGIN.format(name=name)}\n{body}\n{END.format(name=name)}"
        text = pattern.sub(lambda _m, block=fresh: block, text)  # type: ignore[misc]
    return text


def stale_blocks(text: str, blocks: dict[str, str] | None = None) -> list[str]:
    """Names of the blocks whose text differs from what the code generates now."""
    blocks = blocks if blocks is not None else {name: gen() for name, gen in GENERATORS.items()}
    fresh = render(text, blocks)
    return [name for name in blocks if _block(name).search(text).group(0)  # type: ignore[union-attr]
            != _block(name).search(fresh).group(0)]  # type: ignore[union-attr]


def docs(
    check: Annotated[bool, typer.Option("--check", help="Exit 1 if README is out of date; write nothing")
                     ] = False,
    readme: Annotated[Path, typer.Option(help="The file to update")] = README,
) -> None:
    """Regenerate README's settings, metrics and routes tables from the code."""
    text = readme.read_text(encoding="utf-8")
    blocks = {name: gen() for name, gen in GENERATORS.items()}
    stale = stale_blocks(text, blocks)
    if check:
        if stale:
            typer.echo(f"{readme.name} is out of date ({', '.join(stale)}): run ./scripts/gen-docs", err=True)
            raise typer.Exit(1)
        typer.echo(f"{readme.name} is up to date")
        return
    if stale:
        readme.write_text(render(text, blocks), encoding="utf-8")
    typer.echo(f"{readme.name}: {', '.join(stale) + ' updated' if stale else 'up to date'}")
