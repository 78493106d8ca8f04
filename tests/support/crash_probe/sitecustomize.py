"""Test-only: put this folder on PYTHONPATH of a server and its model-probe children abort
(SIGABRT, as a native runtime does on a failed assertion) when they load a file whose name has
"crash" in it. The server process itself is never touched: this proves a native crash while
loading a model takes down the child, not the server (tests/api/test_crash_isolation.py)."""

import os
import sys

_argv = getattr(sys, "orig_argv", sys.argv)
if "foundry_local_py.engines.probe" in _argv and "crash" in os.path.basename(_argv[-1]):
    os.abort()
