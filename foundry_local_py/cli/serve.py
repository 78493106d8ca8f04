"""``foundry-local serve``: run the server in the foreground."""

from __future__ import annotations


def serve() -> None:
    raise NotImplementedError
