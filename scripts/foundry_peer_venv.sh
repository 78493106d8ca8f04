#!/usr/bin/env bash
# Benchmark-only: install Foundry Local's own runtime (the `foundry-local-sdk` package from PyPI,
# which carries the native Foundry Local Core and its onnxruntime-genai) into a virtual
# environment of its own, so it never mixes with ours. `scripts/bench.py --foundry-peer VENV`
# then runs it as a peer. Usage: scripts/foundry_peer_venv.sh [VENV_DIR] [VERSION]
set -euo pipefail
venv="${1:-.venv-foundry-peer}"
version="${2:-2.2.1}"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet "foundry-local-sdk==${version}" psutil
"$venv/bin/python" -c "import foundry_local_sdk, sys; print('foundry-local-sdk', '${version}', 'in', sys.prefix)"
