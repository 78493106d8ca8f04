#!/usr/bin/env bash
# Benchmark-only: build llama.cpp's own C++ server (`llama-server`) from the llama.cpp sources
# vendored in the sdist of the llama-cpp-python version pyproject.toml pins, so the peer runs
# the same llama.cpp as our engine. Not part of the install or the tests; about 20 minutes on
# 2 cores, once: the binary is kept in a cache folder and reused.
# Usage: scripts/build_llama_server.sh      (prints the binary's path on its last line)
# Env:   FOUNDRY_PEER_CACHE (default ~/.cache/foundry-local-py/peers), JOBS (default: nproc)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
version="$(grep -oP 'llama-cpp-python==\K[0-9.]+' "$here/pyproject.toml" | head -1)"
root="${FOUNDRY_PEER_CACHE:-$HOME/.cache/foundry-local-py/peers}/llama-server-$version"
bin="$root/build/bin/llama-server"
if [[ -x "$bin" ]]; then echo "$bin"; exit 0; fi
mkdir -p "$root"
if [[ ! -d "$root/src" ]]; then
  tmp="$(mktemp -d)"
  python3 -m pip download --quiet --no-binary :all: --no-deps -d "$tmp" "llama-cpp-python==$version"
  tar -xzf "$tmp"/llama_cpp_python-"$version".tar.gz -C "$tmp"
  mv "$tmp/llama_cpp_python-$version/vendor/llama.cpp" "$root/src.partial"
  mv "$root/src.partial" "$root/src"
  rm -rf "$tmp"
fi
cmake -S "$root/src" -B "$root/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_SERVER=ON \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >"$root/cmake.log"
cmake --build "$root/build" --target llama-server -j "${JOBS:-$(nproc)}" >"$root/build.log"
echo "$bin"
