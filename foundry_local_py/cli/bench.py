"""``foundry-local bench``."""

from __future__ import annotations


def bench() -> None:
    raise NotImplementedError
