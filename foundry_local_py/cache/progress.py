"""Progress reports from long cache operations (downloads, conversions, verification)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Progress:
    """A progress report: ``stage`` is 'wait', 'download', 'convert', 'verify' or 'done'.

    ``done_bytes``/``total_bytes`` cover the whole variant (all its files; resumed bytes count as
    done). ``new_bytes`` is what arrived from the network since the previous report: add it to a
    download counter (``foundry_local_download_bytes_total``).
    """

    variant_id: str
    stage: str
    done_bytes: int = 0
    total_bytes: int | None = None
    message: str = ""
    new_bytes: int = 0


ProgressCallback = Callable[[Progress], None]
