#!/usr/bin/env python3
"""Benchmark entry point: the same as ``foundry-local bench`` (see ``--help``).

Example: ``.venv/bin/python scripts/bench.py --vs-peer`` measures our server and
``python -m llama_cpp.server`` on the same GGUF at concurrency 1, 4 and 8, in one run.
"""

from foundry_local_py.cli.main import app

if __name__ == "__main__":
    app(["bench", *__import__("sys").argv[1:]])
