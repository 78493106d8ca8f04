"""``foundry-local hardware``: what this machine has and which variant each model would get."""

from __future__ import annotations


def hardware() -> None:
    raise NotImplementedError
