#!/usr/bin/env python3
"""Benchmark entry point: the same as ``foundry-local bench`` (see ``--help``).

Example: ``.venv/bin/python scripts/bench.py --vs-peer`` measures our server and
``python -m llama_cpp.server`` on the same GGUF at concurrency 1, 4 and 8, in one run.

``.venv/bin/python scripts/bench.py --vs llama-server`` measures our server and llama.cpp's C++
``llama-server`` (built once by ``scripts/build_llama_server.sh``) on the same GGUF with the same
slots and KV pool, at each concurrency level with shared and unique prompts, plus the
multi-turn and agent-loop conversation workloads (``--workloads`` picks), in one run.

``scripts/bench.py --foundry-peer VENV --model <onnx variant id>`` instead compares an ONNX
variant with Foundry Local's own runtime (``foundry-local-sdk``, installed into VENV by
``scripts/foundry_peer_venv.sh``): see ``foundry_local_py/bench/foundry_peer.py``.
"""

import sys

if __name__ == "__main__":
    if any(a == "--foundry-peer" or a.startswith("--foundry-peer=") for a in sys.argv[1:]):
        from foundry_local_py.bench.foundry_peer import main

        main(sys.argv[1:])
    else:
        from foundry_local_py.cli.main import app

        app(["bench", *sys.argv[1:]])
