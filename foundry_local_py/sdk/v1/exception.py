"""The one exception type of the 1.x SDK surface (as in Foundry Local's SDK)."""

from __future__ import annotations


class FoundryLocalException(Exception):
    """Base exception for SDK errors. ``__cause__`` holds the project's own error, when any."""
