"""Lets `python examples/<name>.py` work straight from a clone: when foundry_local_py is not
importable by this Python, re-run the example with the virtual environment ./scripts/serve made."""

import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

if importlib.util.find_spec("foundry_local_py") is None:
    venv_python = ROOT / ".venv" / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    if not venv_python.exists():
        sys.exit("foundry_local_py is not installed: run ./scripts/serve once (it creates .venv), "
                 "or pip install the project")
    os.execv(str(venv_python), [str(venv_python), *sys.argv])  # noqa: S606 - this same example
