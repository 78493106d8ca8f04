"""The ``foundry-local`` command: verbs grouped as Foundry Local's CLI groups them.

Each group lives in its own module (``model``, ``cache``, ``service``, ...) and registers its
commands on the sub-app it owns; this module only assembles them.
"""

from __future__ import annotations

import typer

from . import adapter, bench, cache, docs, finetune, hardware, model, serve, service

app = typer.Typer(
    name="foundry-local",
    help="Run small language models locally behind an OpenAI-compatible API.",
    no_args_is_help=True,
    # `foundry-local --install-completion` (bash, zsh, fish, PowerShell) and --show-completion.
    add_completion=True,
)
app.add_typer(model.app, name="model", help="Discover, download, run and manage models.")
app.add_typer(cache.app, name="cache", help="Inspect and manage the local model cache.")
app.add_typer(service.app, name="service", help="Start, stop and inspect the background service.")
finetune.add_commands(adapter.app)  # `adapter train`
app.add_typer(adapter.app, name="adapter", help="Fine-tune, register, list and remove LoRA adapters.")
app.command("serve", help="Run the server in the foreground.")(serve.serve)
app.command("docs", help="Regenerate README's settings, metrics and routes tables from the code.")(
    docs.docs
)
app.command("bench", help="Benchmark an OpenAI-compatible endpoint (optionally against a peer).")(
    bench.bench
)
app.command("hardware", help="Show detected hardware and the variant each model would get.")(
    hardware.hardware
)


def main() -> None:
    app(prog_name="foundry-local")


if __name__ == "__main__":  # pragma: no cover
    main()
