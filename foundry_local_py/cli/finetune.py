"""``foundry-local adapter train``: LoRA fine-tuning of a catalog model, exported for llama.cpp.

The data is validated before the base model is loaded; the base is the alias's GGUF variant
(acquired when not cached yet); training shows a progress bar with the loss; the adapter is saved
as a PEFT folder and exported to a GGUF LoRA next to it, then registered in the cache through the
adapter store when this install has one. :func:`add_commands` attaches the command to the
``adapter`` sub-app.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ..errors import InvalidRequestError
from ..finetune.base import BaseModel
from ..finetune.train import DEFAULT_TARGET_MODULES, TrainConfig
from .common import cli_errors, console, human_size, load_context

FINETUNE_DEPENDENCIES = {"torch": "torch", "transformers": "transformers", "peft": "peft", "gguf": "gguf",
                         "safetensors": "safetensors"}


def missing_finetune_dependencies() -> list[str]:
    return [pip for module, pip in FINETUNE_DEPENDENCIES.items() if importlib.util.find_spec(module) is None]


def train(  # noqa: PLR0917 - typer maps parameters to CLI options
    base: Annotated[str, typer.Option("--base", help="Catalog alias (or GGUF variant) to fine-tune.")],
    data: Annotated[
        Path, typer.Option("--data", help="JSONL of chat examples ({\"messages\": [...]} per line).")
    ],
    name: Annotated[str, typer.Option("--name", help="Adapter name; served as '<base>:<name>'.")],
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Folder for the PEFT adapter and the GGUF. [default: ./adapters/NAME]"),
    ] = None,
    rank: Annotated[int, typer.Option("--rank", "-r", min=1, max=256, help="LoRA rank.")] = TrainConfig.rank,
    alpha: Annotated[int, typer.Option("--alpha", min=1, help="LoRA alpha (scale = alpha / rank).")] = (
        TrainConfig.alpha
    ),
    dropout: Annotated[float, typer.Option("--dropout", min=0.0, max=0.99, help="LoRA dropout.")] = (
        TrainConfig.dropout
    ),
    target_modules: Annotated[
        str, typer.Option("--target-modules", help="Comma-separated module names to adapt.")
    ] = ",".join(DEFAULT_TARGET_MODULES),
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Passes over the data.")] = (
        TrainConfig.epochs
    ),
    max_steps: Annotated[
        int | None, typer.Option("--max-steps", min=1, help="Stop after this many optimizer steps.")
    ] = None,
    learning_rate: Annotated[float, typer.Option("--learning-rate", "--lr", help="AdamW learning rate.")] = (
        TrainConfig.learning_rate
    ),
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Examples per step.")] = (
        TrainConfig.batch_size
    ),
    seed: Annotated[
        int, typer.Option("--seed", help="Seed: same seed, data, flags, threads -> same adapter.")
    ] = (
        TrainConfig.seed
    ),
    threads: Annotated[
        int | None, typer.Option("--threads", min=1, help="CPU threads for torch. [default: torch's choice]")
    ] = None,
    max_length: Annotated[
        int, typer.Option("--max-length", min=16, help="Tokens per example; longer ones are cut.")
    ] = TrainConfig.max_length,
    register: Annotated[
        bool, typer.Option("--register/--no-register", help="Register the adapter in the cache when done.")
    ] = True,
) -> None:
    """Fine-tune a LoRA adapter on chat examples (CPU is fine for small models) and export it."""
    from ..finetune.base import resolve_base
    from ..finetune.data import load_chat_jsonl
    from ..finetune.train import check_adapter_name

    modules = tuple(m.strip() for m in target_modules.split(",") if m.strip())
    config = TrainConfig(
        rank=rank, alpha=alpha, dropout=dropout, target_modules=modules, epochs=epochs, max_steps=max_steps,
        learning_rate=learning_rate, batch_size=batch_size, seed=seed, threads=threads, max_length=max_length,
    )
    screen = console()
    with cli_errors():
        check_adapter_name(name)
        config.check()
        missing = missing_finetune_dependencies()
        if missing:
            raise InvalidRequestError(
                "training needs the [finetune] extra: pip install 'foundry-local-py[finetune]' "
                f"(missing: {', '.join(missing)})"
            )
        examples = load_chat_jsonl(data)
        ctx = load_context()
        base_model = resolve_base(ctx.store, ctx.catalog, base)
        out_dir = out or Path("adapters") / name
        screen.print(
            f"[bold]{name}[/bold]: LoRA r={rank} alpha={alpha:g} on [bold]{base_model.variant_id}[/bold], "
            f"{len(examples)} examples from {data.name}"
        )
        result = _train_with_progress(screen, base_model, examples, out_dir / "peft", config=config)
        gguf_path = out_dir / f"{name}.gguf"
        from ..finetune.export import peft_to_gguf

        exported = peft_to_gguf(result.peft_dir, gguf_path, base_gguf=base_model.path)
        screen.print(
            f"Trained {result.steps} steps in {result.train_seconds:.1f} s "
            f"(base loaded in {result.load_seconds:.1f} s); final loss {result.final_loss:.4f}"
        )
        screen.print(f"  PEFT adapter: {result.peft_dir}")
        screen.print(
            f"  GGUF LoRA:    {gguf_path} ({human_size(gguf_path.stat().st_size)}, "
            f"{len(exported['target_tensors'])} tensors, {exported['architecture']})"
        )
        extra = {
            "training": config.as_record(),
            "final_loss": result.final_loss,
            "train_seconds": round(result.train_seconds, 2),
            "steps": result.steps,
            "examples": result.n_examples,
            "data": data.name,
        }
        if register:
            cache_dir = ctx.settings.cache_dir
            _register(screen, cache_dir, gguf_path, alias=base_model.alias, name=name, extra=extra)


def _train_with_progress(
    screen: Any, base: BaseModel, examples: Any, out_dir: Path, *, config: TrainConfig
) -> Any:
    from ..finetune.train import Step, train_lora

    _quiet_transformers()
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=screen, transient=False) as bar:
        task = bar.add_task("loading", total=None, loss="-")

        def on_step(step: Step) -> None:
            bar.update(task, total=step.total, completed=step.step, loss=f"{step.loss:.4f}",
                       description=f"epoch {step.epoch}")

        def on_status(message: str) -> None:
            bar.update(task, description=message)

        return train_lora(base.path, examples, out_dir, config, base_name=base.alias,
                          chat_template=base.chat_template, on_step=on_step, on_status=on_status)


def _quiet_transformers() -> None:
    """transformers' per-tensor tqdm bars and warnings would break the progress bar."""
    import functools
    import warnings

    import transformers.modeling_gguf_pytorch_utils as gguf_loader
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if hasattr(gguf_loader, "tqdm"):  # the GGUF loader's own bar ignores the setting above
        gguf_loader.tqdm = functools.partial(gguf_loader.tqdm, disable=True)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.|peft\.")


def _register(
    screen: Any, cache_dir: Path, gguf_path: Path, *, alias: str, name: str, extra: dict[str, Any]
) -> None:
    try:
        from ..cache.adapters import AdapterStore  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        screen.print(
            f"This install has no adapter store: serve the file yourself ({gguf_path}) "
            "or register it later with 'foundry-local adapter register'."
        )
        return
    AdapterStore(cache_dir).register(gguf_path, base=alias, name=name, extra=extra)
    screen.print(f"Registered: serve it as the model [bold]{alias}:{name}[/bold]")


def add_commands(app: typer.Typer) -> None:
    """Attach ``train`` to the ``adapter`` sub-app."""
    app.command("train")(train)
